#!/usr/bin/env bash
# SB3's own PPO/DQN tests as the yardstick of MincPPO / MincDQN (issue 13).
#
#   benchmarks/sb3_yardstick.sh SB3_SOURCE [REV] [OUT]
#
# SB3_SOURCE: a checkout of DLR-RM/stable-baselines3, or its git directory (then REV, default HEAD, is read
# with `git show`). Copies tests/{test_save_load,test_predict,test_cnn,test_train_eval_mode,test_callbacks}.py
# to OUT (default /tmp/sb3_yardstick; never into this repository: SB3's tests stay SB3's), keeps the test cases
# that run PPO or DQN, and runs them twice with the venv's pytest: once with SB3's classes (stock), once with
# stable_baselines3.PPO / DQN replaced by MincPPO / MincDQN with aux="minc" (ours). SB3's assertions are
# untouched: the replacement happens in a conftest.py, before the test modules import stable_baselines3.
# Prints the pass/fail counts of both runs; the pytest logs are OUT/{stock,ours}.log.
set -euo pipefail
src=${1:?usage: $0 SB3_SOURCE [REV] [OUT]}
rev=${2:-HEAD}
out=${3:-/tmp/sb3_yardstick}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
files="test_save_load test_predict test_cnn test_train_eval_mode test_callbacks"

mkdir -p "$out/tests"
for f in $files; do
  if [ -f "$src/tests/$f.py" ]; then cp "$src/tests/$f.py" "$out/tests/"
  else git --git-dir="$src" show "$rev:tests/$f.py" > "$out/tests/$f.py"; fi
done
cat > "$out/tests/conftest.py" <<'PY'
"""Keep SB3's PPO/DQN cases; with SB3_YARDSTICK=ours, stable_baselines3.PPO / DQN are MincPPO / MincDQN (aux="minc")."""
import inspect
import os
import re

import stable_baselines3
from stable_baselines3 import DQN, PPO

if os.environ.get("SB3_YARDSTICK") == "ours":
    from minc_rl.agents import MincDQN, MincPPO

    assert MincPPO.__init__.__defaults__[0] == "minc" and MincDQN.__init__.__defaults__[0] == "minc"
    stable_baselines3.PPO, stable_baselines3.DQN = MincPPO, MincDQN


def pytest_collection_modifyitems(config, items):
    """A case is PPO/DQN's when its model_class is PPO or DQN, or (without model_class) its body names them."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "model_class" in params:
            ours = isinstance(params["model_class"], type) and issubclass(params["model_class"], (PPO, DQN))
        else:
            ours = re.search(r"\b(PPO|DQN)\b", inspect.getsource(item.function)) is not None
        (keep if ours else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
PY

cd "$out"
for run in stock ours; do
  SB3_YARDSTICK=$run nice -n 10 "$python" -m pytest -q -p no:cacheprovider -rfE tests ${PYTEST_ARGS:-} \
    > "$out/$run.log" 2>&1 || true
  echo "$run: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$out/$run.log" | tail -1)"
done

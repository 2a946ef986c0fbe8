"""benchmarks/gpu_check.py: the --quick CPU run's JSON, and the one-line exit 2 without a CUDA GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402
TIMINGS = frozenset({
    "seconds", "median_s", "step_s", "loss_s", "median_step_s", "median_loss_s", "images_per_s", "steps_per_s",
    "median_steps_per_s", "wall_s",
})
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same outcome on a machine with a GPU


def run_check(*args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/gpu_check.py *args` as a user types it, with every GPU hidden."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=300
    )


def leaves(tree) -> Iterator[float]:
    """Every number in a JSON tree."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list):
        for value in tree:
            yield from leaves(value)
    else:
        yield tree


def timings(tree, keys: frozenset[str]) -> Iterator[float]:
    """Every number under a key in `keys`, anywhere in a JSON tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value) if key in keys else timings(value, keys)
    elif isinstance(tree, list):
        for value in tree:
            yield from timings(value, keys)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """The JSON of one --quick run."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    done = run_check("--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"| {quick_backbone()} step |" in done.stdout and "| ppo |" in done.stdout
    return json.loads(out.read_text())


def test_quick_records_the_cpu_and_the_command(quick: dict) -> None:
    env = quick["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and quick["quick"] is True
    assert "--quick" in env["command"] and "gpu_check.py" in env["command"]
    assert env["torch"] and "cuda" in env


def test_quick_timings_are_finite_and_positive(quick: dict) -> None:
    found = list(timings(quick, TIMINGS))
    assert len(found) > 50
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in found)


def test_quick_loss_cells(quick: dict) -> None:
    cells = quick["loss"]
    assert {(c["dtype"], c["batch"], c["dim"]) for c in cells} == {
        (dtype, batch, 32) for dtype in ("float32", "bfloat16") for batch in (64, 256)
    }
    for cell in cells:
        assert cell["device"] == "cpu" and set(cell["median_s"]) == {"minc", "spectral", "infonce"}
        for name, ratio in cell["slowdown_vs_minc"].items():
            assert ratio == pytest.approx(cell["median_s"][name] / cell["median_s"]["minc"], rel=1e-12)


def quick_backbone() -> str:
    """ResNet-18 where torchvision imports; the quick run's fallback, the project's ConvNet, elsewhere."""
    return "resnet18" if gpu_check.torchvision_imports() else "convnet"


def test_quick_resnet_cells(quick: dict) -> None:
    (row,) = quick["ssl_step"]
    assert row["backbone"] == quick_backbone()
    assert (row["batch"], row["image_size"], row["dtype"], row["channels_last"]) == (16, 32, "bfloat16", True)
    for cell in row["losses"].values():
        assert len(cell["step_s"]) == len(cell["loss_s"]) == row["rounds"]
        assert 0 < cell["loss_share"] < 1
        assert cell["loss_share"] == pytest.approx(cell["median_loss_s"] / cell["median_step_s"], rel=1e-12)
        assert cell["images_per_s"] == pytest.approx(row["batch"] / cell["median_step_s"], rel=1e-12)
    steps = {name: cell["median_step_s"] for name, cell in row["losses"].items()}
    assert row["step_time_spectral_over_minc"] == pytest.approx(steps["spectral"] / steps["minc"], rel=1e-12)


def test_quick_ppo_rates(quick: dict) -> None:
    ppo = quick["ppo"]
    assert (ppo["game"], ppo["encoder"], ppo["n_envs"], ppo["n_steps"]) == ("procgen:starpilot", "impala", 2, 32)
    rates = ppo["median_steps_per_s"]
    assert set(rates) == set(ppo["steps_per_s"]) == {"stock", "none", "minc"}
    assert all(len(values) == 1 for values in ppo["steps_per_s"].values())
    assert set(ppo["steps_per_s_ratio"]) == {"minc/none", "none/stock", "minc/stock"}
    for pair, ratio in ppo["steps_per_s_ratio"].items():
        a, b = pair.split("/")
        assert ratio == pytest.approx(rates[a] / rates[b], rel=1e-12)


def test_without_a_gpu_it_exits_2_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = run_check("--out", str(out))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--quick" in lines[0]
    assert done.stdout == "" and not out.exists()

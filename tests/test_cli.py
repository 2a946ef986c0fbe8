"""The entry points' own --help (minc_rl.common.cli.help_text, composed once) says what Hydra's --help says."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from minc_rl import linear_eval, pretrain, train
from minc_rl.common.cli import help_text


@pytest.mark.parametrize(("entry", "hydra_app", "config_name", "args"), [
    (train, train.train, "config", ["--help"]),
    (train, train.train, "config", ["--help", "agent=dqn", "env=minatar:breakout"]),
    (pretrain, pretrain.hydra_main, "config", ["--help", "data=procgen"]),
    (linear_eval, linear_eval.hydra_main, "linear_eval", ["-h"]),
])  # fmt: skip
def test_help_text_is_hydras_help(entry, hydra_app, config_name, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [entry.__name__, *args])
    try:
        with pytest.raises(SystemExit) as exit_info:
            hydra_app()  # Hydra's app itself, without the entry point's fast path
    finally:
        GlobalHydra.instance().clear()
    assert exit_info.value.code == 0
    assert help_text(entry.CONFIG_DIR, config_name, args) + "\n" == capsys.readouterr().out


@pytest.mark.parametrize("args", [["--cfg", "job"], ["--help", "-m"], ["--hydra-help"], ["aux=minc"]])
def test_other_flags_are_left_to_hydra(args):
    assert help_text(train.CONFIG_DIR, "config", args) is None


def test_help_with_an_override_the_config_refuses_is_left_to_hydra():
    assert help_text(train.CONFIG_DIR, "config", ["--help", "agent.no_such_key=1"]) is None


def test_only_the_train_command_has_the_aux_group():
    """The aux group lives in Hydra's process-wide ConfigStore; pretrain's --help listed it (and took +aux=...)."""
    listed = {}
    for module in ("minc_rl.train", "minc_rl.pretrain"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        listed[module] = "aux: infonce, minc, none, selfpred, spectral" in done.stdout.splitlines()
    assert listed == {"minc_rl.train": True, "minc_rl.pretrain": False}

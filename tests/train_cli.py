"""How the train tests start minc_rl.train: the environment of its subprocesses, and main() in this process."""

from __future__ import annotations

import os
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from minc_rl import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_in_process(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """minc_rl.train.main() with `args` as its command line, in this process (cheaper than a subprocess)."""
    monkeypatch.setattr(sys, "argv", ["minc_rl.train", *args])
    try:
        train.main()
    finally:
        GlobalHydra.instance().clear()

"""minc_rl.envs: SB3 vector envs for procgen, Atari, MinAtar and gymnasium ids from one 'family:name' spec.

The names below are imported on first use: `minc_rl.envs.spec` (parse_spec, validate_spec) stays free of SB3 and
torch, so that minc_rl.train checks env= before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Distractors": "distractors",
    "MinAtarImage": "factory",
    "make_eval_env": "factory",
    "make_vec_env": "factory",
    "ProcgenVecEnv": "procgen_vec_env",
    "FAMILIES": "spec",
    "MINATAR_GAMES": "spec",
    "PROCGEN_GAMES": "spec",
    "parse_spec": "spec",
    "validate_spec": "spec",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, for tab completion."""
    return sorted({*globals(), *_HOMES})

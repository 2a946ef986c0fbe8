"""minc_rl: MINC (Mutual Information Non-Contrastive) representation learning for RL and image SSL."""

from __future__ import annotations

import contextlib
import io
from typing import Any

# procgen depends on legacy gym, and stable_baselines3 imports it whenever it is installed; its import
# prints a deprecation notice to stderr. Importing it once here, muted, keeps every minc_rl entry quiet.
with contextlib.suppress(ImportError), contextlib.redirect_stderr(io.StringIO()):
    import gym  # noqa: F401

__version__ = "0.1.0"
__all__ = ["EncoderHealth", "MincAuxCallback", "MincExtractor"]

_LAZY = {"MincExtractor": "minc_rl.extractor", "MincAuxCallback": "minc_rl.callback", "EncoderHealth": "minc_rl.health"}


def __getattr__(name: str) -> Any:
    """Import MincExtractor / MincAuxCallback / EncoderHealth on first use, so `import minc_rl` stays light (no torch, no SB3)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minc_rl' has no attribute {name!r}")

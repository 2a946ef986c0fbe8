"""minc_rl: MINC (Mutual Information Non-Contrastive) representation learning for RL and image SSL.

The package is a house of rooms, each a sub-package with one job. A room imports only the rooms listed before it
(tests/test_layout.py holds the house to this order, and to having no import circle):

    common    the ground floor: value checks with one-line errors, atomic file writes, the command-line
              checks every entry point shares, run-directory ownership (lock, fresh run, resume)
                                                                                        imports no room
    configs   Hydra YAML of train and pretrain (the top-level configs/ folder)          imports no room
    losses    the loss core: MINC, the spectral contrastive loss, InfoNCE; latent self-prediction's model and
              losses                                                                    imports common
    envs      procgen / Atari / MinAtar / gymnasium behind one spec (top-level envs/)   imports common
    ssl       representation learning on images: encoders and the encoder.pt format, backbones,
              augmentations, embedding metrics, data sets, linear evaluation, the pretraining run
                                                                      imports common, configs, losses, envs
    rl        under the SB3 agents: their settings (AuxConfig, encoder names; no torch), MincExtractor,
              EncoderHealth                                                 imports common, losses, ssl
    agents    MincPPO, MincDQN, MincAuxCallback, latent self-prediction: how the aux loss joins SB3
              (top-level agents/)                                           imports common, losses, ssl, rl
    runs      an RL training run and a study of runs: config checks (no torch), the run, its files and
              callbacks, the report                                         imports every room above
    atariari  AtariARI's linear probes of Atari RAM state for random, pretrained and agent encoders: the
              protocol, the batched probes, the probe run                   imports every room above

The entry points sit at the top, beside the rooms, and stay thin. `python -m minc_rl.train`, `.pretrain`,
`.linear_eval` and `.probe` answer --help and check their command line before torch is imported, then hand over to
runs.training, ssl.pretraining, ssl.linear_eval or atariari.run; `python -m minc_rl.report` is runs.report's command line.

Public names: minc_rl.losses, minc_rl.agents (MincPPO, MincDQN), minc_rl.envs, and here MincExtractor,
MincAuxCallback and EncoderHealth (imported on first use, so that `import minc_rl` stays light).
"""

from __future__ import annotations

import contextlib
from typing import Any

# procgen depends on legacy gym, which stable_baselines3 imports whenever it is installed, and gym's import prints a
# deprecation notice (the gym_notices package's table) to stderr. Emptying that table keeps every minc_rl entry quiet
# without importing gym here, which would cost a command-line error a third of a second.
with contextlib.suppress(ImportError):
    import gym_notices.notices

    gym_notices.notices.notices.clear()

__version__ = "0.1.0"
__all__ = ["EncoderHealth", "MincAuxCallback", "MincExtractor"]

_LAZY = {"MincExtractor": "minc_rl.rl.extractor", "MincAuxCallback": "minc_rl.agents.callback", "EncoderHealth": "minc_rl.rl.health"}


def __getattr__(name: str) -> Any:
    """Import MincExtractor / MincAuxCallback / EncoderHealth on first use, so `import minc_rl` stays light (no torch, no SB3)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minc_rl' has no attribute {name!r}")

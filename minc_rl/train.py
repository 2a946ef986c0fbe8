"""`python -m minc_rl.train env=procgen:coinrun aux=minc`: train a Stable-Baselines3 PPO or DQN agent with an
auxiliary representation loss (MINC, spectral contrastive, InfoNCE or latent self-prediction).

The entry point only. The command line is checked before Hydra starts, and the composed config inside the Hydra
app, before torch, SB3 or the agents are imported (minc_rl.runs.train_config): a typo, a bad value, a bad group
choice and --help answer in well under a second. Then minc_rl.runs.training runs it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minc_rl.common.cli import answer_help
from minc_rl.runs.train_config import CONFIG_DIR, check_command_line, checked_config


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run in Hydra's run directory; returns the summary."""
    started = time.time()
    cfg = checked_config(cfg)
    from minc_rl.runs.training import run  # torch, SB3 and the agents: only for a config that passed its checks

    return run(cfg, Path(HydraConfig.get().runtime.output_dir), started)


def main() -> None:
    """Console entry point."""
    sys.argv[1:] = check_command_line(sys.argv[1:])
    answer_help(CONFIG_DIR, "config", sys.argv[1:])
    train()


if __name__ == "__main__":
    main()

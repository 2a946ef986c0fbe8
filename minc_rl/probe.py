"""`python -m minc_rl.probe game=pong [encoder=<pretraining run(s)>] [agent=<train run(s)>]`: AtariARI's linear
probes of Atari RAM state for the baselines and the encoders named (minc_rl.atariari).

The entry point only: the command line is checked (minc_rl.common.cli) and Hydra answers --help before torch is
imported; the probes themselves are minc_rl.atariari.run.run.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from minc_rl.common.cli import answer_help, check_overrides
from minc_rl.configs import config_dir

PROGRAM = "minc_rl.probe"
CONFIG_DIR = config_dir("probe")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra's part: one game's probes in its run dir."""
    from hydra.core.hydra_config import HydraConfig

    from minc_rl.atariari.run import run

    run(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """`python -m minc_rl.probe game=pong`: the command line checked before Hydra starts."""
    answer_help(CONFIG_DIR, "config", sys.argv[1:])
    check_overrides(PROGRAM, sys.argv[1:], CONFIG_DIR, "config", groups=())
    hydra_main()


if __name__ == "__main__":
    main()

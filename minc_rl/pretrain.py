"""`python -m minc_rl.pretrain data=digits loss=minc`: image self-supervised pretraining (minc_rl.ssl.pretraining).

    torchrun --nproc_per_node=4 -m minc_rl.pretrain data=cifar10 data.root=/data/cifar backbone=resnet18

The entry point only: the command line is checked (minc_rl.common.cli) and Hydra answers --help before torch is
imported, so a typo costs a fraction of a second; the run itself is minc_rl.ssl.pretraining.run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from minc_rl.common.cli import answer_help, check_overrides
from minc_rl.configs import config_dir

PROGRAM = "minc_rl.pretrain"
CONFIG_DIR = config_dir("pretrain")

# hydra.run.dir in config.yaml: resume= continues in the run directory of the checkpoint it names.
OmegaConf.register_new_resolver(
    "minc_rl.pretrain_dir", lambda resume, fresh: (str(Path(resume).parent) if str(resume).endswith(".pt") else resume) if resume else fresh,
    replace=True,
)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra's part: one pretraining run (or one torchrun process of it) in its run dir."""
    from hydra.core.hydra_config import HydraConfig

    from minc_rl.ssl.pretraining import run

    run(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """`python -m minc_rl.pretrain data=digits loss=minc`, or under torchrun: the command line checked before Hydra."""
    answer_help(CONFIG_DIR, "config", sys.argv[1:])
    check_overrides(PROGRAM, sys.argv[1:], CONFIG_DIR, "config", groups=("data", "loss"))
    hydra_main()


if __name__ == "__main__":
    main()

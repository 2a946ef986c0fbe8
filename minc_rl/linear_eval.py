"""`python -m minc_rl.linear_eval checkpoint=runs/pretrain/<run>/checkpoint.pt [data.root=...] [epochs=90]`: the
paper's linear evaluation of a pretrained backbone (minc_rl.ssl.linear_eval).

The entry point only: the command line is checked (minc_rl.common.cli) and Hydra answers --help before torch is
imported; the evaluation itself is minc_rl.ssl.linear_eval.run.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from minc_rl.common.cli import answer_help, check_overrides
from minc_rl.configs import config_dir

PROGRAM = "minc_rl.linear_eval"
CONFIG_DIR = config_dir("pretrain")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="linear_eval")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra's part: one linear evaluation in its run dir."""
    from hydra.core.hydra_config import HydraConfig

    from minc_rl.ssl.linear_eval import run

    run(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """`python -m minc_rl.linear_eval checkpoint=<path>`: the command line checked before Hydra starts."""
    answer_help(CONFIG_DIR, "linear_eval", sys.argv[1:])
    check_overrides(PROGRAM, sys.argv[1:], CONFIG_DIR, "linear_eval", groups=(), required=("checkpoint",))
    hydra_main()


if __name__ == "__main__":
    main()

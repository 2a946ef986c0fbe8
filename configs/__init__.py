"""minc_rl.configs: the Hydra configs of minc_rl.train and minc_rl.pretrain.

The `aux` group of minc_rl.train (aux=none|minc|spectral|infonce|selfpred, AUX_GROUP_OPTIONS) lives in Hydra's
ConfigStore instead of a configs/train/aux/ folder: AUX is a reserved file name on Windows. minc_rl.runs.train_config
registers it, so that only the train command has it. Each option only sets aux.name; the aux settings themselves are
in configs/train/config.yaml.
"""

from pathlib import Path

AUX_GROUP_OPTIONS = ("none", "minc", "spectral", "infonce", "selfpred")


def config_dir(command: str) -> Path:
    """The folder of `command`'s Hydra configs ("train" or "pretrain"), found through this package, so that an
    editable install and a built wheel find the same files."""
    return Path(__file__).resolve().parent / command

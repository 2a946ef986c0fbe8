"""minc_rl.configs: the Hydra configs of minc_rl.train and minc_rl.pretrain.

The `aux` group of minc_rl.train (aux=none|minc|spectral|infonce|selfpred) is registered here in Hydra's ConfigStore
instead of a configs/train/aux/ folder: AUX is a reserved file name on Windows. Each option only sets aux.name;
the aux settings themselves are in configs/train/config.yaml.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore

AUX_GROUP_OPTIONS = ("none", "minc", "spectral", "infonce", "selfpred")

for _name in AUX_GROUP_OPTIONS:
    ConfigStore.instance().store(group="aux", name=_name, node={"name": _name})


def config_dir(command: str) -> Path:
    """The folder of `command`'s Hydra configs ("train" or "pretrain"), found through this package, so that an
    editable install and a built wheel find the same files."""
    return Path(__file__).resolve().parent / command

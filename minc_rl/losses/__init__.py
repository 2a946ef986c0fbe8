"""The loss core: MINC and its contrastive baselines, shared by the RL agents and image pretraining (latent
self-prediction's model and losses: minc_rl.losses.latent)."""

from __future__ import annotations

import inspect

from torch import nn

from minc_rl.common.checks import check_int
from minc_rl.losses.infonce import InfoNCELoss, info_nce_loss
from minc_rl.losses.minc import MINCLoss, minc_loss_given_cov, second_moment
from minc_rl.losses.spectral import SpectralContrastiveLoss, spectral_contrastive_loss

AUX_LOSSES = ("minc", "spectral", "infonce")
_LOSS_CLASSES: dict[str, type[nn.Module]] = {
    "minc": MINCLoss,
    "spectral": SpectralContrastiveLoss,
    "infonce": InfoNCELoss,
}


def build_aux_loss(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the loss called `name` ("minc", "spectral" or "infonce") for embeddings of size `dim`.

    kwargs go to the loss's constructor: ema, lower_triangular, symmetric, normalize, asymmetric (minc), mu (spectral),
    temperature (infonce), gather_distributed (all); an option the loss does not take is a ValueError.
    """
    if not isinstance(name, str) or name not in _LOSS_CLASSES:
        raise ValueError(f"unknown aux loss {name!r}; valid names: {', '.join(AUX_LOSSES)}")
    check_int("dim", dim, 1)
    loss_class = _LOSS_CLASSES[name]
    options = [p for p in inspect.signature(loss_class.__init__).parameters if p not in ("self", "dim")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"aux loss {name!r} does not take {unknown}; its options are {options}")
    return loss_class(dim, **kwargs) if loss_class is MINCLoss else loss_class(**kwargs)


__all__ = [
    "AUX_LOSSES",
    "InfoNCELoss",
    "MINCLoss",
    "SpectralContrastiveLoss",
    "build_aux_loss",
    "info_nce_loss",
    "minc_loss_given_cov",
    "second_moment",
    "spectral_contrastive_loss",
]

"""The loss core: MINC and its contrastive baselines, shared by the RL agents and image pretraining."""

from __future__ import annotations

from torch import nn

from minc_rl.losses.infonce import InfoNCELoss, info_nce_loss
from minc_rl.losses.minc import MINCLoss, minc_loss_given_cov, second_moment
from minc_rl.losses.spectral import SpectralContrastiveLoss, spectral_contrastive_loss

AUX_LOSSES = ("minc", "spectral", "infonce")


def build_aux_loss(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the loss called `name` ("minc", "spectral" or "infonce") for embeddings of size `dim`.

    kwargs go to the loss's constructor: ema, lower_triangular, symmetric (minc), mu (spectral),
    temperature (infonce), gather_distributed (all).
    """
    if name == "minc":
        return MINCLoss(dim, **kwargs)
    if name == "spectral":
        return SpectralContrastiveLoss(**kwargs)
    if name == "infonce":
        return InfoNCELoss(**kwargs)
    raise ValueError(f"unknown aux loss {name!r}; valid names: {', '.join(AUX_LOSSES)}")


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

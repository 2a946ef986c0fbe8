"""Spectral Contrastive Loss (HaoChen et al. 2021), as in the authors' official code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minc_rl.common.checks import check_bool, check_positive
from minc_rl.losses._common import check_pair, distributed_world, gather_with_grad


def clip_to_sphere(z: torch.Tensor, mu: float) -> torch.Tensor:
    """Rescale rows whose norm exceeds sqrt(mu) onto the sphere of radius sqrt(mu)."""
    radius = math.sqrt(mu)
    inside = (z.norm(dim=1, keepdim=True) < radius).to(z.dtype)
    return inside * z + (1 - inside) * F.normalize(z, dim=1) * radius


def spectral_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, mu: float = 1.0, gather_distributed: bool = False
) -> torch.Tensor:
    """( -(2/B) sum_i a_i.b_i + 1/(B(B-1)) sum_{i != j} (a_i.b_j)^2 ) / mu after row clipping.

    With `gather_distributed`, each rank's rows are compared with the b of every rank; the
    per-rank losses are scaled so that DDP's gradient average equals the global-batch gradient.
    """
    check_pair(a, b, "spectral_contrastive_loss")
    check_positive("spectral_contrastive_loss mu", mu)
    a, b = clip_to_sphere(a.float(), mu), clip_to_sphere(b.float(), mu)
    rank, world = distributed_world() if gather_distributed else (0, 1)
    local = a.shape[0]
    b_all = gather_with_grad(b) if world > 1 else b
    total = b_all.shape[0]
    squares = (a @ b_all.T) ** 2
    own = torch.arange(local, device=a.device)
    off_diagonal = squares.sum() - squares[own, own + rank * local].sum()
    positive = (a * b).sum()
    return (-2.0 * positive / local + off_diagonal / (local * (total - 1))) / mu


class SpectralContrastiveLoss(nn.Module):
    """nn.Module wrapper of `spectral_contrastive_loss` (cost O(B^2 d))."""

    def __init__(self, mu: float = 1.0, gather_distributed: bool = False) -> None:
        super().__init__()
        check_positive("SpectralContrastiveLoss mu", mu)
        check_bool("SpectralContrastiveLoss gather_distributed", gather_distributed)
        self.mu = mu
        self.gather_distributed = gather_distributed

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The spectral contrastive loss of the pair batch (a, b)."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            return spectral_contrastive_loss(a, b, self.mu, self.gather_distributed)

"""InfoNCE / NT-Xent (SimCLR, CURL): the contrastive baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minc_rl.common.checks import check_bool, check_positive
from minc_rl.losses._common import check_pair, distributed_world, gather_with_grad


def info_nce_loss(
    a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1, gather_distributed: bool = False
) -> torch.Tensor:
    """NT-Xent over both directions: each of the 2B views must pick its partner among the 2B - 1 others."""
    check_pair(a, b, "info_nce_loss")
    check_positive("info_nce_loss temperature", temperature)
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    rank, world = distributed_world() if gather_distributed else (0, 1)
    local = a.shape[0]
    a_all, b_all = (gather_with_grad(a), gather_with_grad(b)) if world > 1 else (a, b)
    total = a_all.shape[0]
    logits = torch.cat([a, b]) @ torch.cat([a_all, b_all]).T / temperature
    own = torch.arange(local, device=a.device) + rank * local
    self_index = torch.cat([own, own + total])
    partner_index = torch.cat([own + total, own])
    rows = torch.arange(2 * local, device=a.device)
    logits[rows, self_index] = float("-inf")
    return F.cross_entropy(logits, partner_index)


class InfoNCELoss(nn.Module):
    """nn.Module wrapper of `info_nce_loss`."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        check_positive("InfoNCELoss temperature", temperature)
        check_bool("InfoNCELoss gather_distributed", gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The NT-Xent loss of the pair batch (a, b)."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            return info_nce_loss(a, b, self.temperature, self.gather_distributed)

"""MINC: the spectral contrastive loss with its pairwise term replaced by an EMA second-moment matrix Lambda."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minc_rl.losses._common import check_pair, distributed_world


def second_moment(a: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i a_i a_i^T in float32, without gradient."""
    a = a.detach().float()
    return a.T @ a / a.shape[0]


def minc_loss_given_cov(
    a: torch.Tensor, b: torch.Tensor, cov: torch.Tensor, lower_triangular: bool = True
) -> torch.Tensor:
    """One direction l(a, b) of MINC for a fixed Lambda `cov`.

    Value: -(2/B) sum_i a_i.b_i + (1/B) sum_i a_i^T Lambda a_i (the SCL estimate).
    Gradient: dl/da_i = -(2/B) (b_i - M a_i) with M = tril(Lambda) or Lambda, and none into b or cov.
    """
    a32, b32, cov = a.float(), b.detach().float(), cov.detach().float()
    batch = a32.shape[0]
    value = (-2.0 * (a32 * b32).sum() + ((a32 @ cov) * a32).sum()).detach() / batch
    mixing = torch.tril(cov) if lower_triangular else cov
    pull = (b32 - a32.detach() @ mixing.T).detach()  # b_i - M a_i
    surrogate = -2.0 * (a32 * pull).sum() / batch
    return value + surrogate - surrogate.detach()


class MINCLoss(nn.Module):
    """Mutual Information Non-Contrastive loss (Guo et al. 2025) with a bias-corrected EMA Lambda.

    With `normalize=True` (default) each row of a and b is first projected onto the unit sphere,
    a_hat = a / ||a||, as the spectral loss's official code does with mu = 1 for rows outside the ball; the
    contract below then holds for (a_hat, b_hat), and autograd carries dl/da_hat through the projection. So the
    value stays in [-2, 1] and the gradient O(1) whatever the dimension d, and shrinking the embeddings cannot
    lower the loss (the collapse the unnormalised loss allowed: embeddings -> 0, Lambda -> 0). Lambda is then
    the second moment of the unit rows (trace 1). `normalize=False` is the poster's loss on raw embeddings.

    Lambda_t = S_t / (1 - (1 - ema)^t), S_t = (1 - ema) S_{t-1} + ema * C_batch, where C_batch is the
    batch second moment of the embeddings (both views when symmetric), all-reduced under DDP when
    `gather_distributed=True`. The current batch is folded in before the loss; Lambda only moves in
    training mode. A batch with a non-finite value leaves Lambda untouched, increments `skipped`
    and returns a NaN loss that the caller must drop (check `torch.isfinite`).
    """

    def __init__(
        self,
        dim: int,
        ema: float = 0.2,
        lower_triangular: bool = True,
        symmetric: bool = True,
        gather_distributed: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"MINCLoss dim must be a positive integer; got {dim!r}")
        if not 0.0 < float(ema) <= 1.0:
            raise ValueError(f"MINCLoss ema must be in (0, 1]; got {ema!r}")
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build lacks")
        self.dim = dim
        self.ema = float(ema)
        self.lower_triangular = lower_triangular
        self.symmetric = symmetric
        self.gather_distributed = gather_distributed
        self.normalize = normalize
        self.register_buffer("ema_sum", torch.zeros(dim, dim, dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, ema={self.ema}, lower_triangular={self.lower_triangular}, "
            f"symmetric={self.symmetric}, gather_distributed={self.gather_distributed}, normalize={self.normalize}"
        )

    @property
    def cov(self) -> torch.Tensor:
        """The bias-corrected Lambda (d x d, float32); zeros before the first training step."""
        if int(self.steps) == 0:
            return torch.zeros_like(self.ema_sum)
        return self.ema_sum / (1.0 - (1.0 - self.ema) ** int(self.steps))

    def _batch_moment(self, a: torch.Tensor, b: torch.Tensor, all_reduce: bool) -> torch.Tensor:
        """C_batch (mean over ranks when `all_reduce`); all NaN when a or b holds a non-finite value."""
        moment = (second_moment(a) + second_moment(b)) / 2 if self.symmetric else second_moment(a)
        if not self.symmetric and not torch.isfinite(b).all():
            moment.fill_(float("nan"))  # b is not in the moment, but a batch with a bad b must be skipped too
        _, world = distributed_world()
        if all_reduce and self.gather_distributed and world > 1:
            dist.all_reduce(moment, op=dist.ReduceOp.SUM)  # a NaN on one rank makes every rank skip
            moment /= world
        return moment

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The MINC loss of embeddings a = phi(x), b = phi(x') (to minimise)."""
        check_pair(a, b, "MINCLoss")
        if a.shape[1] != self.dim:
            raise ValueError(
                f"MINCLoss was built for dim={self.dim}; got embeddings of shape {tuple(a.shape)}"
            )
        with torch.autocast(device_type=a.device.type, enabled=False):
            if self.normalize:
                a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
            if self.training:
                moment = self._batch_moment(a, b, all_reduce=True)  # every rank joins, finite or not
                if not torch.isfinite(moment).all():
                    self.skipped += 1
                    return torch.full((), float("nan"), device=a.device)
                self.ema_sum.mul_(1.0 - self.ema).add_(moment, alpha=self.ema)
                self.steps += 1
                cov = self.cov
            else:
                # no collective in eval mode: ranks may evaluate alone
                cov = self.cov if int(self.steps) > 0 else self._batch_moment(a, b, all_reduce=False)
            loss = minc_loss_given_cov(a, b, cov, self.lower_triangular)
            if self.symmetric:
                loss = (loss + minc_loss_given_cov(b, a, cov, self.lower_triangular)) / 2
        return loss

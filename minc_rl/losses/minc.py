"""MINC: the spectral contrastive loss with its pairwise term replaced by an EMA second-moment matrix Lambda."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minc_rl.common.checks import check_bool, check_fraction, check_int
from minc_rl.losses._common import check_pair, distributed_world


def second_moment(a: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i a_i a_i^T in float32, without gradient."""
    a = a.detach().float()
    return a.T @ a / a.shape[0]


class _MincDirection(torch.autograd.Function):
    """MINC's value and its GHA gradient in one graph node: a handful of kernels, where autograd through a surrogate
    took dozens (the aux step of an agent runs it on a few dozen rows, where each kernel's fixed cost is the cost)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor, cov: torch.Tensor,
                lower_triangular: bool) -> torch.Tensor:
        a32, b32, cov = a.detach().float(), b.detach().float(), cov.detach().float()
        batch = a32.shape[0]
        mixing = torch.tril(cov) if lower_triangular else cov
        a_cov, a_mixed = (a32 @ torch.cat([cov, mixing.T], dim=1)).tensor_split(2, dim=1)  # a Lambda, a M^T: one matmul
        ctx.save_for_backward((a_mixed - b32).mul_(2.0 / batch))  # dl/da_i = -(2/B) (b_i - M a_i)
        ctx.dtype = a.dtype
        return (a32 * (a_cov - 2.0 * b32)).sum() / batch

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_a,) = ctx.saved_tensors
        return (grad * grad_a).to(ctx.dtype), None, None, None


def minc_loss_given_cov(
    a: torch.Tensor, b: torch.Tensor, cov: torch.Tensor, lower_triangular: bool = True
) -> torch.Tensor:
    """One direction l(a, b) of MINC for a fixed Lambda `cov`.

    Value: -(2/B) sum_i a_i.b_i + (1/B) sum_i a_i^T Lambda a_i (the SCL estimate).
    Gradient: dl/da_i = -(2/B) (b_i - M a_i) with M = tril(Lambda) or Lambda, and none into b or cov.
    """
    return _MincDirection.apply(a, b, cov, lower_triangular)


class MINCLoss(nn.Module):
    """Mutual Information Non-Contrastive loss (Guo et al. 2025) with a bias-corrected EMA Lambda.

    With `normalize=True` (default) each row of a and b is first projected onto the unit sphere,
    a_hat = a / ||a||, as the spectral loss's official code does with mu = 1 for rows outside the ball; the
    contract below then holds for (a_hat, b_hat), and autograd carries dl/da_hat through the projection. So the
    value stays in [-2, 3] and the gradient O(1) whatever the dimension d, and shrinking the embeddings cannot
    lower the loss (the collapse the unnormalised loss allowed: embeddings -> 0, Lambda -> 0). Lambda is then
    the second moment of the unit rows (trace 1). `normalize=False` is the poster's loss on raw embeddings.

    Lambda_t = S_t / (1 - (1 - ema)^t), S_t = (1 - ema) S_{t-1} + ema * C_batch, where C_batch is the
    batch second moment of the embeddings (both views when symmetric), all-reduced under DDP when
    `gather_distributed=True`. The current batch is folded in before the loss; Lambda only moves in
    training mode. A batch with a non-finite value leaves Lambda untouched, increments `skipped`
    and returns a NaN loss that the caller must drop (check `torch.isfinite`).

    `asymmetric=True` is for views from different functions, a = phi(s, a_t) and b = mu(s') (SPEDER's
    P(s'|s,a) = <phi(s,a), mu(s')>). Two Lambdas follow the rule above: `cov` = Lambda_a from a's second moment
    only and `cov_b` = Lambda_b from b's only (buffers `ema_sum`, `ema_sum_b`; one skip decides both). Each view
    is pulled with the OTHER view's Lambda: direction a is l(a, b) with Lambda_b, dl/da_i = -(2/B)(b_i - M_b a_i),
    direction b is l(b, a) with Lambda_a; no gradient into the other view or into either Lambda. Each value is
    the SCL plug-in estimate -(2/B) sum_i a_i.b_i + tr(C_a Lambda_b). `symmetric=True` averages the directions,
    `symmetric=False` keeps direction a only (b gets no gradient). With tril (GHA) the pull on coordinate k of phi
    (or of mu) involves only coordinates j <= k of both views (nested deflation), so (phi_k, mu_k) tend to the
    k-th left/right singular pair of the operator, in decreasing singular value; shared views give its eigenpairs.
    """

    def __init__(
        self,
        dim: int,
        ema: float = 0.2,
        lower_triangular: bool = True,
        symmetric: bool = True,
        gather_distributed: bool = False,
        normalize: bool = True,
        asymmetric: bool = False,
    ) -> None:
        super().__init__()
        check_int("MINCLoss dim", dim, 1)
        check_fraction("MINCLoss ema", ema)
        for name, flag in (("lower_triangular", lower_triangular), ("symmetric", symmetric),
                           ("gather_distributed", gather_distributed), ("normalize", normalize),
                           ("asymmetric", asymmetric)):
            check_bool(f"MINCLoss {name}", flag)
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build lacks")
        self.dim = int(dim)
        self.ema = float(ema)
        self.lower_triangular = lower_triangular
        self.symmetric = symmetric
        self.gather_distributed = gather_distributed
        self.normalize = normalize
        self.asymmetric = asymmetric
        self.register_buffer("ema_sum", torch.zeros(dim, dim, dtype=torch.float32))
        if asymmetric:
            self.register_buffer("ema_sum_b", torch.zeros(dim, dim, dtype=torch.float32))
        # float counters (exact to 2^53): a state_dict of floats only, which code that treats every entry as a float
        # tensor (SB3's save/load tests draw torch.rand_like of each) can take
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.float64))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, ema={self.ema}, lower_triangular={self.lower_triangular}, "
            f"symmetric={self.symmetric}, gather_distributed={self.gather_distributed}, normalize={self.normalize}, "
            f"asymmetric={self.asymmetric}"
        )

    def _bias_corrected(self, ema_sum: torch.Tensor) -> torch.Tensor:
        """S_t / (1 - (1 - ema)^t); zeros before the first training step."""
        if int(self.steps) == 0:
            return torch.zeros_like(ema_sum)
        return ema_sum / (1.0 - (1.0 - self.ema) ** int(self.steps))

    @property
    def cov(self) -> torch.Tensor:
        """The bias-corrected Lambda (of view a when asymmetric; d x d, float32); zeros before the first step."""
        return self._bias_corrected(self.ema_sum)

    @property
    def cov_b(self) -> torch.Tensor:
        """The Lambda that pulls view a: Lambda_b of view b when asymmetric, else the shared `cov`."""
        return self._bias_corrected(self.ema_sum_b) if self.asymmetric else self.cov

    def _ema_sums(self) -> tuple[torch.Tensor, ...]:
        """The EMA buffers in the order of `_batch_moments`: (ema_sum, ema_sum_b) when asymmetric, else (ema_sum,)."""
        return (self.ema_sum, self.ema_sum_b) if self.asymmetric else (self.ema_sum,)

    def _batch_moments(self, a: torch.Tensor, b: torch.Tensor, all_reduce: bool) -> torch.Tensor:
        """C_batch per EMA buffer, stacked (mean over ranks when `all_reduce`); all NaN when a or b is non-finite."""
        if self.asymmetric:
            moments = torch.stack([second_moment(a), second_moment(b)])
        elif self.symmetric:
            moments = second_moment(torch.cat([a, b]))[None]  # the mean of the two views' moments
        else:
            moments = second_moment(a)[None]
            if not torch.isfinite(b).all():
                moments.fill_(float("nan"))  # b is not in the moment, but a batch with a bad b must be skipped too
        _, world = distributed_world()
        if all_reduce and self.gather_distributed and world > 1:
            dist.all_reduce(moments, op=dist.ReduceOp.SUM)  # a NaN on one rank makes every rank skip
            moments /= world
        return moments

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The MINC loss of embeddings a = phi(x), b = phi(x') (or b = mu(x') when asymmetric; to minimise)."""
        check_pair(a, b, "MINCLoss")
        if a.shape[1] != self.dim:
            raise ValueError(
                f"MINCLoss was built for dim={self.dim}; got embeddings of shape {tuple(a.shape)}"
            )
        with torch.autocast(device_type=a.device.type, enabled=False):
            if self.normalize:
                a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
            if self.training:
                moments = self._batch_moments(a, b, all_reduce=True)  # every rank joins, finite or not
                if not torch.isfinite(moments).all():
                    self.skipped += 1
                    return torch.full((), float("nan"), device=a.device)
                for ema_sum, moment in zip(self._ema_sums(), moments):
                    ema_sum.mul_(1.0 - self.ema).add_(moment, alpha=self.ema)
                self.steps += 1
            if self.training or int(self.steps) > 0:
                covs = (self.cov, self.cov_b) if self.asymmetric else (self.cov,)
            else:  # eval before any training step: this batch's moments, no collective (ranks may evaluate alone)
                covs = tuple(self._batch_moments(a, b, all_reduce=False))
            cov_a, cov_b = covs[0], covs[-1]
            if self.symmetric and not self.asymmetric:  # both directions share Lambda: one call on the stacked views
                # l([a; b], [b; a]) over 2B rows is (l(a, b) + l(b, a)) / 2, value and gradient
                return minc_loss_given_cov(torch.cat([a, b]), torch.cat([b, a]), cov_a, self.lower_triangular)
            loss = minc_loss_given_cov(a, b, cov_b, self.lower_triangular)
            if self.symmetric:
                loss = (loss + minc_loss_given_cov(b, a, cov_a, self.lower_triangular)) / 2
        return loss

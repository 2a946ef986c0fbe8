"""Collapse and health monitors for embeddings and MINC's Lambda."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from minc_rl.common.checks import check_nonnegative
from minc_rl.losses import MINCLoss


def described(value: Any) -> str:
    """A tensor's shape, or what else `value` is, for an error message."""
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_rows(name: str, z: Any, rows: int) -> None:
    """Raise ValueError unless `z` is a 2-D tensor (n, d) of at least `rows` rows."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] < rows:
        raise ValueError(f"{name} takes a 2-D tensor (n, d) of at least {rows} rows; got {described(z)}")


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe effective rank (Garrido et al. 2023): exp of the entropy of the normalised singular values.

    NaN for embeddings with a non-finite value (the SVD would raise), so a health log never crashes training.
    """
    check_rows("rankme", z, 1)
    z = z.detach().float()
    if not torch.isfinite(z).all():
        return float("nan")
    singular = torch.linalg.svdvals(z)
    p = singular / (singular.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def srank(z: torch.Tensor, delta: float = 0.01) -> float:
    """Kumar et al. 2021's srank: the smallest k whose top-k singular values hold 1 - delta of their sum.

    0 for all-zero features (no direction at all); NaN for features with a non-finite value, as rankme.
    """
    check_rows("srank", z, 1)
    if not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"srank delta must be in (0, 1); got {delta!r}")
    z = z.detach().double()
    if not torch.isfinite(z).all():
        return float("nan")
    singular = torch.linalg.svdvals(z)
    total = singular.sum()
    if total == 0:
        return 0.0
    return float(int((singular.cumsum(0) < (1.0 - delta) * total).sum()) + 1)


@torch.no_grad()
def dormant_fraction(activations: torch.Tensor, tau: float = 0.025) -> float:
    """ReDo's dormant-unit fraction (Sokar et al. 2023) of one layer's output (N, units, ...): a unit (a channel of a
    convolution) is dormant when its mean |activation| over the batch (and positions) is <= tau times the layer's
    mean over units. A layer whose every unit is silent is all dormant."""
    if not isinstance(activations, torch.Tensor) or activations.dim() < 2 or activations.shape[0] < 1:
        raise ValueError(f"dormant_fraction takes a layer's output (N, units, ...) of N >= 1 rows; got "
                         f"{described(activations)}")
    check_nonnegative("dormant_fraction tau", tau)
    rows_and_positions = [dim for dim in range(activations.dim()) if dim != 1]
    score = activations.detach().abs().mean(dim=rows_and_positions, dtype=torch.float64)
    return float((score <= tau * score.mean()).double().mean())


@torch.no_grad()
def feature_norm(z: torch.Tensor) -> float:
    """Mean L2 norm of the rows of z."""
    check_rows("feature_norm", z, 1)
    return float(torch.linalg.vector_norm(z.detach().double(), dim=1).mean())


@torch.no_grad()
def normalized_embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised embeddings; ~1/sqrt(d) healthy, 0 collapsed."""
    check_rows("normalized_embedding_std", z, 2)
    return float(F.normalize(z.detach().float(), dim=1).std(dim=0).mean())


@torch.no_grad()
def lambda_eigenvalues(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric matrix Lambda, largest first."""
    return torch.linalg.eigvalsh(cov.detach().float()).flip(0)


@torch.no_grad()
def offdiagonal_ratio(cov: torch.Tensor) -> float:
    """||Lambda - diag(Lambda)||_F / ||Lambda||_F: 0 when the features are orthogonal."""
    cov = cov.detach().float()
    total = torch.linalg.matrix_norm(cov)
    if total == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(cov - torch.diag(torch.diagonal(cov))) / total)


def embedding_health(z: torch.Tensor, loss: torch.nn.Module | None = None) -> dict[str, float]:
    """Health metrics of a batch of embeddings, plus Lambda's when `loss` is a MINCLoss."""
    check_rows("embedding_health", z, 2)
    metrics = {"rankme": rankme(z), "embedding_std": normalized_embedding_std(z)}
    if isinstance(loss, MINCLoss):
        cov = loss.cov
        eigenvalues = lambda_eigenvalues(cov)
        metrics.update(
            lambda_offdiag_ratio=offdiagonal_ratio(cov),
            lambda_eig_max=float(eigenvalues[0]),
            lambda_eig_min=float(eigenvalues[-1]),
            skipped_batches=float(loss.skipped),
        )
    return metrics

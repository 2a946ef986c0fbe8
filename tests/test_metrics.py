"""Health metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from minc_rl.losses import MINCLoss, SpectralContrastiveLoss
from minc_rl.ssl.metrics import (
    dormant_fraction,
    embedding_health,
    feature_norm,
    lambda_eigenvalues,
    normalized_embedding_std,
    offdiagonal_ratio,
    rankme,
    srank,
)


def with_singular_values(values: list[float], rows: int = 12, seed: int = 0) -> torch.Tensor:
    """A (rows x len(values)) matrix whose singular values are exactly `values`."""
    g = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return (left @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ right.T).float()


@pytest.mark.parametrize(
    ("spectrum", "expected"),
    [
        ([2.0, 2.0, 2.0, 2.0], 4.0),  # flat spectrum: full rank
        ([3.0, 1.0], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),  # p = (3/4, 1/4): 1.7548
        ([5.0, 0.0, 0.0], 1.0),  # rank one
    ],
)
def test_rankme_of_known_spectrum(spectrum: list[float], expected: float) -> None:
    assert rankme(with_singular_values(spectrum)) == pytest.approx(expected, rel=1e-4)


def test_rankme_is_nan_for_non_finite_embeddings() -> None:
    z = torch.randn(8, 4)
    z[2, 1] = float("nan")
    assert math.isnan(rankme(z))


def test_normalized_embedding_std() -> None:
    # rows are unit vectors; each column is (1, 0, 1, 0) or (0, 1, 0, 1): unbiased std sqrt(1/3)
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 0.0], [0.0, 7.0]])
    assert normalized_embedding_std(z) == pytest.approx(math.sqrt(1 / 3), rel=1e-6)
    collapsed = torch.tensor([[1.0, 2.0]]).repeat(5, 1) * torch.arange(1.0, 6.0)[:, None]  # same direction
    assert normalized_embedding_std(collapsed) == pytest.approx(0.0, abs=1e-7)


def test_lambda_eigenvalues_largest_first() -> None:
    assert_close(lambda_eigenvalues(torch.tensor([[2.0, 1.0], [1.0, 2.0]])), torch.tensor([3.0, 1.0]))
    assert_close(lambda_eigenvalues(torch.diag(torch.tensor([1.0, 5.0, 3.0]))), torch.tensor([5.0, 3.0, 1.0]))


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        ([[2.0, 1.0], [1.0, 2.0]], math.sqrt(2 / 10)),  # off-diagonal norm sqrt(2), total sqrt(10)
        ([[3.0, 0.0], [0.0, 1.0]], 0.0),  # orthogonal features
        ([[0.0, 1.0], [1.0, 0.0]], 1.0),
        ([[0.0, 0.0], [0.0, 0.0]], 0.0),  # nothing yet: no division by zero
    ],
)
def test_offdiagonal_ratio(matrix: list[list[float]], expected: float) -> None:
    assert offdiagonal_ratio(torch.tensor(matrix)) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_embedding_health_with_minc_reports_lambda() -> None:
    loss_fn = MINCLoss(2, ema=1.0, symmetric=False, normalize=False)
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 1.0]])
    loss_fn(a, a)  # Lambda = a^T a / 4 = [[2, 1], [1, 1.5]]
    loss_fn(torch.full((4, 2), float("nan")), a)
    health = embedding_health(a, loss_fn)
    eig_max, eig_min = (3.5 + math.sqrt(0.25 + 4)) / 2, (3.5 - math.sqrt(0.25 + 4)) / 2
    assert health["lambda_eig_max"] == pytest.approx(eig_max, rel=1e-6)
    assert health["lambda_eig_min"] == pytest.approx(eig_min, rel=1e-6)
    assert health["lambda_offdiag_ratio"] == pytest.approx(math.sqrt(2 / (4 + 2.25 + 2)), rel=1e-6)
    assert health["skipped_batches"] == 1.0
    assert health["rankme"] == pytest.approx(rankme(a)) and health["embedding_std"] == normalized_embedding_std(a)


def test_embedding_health_without_minc_has_only_embedding_metrics() -> None:
    z = with_singular_values([1.0, 1.0, 1.0])
    assert set(embedding_health(z)) == {"rankme", "embedding_std"}
    assert set(embedding_health(z, SpectralContrastiveLoss())) == {"rankme", "embedding_std"}
    assert embedding_health(z)["rankme"] == pytest.approx(3.0, rel=1e-4)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: embedding_health(torch.randn(4, 5, 8)), r"embedding_health takes a 2-D tensor \(n, d\) of at least 2 rows; "
                                                     r"got shape \(4, 5, 8\)"),  # it read a rank of 18 in d = 8
    (lambda: embedding_health(torch.randn(1, 8)), r"at least 2 rows; got shape \(1, 8\)"),  # its std is NaN
    (lambda: embedding_health(np.ones((4, 8))), r"got ndarray"),
    (lambda: srank(torch.randn(8)), r"srank takes a 2-D tensor \(n, d\) of at least 1 rows; got shape \(8,\)"),
    (lambda: srank(torch.randn(4, 8), delta=1.5), r"srank delta must be in \(0, 1\); got 1.5"),
    (lambda: rankme(torch.randn(2, 3, 4)), r"rankme takes a 2-D tensor"),
    (lambda: feature_norm(torch.randn(8)), r"feature_norm takes a 2-D tensor"),
    (lambda: dormant_fraction(torch.randn(8)), r"dormant_fraction takes a layer's output \(N, units, ...\) of N >= 1 "
                                               r"rows; got shape \(8,\)"),
    (lambda: dormant_fraction(torch.randn(0, 8)), r"got shape \(0, 8\)"),
    (lambda: dormant_fraction(torch.randn(4, 8), tau=-1), r"dormant_fraction tau must be a finite number >= 0; got -1"),
])
def test_metrics_refuse_what_they_would_misread(call, message):
    with pytest.raises(ValueError, match=message):
        call()

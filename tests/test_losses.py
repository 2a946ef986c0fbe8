"""The loss core against DESIGN.md section 2: values, the MINC gradient contract, Lambda's EMA, GHA ordering."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minc_rl.losses import (
    AUX_LOSSES,
    InfoNCELoss,
    MINCLoss,
    SpectralContrastiveLoss,
    build_aux_loss,
    info_nce_loss,
    spectral_contrastive_loss,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_pair(batch: int = 16, dim: int = 5, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(batch, dim, generator=g, dtype=torch.float64).float()
    b = scale * torch.randn(batch, dim, generator=g, dtype=torch.float64).float()
    return a.requires_grad_(), b.requires_grad_()


# ---------------------------------------------------------------- spectral contrastive loss


def official_spectral(z1: torch.Tensor, z2: torch.Tensor, mu: float = 1.0) -> torch.Tensor:
    """HaoChen et al.'s `D(z1, z2, mu)` (models/spectral.py of their code), written out as they wrote it."""
    mask1 = (torch.norm(z1, p=2, dim=1) < math.sqrt(mu)).float().unsqueeze(1)
    mask2 = (torch.norm(z2, p=2, dim=1) < math.sqrt(mu)).float().unsqueeze(1)
    z1 = mask1 * z1 + (1 - mask1) * F.normalize(z1, dim=1) * math.sqrt(mu)
    z2 = mask2 * z2 + (1 - mask2) * F.normalize(z2, dim=1) * math.sqrt(mu)
    loss_part1 = -2 * torch.mean(z1 * z2) * z1.shape[1]
    square_term = torch.matmul(z1, z2.T) ** 2
    loss_part2 = (
        torch.mean(torch.triu(square_term, diagonal=1) + torch.tril(square_term, diagonal=-1))
        * z1.shape[0]
        / (z1.shape[0] - 1)
    )
    return (loss_part1 + loss_part2) / mu


@pytest.mark.parametrize(
    ("mu", "expected"),
    [
        # a_0 = (2, 0) is clipped to (1, 0) at mu=1; positives 0.6 + 0.5; one off-diagonal square 0.4^2 over B(B-1)=2
        (1.0, -1.1 + 0.16 / 2),
        # radius 2: a_0 stays; positives 1.2 + 0.5; same off-diagonal; divided by mu
        (4.0, (-1.7 + 0.16 / 2) / 4),
    ],
)
def test_spectral_hand_computed(mu: float, expected: float) -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert_close(spectral_contrastive_loss(a, b, mu=mu), torch.tensor(expected))
    assert_close(SpectralContrastiveLoss(mu=mu)(a, b), torch.tensor(expected))


@pytest.mark.parametrize("mu", [1.0, 4.0, 25.0])
def test_spectral_matches_official_code_value_and_gradient(mu: float) -> None:
    a, b = random_pair(batch=12, dim=6, seed=1, scale=1.5)  # rows on both sides of sqrt(mu)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ours = spectral_contrastive_loss(a, b, mu=mu)
    reference = official_spectral(a_ref, b_ref, mu=mu)
    assert_close(ours, reference)
    ours.backward()
    reference.backward()
    assert_close(a.grad, a_ref.grad)
    assert_close(b.grad, b_ref.grad)


def test_spectral_clipping_is_active_in_the_test_data() -> None:
    a, _ = random_pair(batch=12, dim=6, seed=1, scale=1.5)
    norms = a.detach().norm(dim=1)
    assert (norms > 2.0).any() and (norms < 2.0).any()  # mu=4 clips some rows and keeps others


# ---------------------------------------------------------------- InfoNCE


def nt_xent_loop(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written as a loop: every view must pick its partner among the 2B - 1 others."""
    views = F.normalize(torch.cat([a, b]), dim=1)
    n = views.shape[0]
    batch = n // 2
    total = torch.zeros(())
    for i in range(n):
        partner = (i + batch) % n
        sims = [views[i] @ views[k] / temperature for k in range(n) if k != i]
        total = total - (views[i] @ views[partner] / temperature - torch.logsumexp(torch.stack(sims), 0))
    return total / n


def test_infonce_hand_computed() -> None:
    # orthonormal pairs at temperature 1: each view sees its partner at 1 and two others at 0
    eye = torch.eye(2)
    assert_close(info_nce_loss(eye, eye.clone(), temperature=1.0), torch.tensor(math.log(1 + 2 / math.e)))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_infonce_matches_loop_formula(temperature: float) -> None:
    a, b = random_pair(batch=6, dim=4, seed=2)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ours = InfoNCELoss(temperature)(a, b)
    reference = nt_xent_loop(a_ref, b_ref, temperature)
    assert_close(ours, reference)
    ours.backward()
    reference.backward()
    assert_close(a.grad, a_ref.grad)
    assert_close(b.grad, b_ref.grad)


# ---------------------------------------------------------------- MINC: values and the gradient contract


@pytest.mark.parametrize(
    ("lower_triangular", "expected_grad"),
    [
        # Lambda = a^T a / 2 = [[.5, .5], [.5, 2.5]]; tril(Lambda) a_0 = (.5, 3), tril(Lambda) a_1 = (0, 5)
        (True, [[-0.5, 2.0], [0.0, 4.0]]),
        # Lambda a_0 = (1, 3), Lambda a_1 = (1, 5); a.grad = -(b - M a) at B = 2
        (False, [[0.0, 2.0], [1.0, 4.0]]),
    ],
)
def test_minc_hand_computed(lower_triangular: bool, expected_grad: list[list[float]]) -> None:
    a = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss_fn = MINCLoss(2, ema=0.3, lower_triangular=lower_triangular, symmetric=False, normalize=False)
    loss = loss_fn(a, b)
    assert_close(loss_fn.cov, torch.tensor([[0.5, 0.5], [0.5, 2.5]]))
    # -(2/2)(a_0.b_0 + a_1.b_1) + (1/2)(a_0 Lambda a_0 + a_1 Lambda a_1) = -4 + (4 + 10)/2
    assert_close(loss, torch.tensor(3.0))
    loss.backward()
    assert_close(a.grad, torch.tensor(expected_grad))
    assert b.grad is None  # no gradient into b


@pytest.mark.parametrize("lower_triangular", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minc_gradient_contract(lower_triangular: bool, symmetric: bool) -> None:
    batch = 16
    loss_fn = MINCLoss(5, ema=0.2, lower_triangular=lower_triangular, symmetric=symmetric, normalize=False)
    for seed in range(3):  # a few steps so that Lambda is an EMA, not just this batch
        a, b = random_pair(batch=batch, seed=seed)
        loss = loss_fn(a, b)
    loss.backward()
    cov = loss_fn.cov
    mixing = torch.tril(cov) if lower_triangular else cov
    a_, b_ = a.detach(), b.detach()
    value = -(2 / batch) * (a_ * b_).sum() + ((a_ @ cov) * a_).sum() / batch
    if symmetric:
        value = (value - (2 / batch) * (a_ * b_).sum() + ((b_ @ cov) * b_).sum() / batch) / 2
        assert_close(a.grad, -(1 / batch) * (b_ - a_ @ mixing.T), atol=1e-5, rtol=1e-5)
        assert_close(b.grad, -(1 / batch) * (a_ - b_ @ mixing.T), atol=1e-5, rtol=1e-5)
    else:
        assert_close(a.grad, -(2 / batch) * (b_ - a_ @ mixing.T), atol=1e-5, rtol=1e-5)
        assert b.grad is None
    assert_close(loss, value)


def test_minc_gradient_is_not_the_naive_autograd_of_the_value() -> None:
    """The trap DESIGN.md names: d/da of a^T tril(Lambda) a would be (Lambda + diag Lambda) a."""
    a, b = random_pair(seed=4)
    loss_fn = MINCLoss(5, ema=1.0, symmetric=False, normalize=False)
    loss_fn(a, b).backward()
    cov = loss_fn.cov
    naive = -(2 / 16) * (b.detach() - 0.5 * a.detach() @ (cov + torch.diag(torch.diagonal(cov))))
    assert not torch.allclose(a.grad, naive, atol=1e-3)


def test_minc_cov_at_step_one_is_the_batch_second_moment() -> None:
    a, b = random_pair(batch=10, dim=4, seed=5)
    symmetric = MINCLoss(4, ema=0.05, normalize=False)
    symmetric(a, b)
    expected = (a.detach().T @ a.detach() + b.detach().T @ b.detach()) / (2 * 10)
    assert_close(symmetric.cov, expected)
    one_sided = MINCLoss(4, ema=0.05, symmetric=False, normalize=False)
    one_sided(a, b)
    assert_close(one_sided.cov, a.detach().T @ a.detach() / 10)
    assert symmetric.cov.dtype == torch.float32 and int(symmetric.steps) == 1


def test_minc_lambda_follows_the_bias_corrected_ema() -> None:
    ema = 0.3
    loss_fn = MINCLoss(4, ema=ema, normalize=False)
    running = torch.zeros(4, 4, dtype=torch.float64)
    for step in range(1, 7):
        a, b = random_pair(batch=8, dim=4, seed=10 + step, scale=float(step))  # moments that move
        loss_fn(a, b)
        moment = (a.detach().T @ a.detach() + b.detach().T @ b.detach()).double() / 16
        running = (1 - ema) * running + ema * moment
        assert_close(loss_fn.cov, (running / (1 - (1 - ema) ** step)).float())
    assert int(loss_fn.steps) == 6


def test_minc_equals_all_pairs_spectral_gradient() -> None:
    """ema=1, full Lambda, one direction, Lambda from the other view: MINC's gradient is the all-pairs one."""
    a, b = random_pair(batch=12, dim=6, seed=6)
    loss_fn = MINCLoss(6, ema=1.0, lower_triangular=False, symmetric=False, normalize=False)
    loss_fn(b.detach(), a.detach())  # one training step: Lambda = (1/B) sum_j b_j b_j^T
    loss_fn.eval()
    loss_fn(a, b).backward()
    a_ref = a.detach().clone().requires_grad_()
    b_sg = b.detach()
    batch = a.shape[0]
    all_pairs = -(2 / batch) * (a_ref * b_sg).sum() + ((a_ref @ b_sg.T) ** 2).sum() / batch**2
    all_pairs.backward()
    assert_close(a.grad, a_ref.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- MINC: GHA property


def train_linear_minc(lower_triangular: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Train W (3 x 8) with MINC on x' = C x + noise; return W and the eigenvectors of C, largest first.

    With x ~ N(0, I) and Cov(x') = I, the fixed points of the expected MINC update satisfy
    W C = M W: GHA (M = tril(W W^T)) gives the top eigenvectors in order, with |w_i|^2 = lambda_i.
    """
    g = torch.Generator().manual_seed(0)
    n, k, batch = 8, 3, 256
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eigenvalues = torch.tensor([0.9, 0.75, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0])
    cross = basis @ torch.diag(eigenvalues) @ basis.T
    noise = basis @ torch.diag((1 - eigenvalues**2).sqrt()) @ basis.T
    weight = torch.nn.Parameter(0.1 * torch.randn(k, n, generator=g))
    loss_fn = MINCLoss(k, ema=0.1, lower_triangular=lower_triangular, normalize=False)
    optimizer = torch.optim.SGD([weight], lr=0.15)
    for _ in range(600):
        x = torch.randn(batch, n, generator=g)
        x_next = x @ cross + torch.randn(batch, n, generator=g) @ noise
        loss = loss_fn(x @ weight.T, x_next @ weight.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach(), basis[:, :k].T


def subspace_alignment(weight: torch.Tensor, eigenvectors: torch.Tensor) -> torch.Tensor:
    """Norm of each eigenvector's projection onto the row space of `weight` (1 = inside it)."""
    projection = weight.T @ torch.linalg.pinv(weight.T)
    return torch.linalg.norm(eigenvectors @ projection, dim=1)


def test_gha_recovers_top_eigenvectors_in_order() -> None:
    weight, eigenvectors = train_linear_minc(lower_triangular=True)
    cosines = F.cosine_similarity(weight, eigenvectors, dim=1).abs()
    assert (cosines > 0.95).all(), cosines
    assert_close(weight.norm(dim=1) ** 2, torch.tensor([0.9, 0.75, 0.6]), atol=0.1, rtol=0)


def test_full_lambda_recovers_the_subspace_but_not_the_order() -> None:
    weight, eigenvectors = train_linear_minc(lower_triangular=False)
    assert (subspace_alignment(weight, eigenvectors) > 0.95).all()
    cosines = F.cosine_similarity(weight, eigenvectors, dim=1).abs()
    assert cosines.min() < 0.9, cosines  # rows are a rotation of the eigenvectors, not the eigenvectors


# ---------------------------------------------------------------- MINC: state, modes, numerics


def test_minc_state_dict_round_trip() -> None:
    loss_fn = MINCLoss(5, ema=0.2, normalize=False)
    for seed in range(3):
        loss_fn(*random_pair(seed=seed))
    loss_fn(torch.full((4, 5), float("nan")), torch.zeros(4, 5))
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = MINCLoss(5, ema=0.2, normalize=False)
    restored.load_state_dict(torch.load(buffer))
    assert set(loss_fn.state_dict()) == {"ema_sum", "steps", "skipped"}
    assert torch.equal(restored.cov, loss_fn.cov)
    assert int(restored.steps) == 3 and int(restored.skipped) == 1
    a, b = random_pair(seed=9)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    loss_fn(a, b).backward()
    restored(a2, b2).backward()
    assert torch.equal(a.grad, a2.grad) and torch.equal(restored.cov, loss_fn.cov)


def test_minc_eval_mode_leaves_lambda_alone() -> None:
    loss_fn = MINCLoss(5, ema=0.2, normalize=False)
    loss_fn(*random_pair(seed=0))
    ema_sum, steps = loss_fn.ema_sum.clone(), loss_fn.steps.clone()
    loss_fn.eval()
    a, b = random_pair(seed=1, scale=3.0)
    loss = loss_fn(a, b)
    assert torch.equal(loss_fn.ema_sum, ema_sum) and torch.equal(loss_fn.steps, steps)
    cov = loss_fn.cov
    expected = -(2 / 16) * (a * b).sum() + (((a @ cov) * a).sum() + ((b @ cov) * b).sum()) / 32
    assert_close(loss, expected.detach())


def test_minc_eval_before_any_training_uses_the_batch_moment() -> None:
    loss_fn = MINCLoss(5, normalize=False).eval()
    a, b = random_pair(seed=3)
    loss_fn(a, b)
    assert int(loss_fn.steps) == 0 and torch.equal(loss_fn.ema_sum, torch.zeros(5, 5))


@pytest.mark.parametrize(
    ("symmetric", "bad_view", "bad_value"),
    [(True, "a", float("nan")), (True, "b", float("inf")), (False, "a", float("-inf")), (False, "b", float("nan"))],
)
def test_minc_non_finite_batch_is_skipped(symmetric: bool, bad_view: str, bad_value: float) -> None:
    loss_fn = MINCLoss(5, ema=0.2, symmetric=symmetric, normalize=False)
    loss_fn(*random_pair(seed=0))
    ema_sum, steps = loss_fn.ema_sum.clone(), loss_fn.steps.clone()
    a, b = random_pair(seed=1)
    with torch.no_grad():
        (a if bad_view == "a" else b)[3, 2] = bad_value
    loss = loss_fn(a, b)
    assert not torch.isfinite(loss)
    assert torch.equal(loss_fn.ema_sum, ema_sum)  # bit-identical
    assert torch.equal(loss_fn.steps, steps)
    assert int(loss_fn.skipped) == 1
    loss_fn(*random_pair(seed=2))  # training goes on
    assert int(loss_fn.steps) == 2 and torch.isfinite(loss_fn.cov).all()


def test_minc_overflowing_moment_is_skipped() -> None:
    loss_fn = MINCLoss(5, normalize=False)
    a, b = random_pair(seed=0, scale=1e30)  # finite embeddings whose squares overflow float32
    assert torch.isfinite(a).all()
    assert not torch.isfinite(loss_fn(a, b))
    assert int(loss_fn.skipped) == 1 and int(loss_fn.steps) == 0


@pytest.mark.parametrize("name", AUX_LOSSES)
def test_losses_compute_in_float32_under_autocast(name: str) -> None:
    """bf16 embeddings under autocast give exactly the float32 computation on their upcast values."""
    a, b = random_pair(batch=32, dim=16, seed=7)
    a16, b16 = a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    a32, b32 = a16.detach().float().requires_grad_(), b16.detach().float().requires_grad_()
    loss_16, loss_32 = build_aux_loss(name, 16), build_aux_loss(name, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value_16 = loss_16(a16, b16)
    value_32 = loss_32(a32, b32)
    (value_16 * 1000).backward()  # scaled so that bf16 rounding of the gradient is visible
    (value_32 * 1000).backward()
    assert value_16.dtype == torch.float32
    assert_close(value_16, value_32, rtol=1e-6, atol=1e-6)
    assert_close(a16.grad, a32.grad.bfloat16(), rtol=0, atol=0)
    if name == "minc":
        assert loss_16.cov.dtype == torch.float32
        assert_close(loss_16.cov, loss_32.cov, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", AUX_LOSSES)
def test_bf16_autocast_keeps_float32_and_values(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    encoder = torch.nn.Linear(12, 8)
    x, x_next = torch.randn(64, 12, generator=g), torch.randn(64, 12, generator=g)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        loss_fn = build_aux_loss(name, 8)
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            a, b = encoder(x), encoder(x_next)
            assert a.dtype == dtype
            loss = loss_fn(a, b)
        loss.backward()
        assert loss.dtype == torch.float32
        results[dtype] = (loss.detach(), encoder.weight.grad.clone(), getattr(loss_fn, "cov", None))
    (loss32, grad32, cov32), (loss16, grad16, cov16) = results[torch.float32], results[torch.bfloat16]
    assert_close(loss16, loss32, rtol=3e-2, atol=3e-2)
    assert_close(grad16, grad32, rtol=5e-2, atol=5e-2 * grad32.abs().max().item())
    if name == "minc":
        assert cov16.dtype == torch.float32
        assert_close(cov16, cov32, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- MINC: asymmetric views (phi(s, a) against mu(s'))


def asymmetric_pair(batch: int = 16, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Views with different second moments: b is correlated with a and its coordinate j is scaled by (j + 1) / 2."""
    a, noise = random_pair(batch=batch, dim=dim, seed=seed)
    b = (0.5 * a.detach() + noise.detach()) * (torch.arange(1, dim + 1) / 2)
    return a, b.requires_grad_()


@pytest.mark.parametrize(
    ("lower_triangular", "expected_a_grad", "expected_b_grad"),
    [
        # tril(Lambda_b) a_0 = (.5, 1.5), a_1 = (0, 2); tril(Lambda_a) b_0 = (.5, 3), b_1 = (0, 2.5)
        (True, [[-0.25, 0.25], [0.0, 0.5]], [[-0.25, 1.0], [0.0, 0.25]]),
        # Lambda_b a_0 = (1, 1.5), a_1 = (1, 2); Lambda_a b_0 = (1, 3), b_1 = (.5, 2.5)
        (False, [[0.0, 0.25], [0.5, 0.5]], [[0.0, 1.0], [0.25, 0.25]]),
    ],
)
def test_asymmetric_minc_hand_computed(
    lower_triangular: bool, expected_a_grad: list[list[float]], expected_b_grad: list[list[float]]
) -> None:
    a = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss_fn = MINCLoss(2, ema=0.3, lower_triangular=lower_triangular, normalize=False, asymmetric=True)
    loss = loss_fn(a, b)
    assert_close(loss_fn.cov, torch.tensor([[0.5, 0.5], [0.5, 2.5]]))  # a^T a / 2
    assert_close(loss_fn.cov_b, torch.tensor([[0.5, 0.5], [0.5, 1.0]]))  # b^T b / 2
    # direction a: -(2/2)(a_0.b_0 + a_1.b_1) + (1/2)(a_0 Lambda_b a_0 + a_1 Lambda_b a_1) = -4 + (2.5 + 4)/2
    # direction b: -4 + (1/2)(b_0 Lambda_a b_0 + b_1 Lambda_a b_1) = -4 + (4 + 2.5)/2; the mean is -0.75
    # (Lambda_a in direction a, the shared-view mistake, would give -4 + (4 + 10)/2 = 3)
    assert_close(loss, torch.tensor(-0.75))
    loss.backward()
    # a.grad = -(1/2)(b - M_b a), b.grad = -(1/2)(a - M_a b): the 1/B of the mean of the two directions at B = 2
    assert_close(a.grad, torch.tensor(expected_a_grad))
    assert_close(b.grad, torch.tensor(expected_b_grad))


@pytest.mark.parametrize("lower_triangular", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_asymmetric_minc_gradient_contract(lower_triangular: bool, symmetric: bool) -> None:
    batch = 16
    loss_fn = MINCLoss(
        5, ema=0.2, lower_triangular=lower_triangular, symmetric=symmetric, normalize=False, asymmetric=True
    )
    for seed in range(3):  # a few steps so that both Lambdas are EMAs, not just this batch
        a, b = asymmetric_pair(batch=batch, seed=seed)
        loss = loss_fn(a, b)
    loss.backward()
    cov_a, cov_b = loss_fn.cov, loss_fn.cov_b
    mixing_a, mixing_b = (torch.tril(cov_a), torch.tril(cov_b)) if lower_triangular else (cov_a, cov_b)
    a_, b_ = a.detach(), b.detach()
    value = -(2 / batch) * (a_ * b_).sum() + ((a_ @ cov_b) * a_).sum() / batch
    if symmetric:
        value = (value - (2 / batch) * (a_ * b_).sum() + ((b_ @ cov_a) * b_).sum() / batch) / 2
        assert_close(a.grad, -(1 / batch) * (b_ - a_ @ mixing_b.T), atol=1e-5, rtol=1e-5)
        assert_close(b.grad, -(1 / batch) * (a_ - b_ @ mixing_a.T), atol=1e-5, rtol=1e-5)
    else:
        assert_close(a.grad, -(2 / batch) * (b_ - a_ @ mixing_b.T), atol=1e-5, rtol=1e-5)
        assert b.grad is None
    assert_close(loss, value)
    assert not torch.allclose(cov_a, cov_b, atol=0.1)  # the test data tells the two Lambdas apart


@pytest.mark.parametrize("symmetric", [True, False])
def test_asymmetric_minc_each_lambda_follows_the_bias_corrected_ema_of_its_own_view(symmetric: bool) -> None:
    ema = 0.3
    loss_fn = MINCLoss(4, ema=ema, symmetric=symmetric, normalize=False, asymmetric=True)
    running_a = torch.zeros(4, 4, dtype=torch.float64)
    running_b = torch.zeros(4, 4, dtype=torch.float64)
    for step in range(1, 7):
        a, b = asymmetric_pair(batch=8, dim=4, seed=10 + step)
        b = (step * b.detach()).requires_grad_()  # moments that move, and move differently in the two views
        loss_fn(a, b)
        running_a = (1 - ema) * running_a + ema * (a.detach().T @ a.detach()).double() / 8
        running_b = (1 - ema) * running_b + ema * (b.detach().T @ b.detach()).double() / 8
        correction = 1 - (1 - ema) ** step
        assert_close(loss_fn.cov, (running_a / correction).float())
        assert_close(loss_fn.cov_b, (running_b / correction).float())
    assert int(loss_fn.steps) == 6


@pytest.mark.parametrize("symmetric", [True, False])
def test_asymmetric_minc_equals_the_all_pairs_spectral_objective(symmetric: bool) -> None:
    """ema=1, full Lambdas, first step: the value is S(a, b) = -(2/B) sum_i a_i.b_i + (1/B^2) sum_ij (a_i.b_j)^2;
    the gradients are half of S's in both views (symmetric) or S's gradient in a (one-sided)."""
    a, b = asymmetric_pair(batch=12, dim=6, seed=6)
    loss_fn = MINCLoss(6, ema=1.0, lower_triangular=False, symmetric=symmetric, normalize=False, asymmetric=True)
    loss = loss_fn(a, b)
    loss.backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    batch = a.shape[0]
    all_pairs = -(2 / batch) * (a_ref * b_ref).sum() + ((a_ref @ b_ref.T) ** 2).sum() / batch**2
    all_pairs.backward()
    assert_close(loss, all_pairs.detach())
    if symmetric:
        assert_close(a.grad, a_ref.grad / 2, atol=1e-6, rtol=1e-5)
        assert_close(b.grad, b_ref.grad / 2, atol=1e-6, rtol=1e-5)
    else:
        assert_close(a.grad, a_ref.grad, atol=1e-6, rtol=1e-5)
        assert b.grad is None


@pytest.mark.parametrize(
    ("symmetric", "bad_view", "bad_value"),
    [
        (True, "a", float("nan")),
        (True, "b", float("inf")),
        (False, "a", float("-inf")),
        (False, "b", float("nan")),
        (True, "b", 1e30),  # finite, but its square overflows Lambda_b only
    ],
)
def test_asymmetric_minc_non_finite_batch_leaves_both_lambdas_alone(
    symmetric: bool, bad_view: str, bad_value: float
) -> None:
    loss_fn = MINCLoss(5, ema=0.2, symmetric=symmetric, normalize=False, asymmetric=True)
    loss_fn(*asymmetric_pair(seed=0))
    ema_sum, ema_sum_b, steps = loss_fn.ema_sum.clone(), loss_fn.ema_sum_b.clone(), loss_fn.steps.clone()
    a, b = asymmetric_pair(seed=1)
    with torch.no_grad():
        (a if bad_view == "a" else b)[3, 2] = bad_value
    loss = loss_fn(a, b)
    assert torch.isnan(loss)
    assert torch.equal(loss_fn.ema_sum, ema_sum) and torch.equal(loss_fn.ema_sum_b, ema_sum_b)  # bit-identical
    assert torch.equal(loss_fn.steps, steps)
    assert int(loss_fn.skipped) == 1
    loss_fn(*asymmetric_pair(seed=2))  # training goes on
    assert int(loss_fn.steps) == 2 and torch.isfinite(loss_fn.cov).all() and torch.isfinite(loss_fn.cov_b).all()


def test_asymmetric_minc_eval_mode() -> None:
    """Eval before training uses each view's batch moment; after training the stored Lambdas, which stay put."""
    a, b = asymmetric_pair(seed=3)
    fresh = MINCLoss(5, normalize=False, asymmetric=True).eval()
    first_step = MINCLoss(5, ema=1.0, normalize=False, asymmetric=True)  # Lambdas = this batch's moments
    assert_close(fresh(a, b), first_step(a, b))
    assert int(fresh.steps) == 0 and not fresh.ema_sum.any() and not fresh.ema_sum_b.any()
    first_step.eval()
    ema_sum, ema_sum_b = first_step.ema_sum.clone(), first_step.ema_sum_b.clone()
    a2, b2 = asymmetric_pair(seed=4)
    loss = first_step(a2, b2)
    assert torch.equal(first_step.ema_sum, ema_sum) and torch.equal(first_step.ema_sum_b, ema_sum_b)
    a2, b2 = a2.detach(), b2.detach()
    value_a = -(2 / 16) * (a2 * b2).sum() + ((a2 @ first_step.cov_b) * a2).sum() / 16
    value_b = -(2 / 16) * (a2 * b2).sum() + ((b2 @ first_step.cov) * b2).sum() / 16
    assert_close(loss, (value_a + value_b) / 2)


def test_asymmetric_minc_state_dict_round_trip() -> None:
    loss_fn = MINCLoss(5, ema=0.2, normalize=False, asymmetric=True)
    for seed in range(3):
        loss_fn(*asymmetric_pair(seed=seed))
    loss_fn(torch.zeros(16, 5), torch.full((16, 5), float("nan")))
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = MINCLoss(5, ema=0.2, normalize=False, asymmetric=True)
    restored.load_state_dict(torch.load(buffer))
    assert set(loss_fn.state_dict()) == {"ema_sum", "ema_sum_b", "steps", "skipped"}
    assert set(MINCLoss(5).state_dict()) == {"ema_sum", "steps", "skipped"}  # the default's keys do not change
    assert torch.equal(restored.cov, loss_fn.cov) and torch.equal(restored.cov_b, loss_fn.cov_b)
    assert int(restored.steps) == 3 and int(restored.skipped) == 1
    a, b = asymmetric_pair(seed=9)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    loss_fn(a, b).backward()
    restored(a2, b2).backward()
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
    assert torch.equal(restored.cov_b, loss_fn.cov_b)
    assert "asymmetric=True" in repr(restored)


def train_linear_asymmetric_minc(
    lower_triangular: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train phi = W_a x and mu = W_b x' (3 x 8 each) with asymmetric MINC on x' = A x + noise, A = U diag(s) V^T.

    With x ~ N(0, I) and Cov(x') = I the expected update is W_a += W_b A - M_b W_a, W_b += W_a A^T - M_a W_b:
    with M = tril(W W^T), coordinate k solves the rank-1 problem on A minus the pairs j < k (nested deflation),
    so w_a,k -> v_k, w_b,k -> u_k, in order, with |w_a,k| |w_b,k| = s_k. Returns W_a, W_b, V_k^T, U_k^T.
    """
    g = torch.Generator().manual_seed(0)
    n, k, batch = 8, 3, 256
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    singular_values = torch.tensor([0.9, 0.75, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0])
    operator = left @ torch.diag(singular_values) @ right.T  # not symmetric: U != V
    noise = left @ torch.diag((1 - singular_values**2).sqrt()) @ left.T  # A A^T + noise^2 = I
    weight_a = torch.nn.Parameter(0.1 * torch.randn(k, n, generator=g))
    weight_b = torch.nn.Parameter(0.1 * torch.randn(k, n, generator=g))
    loss_fn = MINCLoss(k, ema=0.1, lower_triangular=lower_triangular, normalize=False, asymmetric=True)
    optimizer = torch.optim.SGD([weight_a, weight_b], lr=0.15)
    for _ in range(600):
        x = torch.randn(batch, n, generator=g)
        x_next = x @ operator.T + torch.randn(batch, n, generator=g) @ noise
        loss = loss_fn(x @ weight_a.T, x_next @ weight_b.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight_a.detach(), weight_b.detach(), right[:, :k].T, left[:, :k].T


def test_asymmetric_gha_recovers_top_singular_pairs_in_order() -> None:
    weight_a, weight_b, right, left = train_linear_asymmetric_minc(lower_triangular=True)
    assert (F.cosine_similarity(weight_a, right, dim=1).abs() > 0.95).all()  # phi_k -> v_k (right singular vector)
    assert (F.cosine_similarity(weight_b, left, dim=1).abs() > 0.95).all()  # mu_k -> u_k (left singular vector)
    scales = weight_a.norm(dim=1) * weight_b.norm(dim=1)
    assert_close(scales, torch.tensor([0.9, 0.75, 0.6]), atol=0.1, rtol=0)


def test_asymmetric_full_lambda_recovers_the_subspaces_but_not_the_order() -> None:
    weight_a, weight_b, right, left = train_linear_asymmetric_minc(lower_triangular=False)
    assert (subspace_alignment(weight_a, right) > 0.95).all() and (subspace_alignment(weight_b, left) > 0.95).all()
    cosines = F.cosine_similarity(weight_a, right, dim=1).abs()
    assert cosines.min() < 0.9, cosines  # rows are a mix of the singular vectors, not the vectors themselves


# ---------------------------------------------------------------- bad input


LOSS_FACTORIES = {
    "minc": lambda: MINCLoss(4),
    "spectral": lambda: SpectralContrastiveLoss(),
    "infonce": lambda: InfoNCELoss(),
}


@pytest.mark.parametrize("name", AUX_LOSSES)
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "message"),
    [
        ((8,), (8,), r"2-D.*got shapes \(8,\) and \(8,\)"),
        ((8, 4, 1), (8, 4, 1), r"2-D.*got shapes \(8, 4, 1\) and \(8, 4, 1\)"),
        ((8, 4), (8, 4, 1), r"2-D.*got shapes \(8, 4\) and \(8, 4, 1\)"),
        ((8, 4), (6, 4), r"same shape.*\(8, 4\) and \(6, 4\)"),
        ((1, 4), (1, 4), r"at least 2.*\(1, 4\)"),
    ],
)
def test_bad_shapes_raise(name: str, a_shape: tuple, b_shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LOSS_FACTORIES[name]()(torch.zeros(a_shape), torch.zeros(b_shape))


def test_minc_wrong_dim_raises() -> None:
    with pytest.raises(ValueError, match=r"dim=4.*shape \(8, 6\)"):
        MINCLoss(4)(torch.zeros(8, 6), torch.zeros(8, 6))


@pytest.mark.parametrize("ema", [0.0, -0.1, 1.5, float("nan"), "abc", None])
def test_bad_ema_raises(ema: float) -> None:
    with pytest.raises(ValueError, match=rf"MINCLoss ema must be in \(0, 1\]; got {re.escape(repr(ema))}"):
        MINCLoss(4, ema=ema)


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "8"])
def test_bad_dim_raises(dim) -> None:
    with pytest.raises(ValueError, match=rf"MINCLoss dim must be an integer >= 1; got {re.escape(repr(dim))}"):
        MINCLoss(dim)


def test_a_numpy_integer_dim_is_a_dim() -> None:
    assert MINCLoss(np.int64(8)).dim == 8


@pytest.mark.parametrize("flag", ["lower_triangular", "symmetric", "gather_distributed", "normalize", "asymmetric"])
@pytest.mark.parametrize("value", [1, "False", None])
def test_a_flag_that_is_not_a_bool_raises(flag: str, value) -> None:
    """A string "False" is truthy: taken as it is, it would silently turn the option on."""
    with pytest.raises(ValueError, match=rf"MINCLoss {flag} must be true or false; got {re.escape(repr(value))}"):
        MINCLoss(4, **{flag: value})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SpectralContrastiveLoss(mu=0), r"SpectralContrastiveLoss mu must be a finite number > 0; got 0"),
        (lambda: SpectralContrastiveLoss(mu=float("nan")), r"mu must be a finite number > 0; got nan"),  # NaN losses
        (lambda: SpectralContrastiveLoss(mu="1"), r"mu must be a finite number > 0; got '1'"),
        (lambda: SpectralContrastiveLoss(gather_distributed="no"), r"gather_distributed must be true or false; got 'no'"),
        (lambda: spectral_contrastive_loss(torch.ones(3, 2), torch.ones(3, 2), mu=-1.0),
         r"spectral_contrastive_loss mu must be a finite number > 0; got -1.0"),
        (lambda: InfoNCELoss(temperature=0.0), r"InfoNCELoss temperature must be a finite number > 0; got 0.0"),
        (lambda: InfoNCELoss(temperature=float("inf")), r"temperature must be a finite number > 0; got inf"),
        (lambda: info_nce_loss(torch.ones(3, 2), torch.ones(3, 2), temperature=-2),
         r"info_nce_loss temperature must be a finite number > 0; got -2"),
        (lambda: build_aux_loss("spectral", 0), r"dim must be an integer >= 1; got 0"),  # a loss without Lambda too
        (lambda: build_aux_loss(["minc"], 8), r"unknown aux loss \['minc'\]; valid names: minc, spectral, infonce"),
    ],
)
def test_bad_hyperparameters_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_build_aux_loss_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown aux loss 'byol'; valid names: minc, spectral, infonce"):
        build_aux_loss("byol", 8)


def test_build_aux_loss_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ValueError, match=r"'spectral' does not take \['ema'\]; its options are \['mu', 'gather_distributed'\]"):
        build_aux_loss("spectral", 8, ema=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected_type", "attribute", "value"),
    [
        ("minc", {"ema": 0.2, "lower_triangular": False}, MINCLoss, "lower_triangular", False),
        ("minc", {"asymmetric": True}, MINCLoss, "asymmetric", True),
        ("spectral", {"mu": 2.0}, SpectralContrastiveLoss, "mu", 2.0),
        ("infonce", {"temperature": 0.5}, InfoNCELoss, "temperature", 0.5),
    ],
)
def test_build_aux_loss_builds_the_named_loss(name, kwargs, expected_type, attribute, value) -> None:
    loss_fn = build_aux_loss(name, 8, **kwargs)
    assert type(loss_fn) is expected_type and getattr(loss_fn, attribute) == value
    if name == "minc":
        assert loss_fn.dim == 8 and loss_fn.ema == 0.2


# ---------------------------------------------------------------- normalised MINC (the default) and scale


def test_normalized_minc_hand_derived_value_and_gradient():
    """normalize=True: the contract on the unit rows a_hat = a/||a||, chained through the projection by hand:
    dl/da_i = (I - a_hat_i a_hat_i^T) / ||a_i|| . (-(2/B)) (b_hat_i - tril(Lambda) a_hat_i)."""
    a, b = random_pair(batch=6, dim=3, seed=3, scale=2.5)
    loss = MINCLoss(3, ema=1.0, symmetric=False)(a, b)  # ema=1: Lambda is this batch's second moment
    loss.backward()
    with torch.no_grad():
        norms = a.norm(dim=1, keepdim=True)
        a_hat, b_hat = a / norms, b / b.norm(dim=1, keepdim=True)
        lam = a_hat.T @ a_hat / 6
        value = (-2 * (a_hat * b_hat).sum() + ((a_hat @ lam) * a_hat).sum()) / 6
        pull = -(2 / 6) * (b_hat - a_hat @ torch.tril(lam).T)
        grad = (pull - (pull * a_hat).sum(dim=1, keepdim=True) * a_hat) / norms
    assert_close(loss.detach(), value)
    assert_close(a.grad, grad)
    assert b.grad is None or torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("sign, value", [(1.0, -1.0), (-1.0, 3.0)])
def test_normalized_minc_value_range_ends(sign, value):
    """Unit rows bound the value to [-2, 3]: -(2/B) sum a_i.b_i in [-2, 2] and tr(C Lambda) in [0, 1]. With every
    row along one axis, Lambda = C = e e^T: b = a gives -2 + 1 = -1, b = -a the upper end 2 + 1 = 3."""
    a = torch.zeros(8, 4)
    a[:, 2] = torch.linspace(0.5, 4.0, 8)  # lengths differ; the unit rows do not
    assert_close(MINCLoss(4, ema=1.0)(a, sign * a), torch.tensor(value))


def test_normalized_minc_is_blind_to_the_embedding_scale():
    """Shrinking the embeddings, the collapse the unnormalised loss allowed (embeddings -> 0, Lambda -> 0), changes
    neither the value nor Lambda; the gradient scales as 1/scale, and it has no component along the rows."""
    a, b = random_pair(batch=16, dim=8, seed=4)
    results = []
    for scale in (1.0, 1e-4):
        loss_fn = MINCLoss(8)
        a_scaled = (scale * a.detach()).requires_grad_()
        loss = loss_fn(a_scaled, scale * b.detach())
        loss.backward()
        results.append((loss.detach(), loss_fn.cov, a_scaled.grad * scale))
        assert_close((a_scaled.grad * a_scaled).sum(dim=1), torch.zeros(16), atol=1e-6, rtol=0)
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1], results[0][1])
    assert_close(results[1][2], results[0][2], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("normalize, collapses", [(False, True), (True, False)])
def test_gradient_descent_on_the_embedding_scale(normalize, collapses):
    """Drive MINC toward collapse: a network can scale its embeddings by exp(s) (e.g. pre-BN activations under
    BatchNorm's eps). Where the views share no signal the unnormalised loss is lowest at exp(s) -> 0 and descent
    goes there; the normalised loss has no gradient in s, so the scale stays where it is."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(64, 16, generator=g)
    b = torch.randn(64, 16, generator=g)  # views that share no signal yet: nothing to align, only Lambda's term
    log_scale = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.SGD([log_scale], lr=0.05)
    loss_fn = MINCLoss(16, normalize=normalize)
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(a * log_scale.exp(), b * log_scale.exp()).backward()
        optimizer.step()
    if collapses:  # descent slows as the loss (~ scale^4) flattens, but it only goes down
        assert float(log_scale.detach().exp()) < 0.25 and log_scale.grad > 0
    else:
        assert abs(float(log_scale.detach())) < 1e-5


@pytest.mark.parametrize("name", AUX_LOSSES)
def test_every_aux_loss_is_order_one_in_the_dimension(name):
    """With BN-terminated embeddings (unit-variance coordinates) every aux loss's value and gradient norm stay O(1)
    and do not grow with d = 16, 64, 256. The unnormalised MINC, measured beside them, grows like d."""
    values, grads, raw = [], [], []
    for dim in (16, 64, 256):
        g = torch.Generator().manual_seed(dim)
        a = torch.randn(128, dim, generator=g)
        b = (0.8 * a + 0.6 * torch.randn(128, dim, generator=g)).requires_grad_()
        a.requires_grad_()
        loss = build_aux_loss(name, dim)(a, b)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(float(torch.cat([a.grad, b.grad if b.grad is not None else torch.zeros_like(b)]).norm()))
        raw.append(float(MINCLoss(dim, normalize=False)(a.detach(), b.detach())))
    assert max(abs(v) for v in values) <= 2 * math.log(256) + 2
    assert max(grads) <= 1.5 * grads[0] and max(grads) < 10
    assert abs(raw[2]) > 8 * abs(raw[0])  # the reason for the normalisation


def test_a_loss_given_numpy_arrays_names_the_type() -> None:
    with pytest.raises(TypeError, match=r"MINCLoss takes two torch tensors; got ndarray and ndarray"):
        MINCLoss(8)(np.ones((4, 8)), np.ones((4, 8)))

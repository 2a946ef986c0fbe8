"""gather_distributed under real torch.distributed (gloo, 2 CPU processes): DDP equals one process on the global batch."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from minc_rl.losses import MINCLoss, build_aux_loss

WORLD = 2
IN_FEATURES, DIM, GLOBAL_BATCH, STEPS = 10, 6, 16, 2
CASES = {
    "minc": ("minc", {"ema": 0.3}),
    "minc_one_sided_full": ("minc", {"ema": 0.3, "symmetric": False, "lower_triangular": False}),
    "minc_asymmetric": ("minc", {"ema": 0.3, "asymmetric": True}),
    "spectral": ("spectral", {"mu": 1.0}),
    "infonce": ("infonce", {"temperature": 0.2}),
}


def make_inputs() -> dict[str, torch.Tensor]:
    """Encoder weights and a global batch of pairs for STEPS steps; some embedding rows exceed the clip radius."""
    g = torch.Generator().manual_seed(0)
    return {
        "weight": 0.4 * torch.randn(DIM, IN_FEATURES, generator=g),
        "bias": 0.1 * torch.randn(DIM, generator=g),
        "x": torch.randn(STEPS, GLOBAL_BATCH, IN_FEATURES, generator=g),
        "x_next": torch.randn(STEPS, GLOBAL_BATCH, IN_FEATURES, generator=g),
    }


def train(
    case: str, inputs: dict[str, torch.Tensor], rows: slice, wrap
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.nn.Module]:
    """STEPS SGD steps of a linear encoder on `rows` of each batch; per step: the loss, weight grad, bias grad."""
    name, kwargs = CASES[case]
    encoder = torch.nn.Linear(IN_FEATURES, DIM)
    with torch.no_grad():
        encoder.weight.copy_(inputs["weight"])
        encoder.bias.copy_(inputs["bias"])
    model = wrap(encoder)
    loss_fn = build_aux_loss(name, DIM, gather_distributed=True, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, weight_grads, bias_grads = [], [], []
    for step in range(STEPS):
        a, b = model(torch.cat([inputs["x"][step, rows], inputs["x_next"][step, rows]])).chunk(2)
        loss = loss_fn(a, b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        weight_grads.append(encoder.weight.grad.clone())
        bias_grads.append(encoder.bias.grad.clone())
    return losses, weight_grads, bias_grads, loss_fn


def worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP rank: every case on its half of the global batch, then a NaN batch on rank 1 only."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        inputs = make_inputs()
        local = GLOBAL_BATCH // WORLD
        rows = slice(rank * local, (rank + 1) * local)
        results = {}
        for case in CASES:
            losses, weight_grads, bias_grads, loss_fn = train(case, inputs, rows, DistributedDataParallel)
            results[case] = {"losses": losses, "weight_grads": weight_grads, "bias_grads": bias_grads}
            if isinstance(loss_fn, MINCLoss):
                results[case]["cov"], results[case]["cov_b"] = loss_fn.cov, loss_fn.cov_b
        for asymmetric in (False, True):  # a bad a (shared Lambda), a bad b (both Lambdas of the asymmetric loss)
            nan_probe = MINCLoss(DIM, gather_distributed=True, asymmetric=asymmetric)
            nan_probe(torch.randn(local, DIM), torch.randn(local, DIM))
            before = (nan_probe.cov, nan_probe.cov_b)
            bad = torch.full((local, DIM), float("nan")) if rank == 1 else torch.randn(local, DIM)
            good = torch.randn(local, DIM)
            probe_loss = nan_probe(good, bad) if asymmetric else nan_probe(bad, good)
            results[f"nan_probe_asymmetric={asymmetric}"] = {
                "finite": bool(torch.isfinite(probe_loss)),
                "unchanged": all(map(torch.equal, before, (nan_probe.cov, nan_probe.cov_b))),
                "skipped": int(nan_probe.skipped),
                "steps": int(nan_probe.steps),
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the two-process job once and load what each rank saved."""
    out_dir = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:
        if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
            patch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo would otherwise bind to whatever the hostname resolves to
        mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_matches_single_process_on_global_batch(ranks: list[dict], case: str) -> None:
    torch.set_num_threads(1)
    losses, weight_grads, bias_grads, loss_fn = train(case, make_inputs(), slice(None), lambda module: module)
    for rank in ranks:
        got = rank[case]
        for step in range(STEPS):
            assert_close(got["weight_grads"][step], weight_grads[step], rtol=1e-5, atol=1e-6)
            assert_close(got["bias_grads"][step], bias_grads[step], rtol=1e-5, atol=1e-6)
        if isinstance(loss_fn, MINCLoss):
            assert_close(got["cov"], loss_fn.cov, rtol=1e-5, atol=1e-7)
            assert_close(got["cov_b"], loss_fn.cov_b, rtol=1e-5, atol=1e-7)
    for step in range(STEPS):  # the ranks' losses average to the global-batch loss
        mean_loss = torch.stack([rank[case]["losses"][step] for rank in ranks]).mean()
        assert_close(mean_loss, losses[step], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("asymmetric", [False, True])
def test_ddp_non_finite_batch_on_one_rank_is_skipped_on_every_rank(ranks: list[dict], asymmetric: bool) -> None:
    for rank in ranks:
        expected = {"finite": False, "unchanged": True, "skipped": 1, "steps": 1}
        assert rank[f"nan_probe_asymmetric={asymmetric}"] == expected

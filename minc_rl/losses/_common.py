"""Input checks and distributed helpers shared by the losses."""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Raise ValueError unless a and b are matching (B, d) batches with B >= 2 (TypeError unless both are tensors)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} takes two torch tensors; got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name} expects two 2-D tensors of shape (batch, dim); got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name} expects both views to have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs a batch of at least 2 pairs; got shape {tuple(a.shape)}")


def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and hands each rank its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, keeping gradients to every rank's slice."""
    _, world = distributed_world()
    if world == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)

"""The ranks of a run: `init_distributed` joins the process group `torchrun` describes, `world` reads it,
and this is the one place that gathers features across ranks (docs/methods.md: `B` is the *global* batch).

The student's features are gathered *with* gradient (`torch.distributed.nn.all_gather`, whose
backward sums the gradients of every rank's loss into the local slice), so each rank can compute
the loss on the whole global batch and DDP's gradient averaging yields the full-batch gradient.
Teacher features (targets) are gathered *without* gradient. Every rank must hold the same number
of samples (use `drop_last=True`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn import all_gather as all_gather_with_grad


def world() -> tuple[int, int]:
    """`(rank, world_size)`; `(0, 1)` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor, with_grad: bool) -> Tensor:
    """Concatenate every rank's `(B_local, D)` tensor into `(world_size * B_local, D)`, in rank order."""
    _, world_size = world()
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(all_gather_with_grad(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def init_distributed() -> bool:
    """Join the process group `torchrun` describes (NCCL on GPUs, gloo on CPUs); True if we created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a small tensor from every rank, in rank order (the order `method_loss` gathers)."""
    return gather_features(x, with_grad=False).cpu()

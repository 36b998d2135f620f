"""Process-group helpers for ``distill`` under ``torchrun`` (DistributedDataParallel).

Every rank draws the same block sizes, offsets and global batch and trains on its slice of it;
gloo serves CPUs, NCCL serves CUDA.  With one process every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "barrier",
    "gradient_sync",
    "init_distributed",
    "rank_zero_decides",
    "rank_zero_value",
    "resolve_device",
    "wrap_ddp",
]


def init_distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; initialises the process group under torchrun.

    Returns:
      ``(0, 1, 0)`` outside a process group.
    """
    if not dist.is_available():
        return 0, 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return dist.get_rank(), dist.get_world_size(), local_rank


def resolve_device(device: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device to train on: ``device`` if given, else this rank's GPU, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def wrap_ddp(student: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``student`` wrapped in DistributedDataParallel when there are several processes."""
    if world_size == 1:
        return student
    return DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None
    )


def gradient_sync(forward: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """A context for one micro-step's backward: DDP all-reduces gradients only when ``sync``."""
    if not sync and isinstance(forward, DistributedDataParallel):
        return forward.no_sync()
    return contextlib.nullcontext()


def rank_zero_decides(flag: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (so that all stop at the same step)."""
    return rank_zero_value(1.0 if flag else 0.0, world_size, device) > 0


def rank_zero_value(value: float, world_size: int, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (e.g. a rate read from rank 0's clock)."""
    if world_size == 1:
        return value
    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return float(shared.item())


def barrier(world_size: int) -> None:
    """Wait for every process (none to wait for with one)."""
    if world_size > 1:
        dist.barrier()

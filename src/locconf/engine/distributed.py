"""Process-group helpers for ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N script.py`` starts N copies of a script and tells each its place
through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init_distributed` reads them and joins the group (NCCL when CUDA is
available, gloo otherwise); without them everything here degrades to a single process, so the same
code runs with and without ``torchrun``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "init_distributed",
    "cleanup_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "reduce_dict",
    "all_gather_object",
    "wrap_model",
    "unwrap_model",
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world_size, local_rank)``.

    Idempotent: when the group already exists its rank and size are returned. Without
    ``WORLD_SIZE > 1`` in the environment nothing is initialised and ``(0, 1, 0)`` is returned.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (NCCL when CUDA is available, else gloo).
        timeout_s: how long a collective waits for the other processes (None: PyTorch's default,
            30 minutes for gloo); longer where ranks may finish their work hours apart.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        return 0, 1, 0
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    extra = {}
    if timeout_s is not None:
        import datetime

        extra["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **extra)
    return rank, world_size, local_rank


def cleanup_distributed() -> None:
    """Leave and destroy the process group (no-op when there is none)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes logs and checkpoints."""
    return get_rank() == 0


@torch.no_grad()
def reduce_dict(values: dict[str, Tensor], average: bool = True) -> dict[str, Tensor]:
    """All-reduce a dict of scalar tensors over all processes (one collective for the whole dict).

    Keys are processed in sorted order, so every rank must pass the same keys. Returns detached
    tensors; with ``average`` the mean over processes, else the sum. A single process gets its
    (detached) input back.
    """
    if not values:
        return {}
    names = sorted(values)
    for k in names:
        if values[k].numel() != 1:
            raise ValueError(f"values[{k!r}] must be a scalar tensor, got shape {tuple(values[k].shape)}")
    if get_world_size() == 1:
        return {k: values[k].detach() for k in names}
    stacked = torch.stack([values[k].detach().reshape(()).float() for k in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= get_world_size()
    return dict(zip(names, stacked.unbind(0)))


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every process (a one-element list in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(
    model: nn.Module,
    *,
    device: torch.device,
    find_unused_parameters: bool = False,
    sync_batchnorm: bool = False,
) -> nn.Module:
    """Wrap ``model`` (already on ``device``) in DistributedDataParallel when running distributed.

    DDP broadcasts rank 0's parameters and buffers at construction and averages gradients over
    processes in ``backward``. In a single process the model is returned unchanged.

    Args:
        device: the model's device; a CUDA device becomes DDP's ``device_ids``.
        find_unused_parameters: needed when some parameters get no gradient in a step.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm (CUDA only).
    """
    if get_world_size() == 1:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("sync_batchnorm=True needs CUDA devices (SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

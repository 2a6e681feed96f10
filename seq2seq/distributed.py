"""Everything torch.distributed, in one module; every helper is a no-op on a single process.

Workers are started by torchrun (``torch.distributed.run``), which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_from_env`` joins that group. Nothing else in
the package imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: str = "auto", timeout_s: int = 300) -> torch.device | None:
    """Join the process group described by torchrun's environment variables.

    Returns the device this rank should use, or None when not launched by torchrun
    (single process: nothing to join).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on the main rank (None elsewhere); ``[obj]`` on one process."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when running distributed, else ``model``."""
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for this backward when ``skip`` (accumulation micro-steps)."""
    if skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield

"""Everything torch.distributed, in one module; every helper is a no-op on a single process.

Workers are started by torchrun (``torch.distributed.run``), which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_from_env`` joins that group. :func:`launch`
runs torchrun itself inside this process (``seq2seq train`` uses it for multi-process recipes),
and turns a failed worker group into one clear error. Nothing else in the package imports
torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from seq2seq.errors import Seq2SeqError


class DistributedError(Seq2SeqError):
    """The worker group failed for good (after ``max_restarts`` restarts) or never formed."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend_problem(backend: str, device: str) -> str | None:
    """Why ``distributed.backend`` cannot work on this machine (with ``train.device``), or
    None: NCCL needs CUDA GPUs, and a CPU run has no use for it."""
    if backend != "nccl":
        return None
    if not torch.cuda.is_available():
        return "distributed.backend: nccl needs CUDA GPUs and none is available (use gloo)"
    if device == "cpu":
        return "distributed.backend: nccl needs train.device on a GPU, not cpu (use gloo)"
    return None


def init_from_env(backend: str = "auto", timeout_s: int = 300,
                  device: str = "auto") -> torch.device | None:
    """Join the process group described by torchrun's environment variables.

    Returns the device this rank should use, or None when not launched by torchrun (no RANK
    and WORLD_SIZE in the environment: nothing to join). A torchrun group of one process is
    joined too, so that the distributed code path can be checked on a single GPU. Each rank
    takes the GPU of its LOCAL_RANK where ``device`` (``train.device``) is cuda, or auto on a
    machine with GPUs and a backend other than gloo; else the CPU.
    """
    if is_initialized():
        return None
    rank, world, local_rank = environment()
    if world is None:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        raise Seq2SeqError("train.device cuda: no CUDA GPU is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available()
                                     and backend != "gloo")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend=backend, timeout=timeout, store=attempt_store(timeout),
                                rank=rank, world_size=world)
    except (ValueError, RuntimeError) as error:  # no MASTER_ADDR, an address nobody answers at
        raise DistributedError(f"rank {rank}: cannot join the process group of {world} "
                               f"({first_line(error)})") from None
    return device


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name if it has none), at most 200
    characters: torch's errors run to many lines."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def environment() -> tuple[int, int | None, int]:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (WORLD_SIZE None: no group).

    Raises:
        DistributedError: one that is no number or out of range, or LOCAL_RANK without RANK
            and WORLD_SIZE (left in a shell, it made ``seq2seq train`` skip its launcher).
    """
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name)
        if text is not None and not (text.strip().isascii() and text.strip().isdigit()):
            raise DistributedError(f"the environment variable {name}={text!r} is no process "
                                   "number; torchrun sets it (unset it to train here)")
        values[name] = None if text is None else int(text)
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if (rank is None) != (world is None) or (local is not None and world is None):
        given = ", ".join(f"{name}={os.environ[name]}" for name in values if name in os.environ)
        raise DistributedError(f"the environment sets {given} but not all of RANK and "
                               "WORLD_SIZE: a torchrun worker has both (unset it to train here)")
    if world is not None and not rank < world:
        raise DistributedError(f"the environment sets RANK={rank} for WORLD_SIZE={world}")
    return rank or 0, world, local or 0


def attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's store with a prefix per restart attempt; None outside torchrun (env://).

    torchrun's workers join the TCPStore of their agent, which lives as long as the agent. After
    a restart (``--max-restarts``) the new workers would read the keys the old ones left there
    (e.g. a dead peer's gloo address: "Connection refused"), so every attempt gets its own keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size=int(os.environ["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"seq2seq/attempt_{attempt}", store)


def shutdown(wait_for_all: bool = True) -> None:
    """Destroy the process group now, while the interpreter is fully alive.

    Objects that hold the group (a DDP wrapper) should be released first; the collection below
    frees any left in reference cycles, so that nothing reaches the group at interpreter exit.

    Args:
        wait_for_all: meet every rank at a barrier first, so that no rank tears its connections
            down while a peer is still in the last collective (a gloo peer can abort then).
            False after a failure, when the other ranks may never arrive.
    """
    if is_initialized():
        if wait_for_all:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def backend() -> str | None:
    """The process group's backend ("nccl", "gloo"), or None on a single process."""
    return dist.get_backend() if is_initialized() else None


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
    """Sum ``tensor`` over all ranks, in place; returns it.

    NCCL reduces GPU memory only, so a CPU tensor (validation's totals) goes through this
    rank's GPU and back.
    """
    if not is_initialized():
        return tensor
    if backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (``flag`` itself on one process)."""
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# How long the other ranks wait for the main rank's long work alone (preparing a corpus of
# millions of pairs: hashing, a tokenizer, the encoded cache), where distributed.timeout_s is
# for collectives that every rank reaches together. torchrun ends the group if a rank dies.
LONG_WAIT_S = 24 * 3600
POLL_S = 5.0  # the waiting ranks return to Python this often (signals are handled there)


class MainRankFailed(Seq2SeqError):
    """What the main rank did alone failed (it says why itself)."""


def from_main(key: str, work: Callable[[], Any], timeout_s: float = LONG_WAIT_S) -> Any:
    """``work()`` on the main rank; its result (JSON: nothing in the store is executed),
    through the group's store, on every rank. The others wait on the store up to
    ``timeout_s``, not in a collective (whose timeout is ``distributed.timeout_s``), and need
    no second backend.

    Raises:
        MainRankFailed: on the other ranks, when ``work`` raised on the main rank.
    """
    if not is_initialized():
        return work()
    store = dist.distributed_c10d._get_default_store()
    if is_main():
        try:
            result = work()
        except BaseException:
            store.set(key, json.dumps(["failed", None]))
            raise
        store.set(key, json.dumps(["done", result]))
        return result
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        try:
            store.wait([key], datetime.timedelta(seconds=POLL_S))
            break
        except RuntimeError as error:  # not there yet (DistStoreError): wait on, to the deadline
            if time.monotonic() - started < POLL_S / 2:  # no wait: the store itself is gone
                raise MainRankFailed(f"rank {rank()}: lost the group's store while waiting "
                                     f"for the main rank's {key} ({first_line(error)})") from None
            if time.monotonic() > deadline:
                raise MainRankFailed(f"rank {rank()}: waited {timeout_s:g} s for the main "
                                     f"rank's {key}") from None
    status, result = json.loads(store.get(key))
    if status != "done":
        raise MainRankFailed(f"rank {rank()}: the main rank failed in its {key} (its "
                             "output says why)")
    return result


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on the main rank (None elsewhere); ``[obj]`` on one process."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order; ``[obj]`` on one process."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
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


# How gloo says that the other end of a collective went away (a worker killed or crashed),
# and how gloo and NCCL say that a collective waited past the group's timeout.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")
TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout")


def peer_lost(error: BaseException) -> str | None:
    """One line for a torchrun worker whose collective failed because another worker went
    away, else None. torchrun restarts the group or ends the job, naming the worker that
    failed; this one's traceback (gloo's ``RuntimeError``) would only bury that."""
    if "LOCAL_RANK" not in os.environ or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    reason = first_line(error)
    if any(marker in text for marker in TIMED_OUT):
        return (f"rank {os.environ.get('RANK', '?')}: a collective waited longer than "
                f"distributed.timeout_s for another worker ({reason}); raise it if a rank has "
                "long work of its own between collectives, else a worker is stuck")
    if not any(marker in text for marker in PEER_LOST):
        return None
    return (f"rank {os.environ.get('RANK', '?')}: another worker went away during a collective "
            f"({reason})")


def launch(torchrun_argv: list[str]) -> int:
    """Run torchrun with ``torchrun_argv`` (its own command line) in this process.

    torchrun does the rendezvous, starts the workers, restarts the whole group up to
    ``--max-restarts`` times when one fails, and stops the others when one fails for good.

    Returns:
        0 when every worker of the last group exited 0; 128 + the signal's number when the
        launcher was stopped by SIGINT or SIGTERM (130, 143), as one process exits.

    Raises:
        DistributedError: a worker failed after the last restart, or the rendezvous failed;
            one line that names the first failure.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_argv)
    if str(args.nproc_per_node).isdigit() and int(args.nproc_per_node) > 1:
        # What torchrun sets itself where it is unset, with a 4-line warning on every run;
        # the workers' threads come from train.threads.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        how = f"exit code {failure.exitcode}"
        if failure.exitcode < 0:  # killed by a signal: say which
            how = f"killed by {failure.signal_name()}"
        raise DistributedError(
            f"distributed training failed: rank {rank} (local rank {failure.local_rank}, "
            f"pid {failure.pid}) {how} with no restart left (max_restarts "
            f"{args.max_restarts}); the other workers were stopped; see the worker output "
            "above for the cause") from None
    except RendezvousError as error:
        raise DistributedError(
            f"distributed training failed: rendezvous at {args.rdzv_endpoint} "
            f"({type(error).__name__}: {error})") from None
    except SignalException as error:
        # As a run in one process does (seq2seq.training.run_dir.exit_code): a stop, not a
        # failure; torchrun sent the workers SIGTERM, on which each saves after its update.
        print(f"stopped: the launcher received {error.sigval.name} and sent the workers "
              "SIGTERM, on which each saves last.pt after its update; run again to resume",
              file=sys.stderr)
        return 128 + int(error.sigval)
    return 0

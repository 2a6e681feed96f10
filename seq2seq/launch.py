"""Start the worker processes of a multi-process recipe through torchrun.

``seq2seq train RECIPE`` with ``distributed.nproc_per_node * distributed.nnodes > 1`` calls
:func:`launch_workers`, which runs the same command under torchrun; the workers see torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) and train. No launcher of our own: torchrun does
the rendezvous, restarts (``distributed.max_restarts``) and failure propagation. This module
only builds torchrun's command line; :func:`seq2seq.distributed.launch` runs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

from seq2seq import distributed as dist
from seq2seq.config import Recipe
from seq2seq.config.loading import RECIPE_SAID

# Where a worker that stopped on a signal says so to its launcher: torchrun reads a worker's
# non-zero exit as a failure (and restarts the group), so the workers of a stopped run exit 0.
STOP_RECORD = "SEQ2SEQ_STOP_RECORD"


def torchrun_args(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> list[str]:
    """torchrun's command line for this recipe (the workers re-run ``seq2seq train``)."""
    cfg = recipe.distributed
    # On Ctrl-C or SIGTERM torchrun sends its workers SIGTERM, waits, then kills them: each
    # needs to end its update and write last.pt (torchrun's own wait is 30 s).
    args = [f"--nproc-per-node={cfg.nproc_per_node}", f"--nnodes={cfg.nnodes}",
            f"--max-restarts={cfg.max_restarts}", "--rdzv-backend=c10d",
            f"--rdzv-id={cfg.rdzv_id}", f"--shutdown-timeout={cfg.timeout_s}"]
    if cfg.nnodes > 1:
        # Node 0 hosts the rendezvous store at the endpoint, the others connect to it (an
        # explicit is_host, so a busy port on node 0 is an error rather than a silent client).
        # The c10d rendezvous then numbers the workers itself, in the order nodes join.
        is_host = int(cfg.node_rank == 0)
        args += [f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-conf=is_host={is_host}"]
    else:
        # One node: a private rendezvous on a free local port, so two runs never collide.
        args += ["--rdzv-endpoint=127.0.0.1:0"]
    return args + ["-m", "seq2seq", "train", str(recipe_path), *overrides]


def launch_workers(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> int:
    """Train ``recipe`` in torchrun workers; 0 on success, 130 or 143 when stopped by SIGINT
    or SIGTERM (the workers save their last update).

    Raises:
        seq2seq.distributed.DistributedError: the job failed for good (the CLI prints it).
    """
    # The workers read the same command line; this process has said its warnings already.
    os.environ[RECIPE_SAID] = "1"
    with tempfile.TemporaryDirectory(prefix="seq2seq-launch-") as records:
        os.environ[STOP_RECORD] = records
        try:
            code = dist.launch(torchrun_args(recipe, recipe_path, overrides))
        finally:
            del os.environ[STOP_RECORD]
        # What the workers of the last group said (torchrun counts its restarts): -1 ended,
        # else the signal that stopped them (0: a rank's on another node).
        ends = {tuple(map(int, path.name.split("-rank"))): int(path.read_text() or -1)
                for path in Path(records).iterdir()}
    last = max((attempt for attempt, _ in ends), default=None)
    signals = [value for (attempt, _), value in ends.items() if attempt == last and value >= 0]
    if code != 0 or not signals:
        if code == 0:
            print("distributed training finished", file=sys.stderr)
        return code
    # A worker (not this launcher) got the signal: every rank stopped after the same update
    # and saved. Exit as a stopped single process does, so `train && evaluate` stops here.
    signum = max(signals)  # 0: a worker on another node got it
    what = signal.Signals(signum).name if signum else "a stop signal"
    print(f"stopped: a worker received {what}; every worker saved last.pt after the same "
          "update; run again to resume", file=sys.stderr)
    return 128 + (signum or signal.SIGTERM)


def record_end(stopped: bool, signum: int | None) -> None:
    """In a worker started by :func:`launch_workers`: tell the launcher how this run ended,
    ``stopped`` by a signal (``signum``; None: another rank's) or not."""
    records = os.environ.get(STOP_RECORD)
    if records and Path(records).is_dir():  # (the launcher's own node only)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        name = f"{int(attempt) if attempt.isdigit() else 0}-rank{os.environ.get('RANK', '0')}"
        with contextlib.suppress(OSError):  # (a worker that failed here would be restarted)
            (Path(records) / name).write_text(str(signum or 0) if stopped else "-1",
                                              encoding="ascii")

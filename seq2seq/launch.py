"""Start the worker processes of a multi-process recipe through torchrun.

``seq2seq train RECIPE`` with ``distributed.nproc_per_node * distributed.nnodes > 1`` calls
:func:`launch_workers`, which runs the same command under torchrun; the workers see torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) and train. No launcher of our own: torchrun does
the rendezvous, restarts (``distributed.max_restarts``) and failure propagation. This module
only builds torchrun's command line; :func:`seq2seq.distributed.launch` runs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from seq2seq import distributed as dist
from seq2seq.config import Recipe
from seq2seq.config.loading import RECIPE_SAID


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
    code = dist.launch(torchrun_args(recipe, recipe_path, overrides))
    if code == 0:
        print("distributed training finished", file=sys.stderr)
    return code

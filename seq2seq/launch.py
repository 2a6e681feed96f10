"""Start the worker processes of a multi-process recipe through torchrun (torch.distributed.run).

``seq2seq train RECIPE`` with ``distributed.nproc_per_node * distributed.nnodes > 1`` calls
:func:`launch_workers`, which runs the same command under torchrun; the workers see torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) and train. No launcher of our own: torchrun does
the rendezvous, restarts (``distributed.max_restarts``) and failure propagation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from seq2seq.config import Recipe
from seq2seq.errors import Seq2SeqError


def torchrun_args(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> list[str]:
    """torchrun's command line for this recipe."""
    cfg = recipe.distributed
    args = [f"--nproc-per-node={cfg.nproc_per_node}", f"--nnodes={cfg.nnodes}",
            f"--max-restarts={cfg.max_restarts}"]
    if cfg.nnodes > 1:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                 f"--rdzv-id={cfg.rdzv_id}", f"--node-rank={cfg.node_rank}"]
    else:
        # One node: a private rendezvous on a free local port, so two runs never collide.
        args += ["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                 f"--rdzv-id={cfg.rdzv_id}"]
    return args + ["-m", "seq2seq", "train", str(recipe_path), *overrides]


def launch_workers(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(recipe, recipe_path, overrides))
    try:
        run(args)
    except ChildFailedError as error:
        first = next(iter(error.failures.values()), None)
        detail = f" (rank {first.global_rank}, exit code {first.exitcode})" if first else ""
        raise Seq2SeqError(f"distributed training failed{detail}; see the worker output above "
                           "for the cause") from None
    print(f"distributed training finished ({sys.argv[0]})", file=sys.stderr)
    return 0

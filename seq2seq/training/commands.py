"""The two commands of a run directory: ``seq2seq prepare`` and ``seq2seq train``, which
trains here or launches torchrun workers that train (:mod:`seq2seq.launch`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from seq2seq.config import Recipe
from seq2seq.data.cache import prepare_data
from seq2seq.locks import held_for_children
from seq2seq.training.run_dir import exit_code
from seq2seq.training.trainer import fit, open_run


def train_command(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> int:
    """``seq2seq train``: launch workers through torchrun when asked for, else train here."""
    cfg = recipe.distributed
    if cfg.nproc_per_node * cfg.nnodes > 1 and "LOCAL_RANK" not in os.environ:
        from seq2seq.launch import launch_workers

        if cfg.nnodes > 1:  # (the main rank, on whichever node, takes the run's lock)
            return launch_workers(recipe, recipe_path, overrides)
        # A run that cannot resume is one line here, not one per worker amid torchrun's output;
        # the lock is held here for the workers' whole run: no second launch slips in first.
        run, _ = open_run(recipe, cfg.nproc_per_node * recipe.train.accumulate)
        # Workers can outlive this process's wait for them (a second Ctrl-C cuts torchrun's
        # short) and take the lock over: its file stays, even in a directory made here.
        run.created.clear()
        try:
            with held_for_children(run.path):
                return launch_workers(recipe, recipe_path, overrides)
        finally:
            run.close()
    trainer = fit(recipe)
    return exit_code(trainer.stop_signal, trainer.interrupted, "LOCAL_RANK" in os.environ)


def prepare_command(recipe: Recipe) -> Any:
    """``seq2seq prepare``: the tokenizer and encoded cache that ``train`` would build, under
    the run's lock, and for a run that has checkpoints only the corpus and tokenizer they were
    trained on (never a tokenizer retrained under trained weights). Returns the data."""
    run, found = open_run(recipe, group_size=None)
    try:
        return prepare_data(recipe, show_progress=True,
                            expect=found[1].get("fingerprints") if found else None)
    finally:
        run.close()

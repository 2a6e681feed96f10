"""Checkpoint averaging at the end of a run (``train.average_last``).

The weights of the newest N step checkpoints are averaged (as ``seq2seq average`` does) into
``<output_dir>/averaged.pt``, which is validated like the others: its metrics are logged as a
``split: averaged`` row of metrics.jsonl, and ``eval.checkpoint: averaged`` evaluates it.
Averaging the last checkpoints of a run smooths the noise of the final updates (Vaswani et al.
2017 §6.1 average the last 5 or 20 checkpoints); the last N, not the best N, so that the result
does not depend on the validation set it is then scored on.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch

from seq2seq import distributed as dist
from seq2seq.checkpoint import average_checkpoints, load_checkpoint, load_weights
from seq2seq.config import Recipe
from seq2seq.training.run_dir import RunDirectory, format_metrics
from seq2seq.training.validation import validate


def average_and_validate(run: RunDirectory, model: torch.nn.Module, data: Any, recipe: Recipe,
                         device: torch.device, step: int, epoch: int) -> dict[str, float]:
    """Write averaged.pt from the newest ``train.average_last`` step checkpoints; validate it.

    Every rank takes part (validation is shared out); ``model`` itself is left as it is.
    """
    wanted = recipe.train.average_last
    paths = run.step_checkpoints()[-wanted:]
    target = run.path / "averaged.pt"
    if dist.is_main():
        average_checkpoints(paths, target)
        if len(paths) < wanted:
            print(f"note: train.average_last={wanted}, but the run has {len(paths)} step "
                  "checkpoint(s); averaged those", file=sys.stderr)
    dist.barrier()  # the other ranks read what the main rank wrote
    averaged = copy.deepcopy(model)
    load_weights(averaged, load_checkpoint(target, map_location=device)["model"], target)
    for module in averaged.modules():
        if isinstance(module, torch.nn.RNNBase):
            # A deep copy no longer shares cuDNN's single weight buffer (which made each RNN
            # call on a GPU copy its weights first, with a warning); a no-op on the CPU.
            module.flatten_parameters()
    metrics = validate(averaged, data.valid, data.tokenizer, recipe, device)
    run.log({"step": step, "split": "averaged", "epoch": epoch, **metrics})
    if dist.is_main():
        print(f"averaged.pt (last {len(paths)} step checkpoints): {format_metrics(metrics)}",
              file=sys.stderr)
    return metrics

"""One update: forward, loss and backward over a rank's micro-batches, then clip and step.

The loss of an update is the label-smoothed cross-entropy summed over every target token of the
*global* batch (all ranks, all accumulation steps) divided by that batch's target-token count, so
an update does not depend on how the batch is split.

Two implementations share one interface: :meth:`accumulate` (gradients of the micro-batches),
:meth:`apply` (clip, skip a non-finite update, step), :meth:`count` and :meth:`sync` (updates
skipped for a non-finite loss or gradient), :meth:`state_dict`.

- :class:`EagerStep` runs the model as it is (under DDP with several processes), autocasts
  (bf16 on a GPU or CPU, or fp16 with a grad scaler on a GPU) and recovers from a GPU
  out-of-memory error by splitting the batch.
- :class:`GraphedStep` pads batches to bucket shapes and replays each program as a CUDA graph
  (:mod:`seq2seq.training.graphs`); it counts skipped updates on the device.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seq2seq import distributed as dist
from seq2seq.config import Recipe, TrainConfig
from seq2seq.config.checks import recipe_warnings, warmup_warnings
from seq2seq.data.batching import SORT_CHUNK, collate, epoch_batches
from seq2seq.errors import Seq2SeqError, warn
from seq2seq.models.gemm import fp32_backend
from seq2seq.precision import precision_dtype, resolve_precision
from seq2seq.training.graphs import StaticSteps, bucket_shape
from seq2seq.training.loss import linear_cross_entropy, rdrop_cross_entropy
from seq2seq.training.optim import load_optimizer_state, make_optimizer
from seq2seq.training.progress import Progress


class TrainingStopped(Seq2SeqError):
    """Training ended early for a reason the user must see (e.g. repeated non-finite losses)."""


class BatchOutOfMemory(Exception):
    """A micro-batch ran out of (GPU) memory; :meth:`EagerStep.accumulate` splits it."""

    def __init__(self, sentences: int, tokens: int):
        super().__init__(f"out of memory on a batch of {sentences} sentences x {tokens} tokens")


def build_step(model: torch.nn.Module, recipe: Recipe, device: torch.device, train_set: Any,
               trg_lens: np.ndarray, last_checkpoint: Path, graphs: bool | None = None,
               capture: bool = True) -> EagerStep | GraphedStep:
    """The update step of this run: CUDA-graphed when the recipe asks for it on a GPU.

    Args:
        model: the model itself (the eager step wraps it in DDP with several processes).
        train_set: the encoded training pairs; ``trg_lens`` their target lengths.
        last_checkpoint: named when too many non-finite updates stop the run.
        graphs: force the graphed path (None: ``train.cuda_graphs`` on a GPU).
        capture: record CUDA graphs; False runs the graphed path's programs eagerly.
    """
    say_recipe_warnings(recipe, trg_lens)
    cfg = recipe.train
    use_graphs = cfg.cuda_graphs and device.type == "cuda" if graphs is None else graphs
    if cfg.cuda_graphs and not use_graphs and dist.is_main():
        print("note: train.cuda_graphs applies on a GPU only; training eagerly", file=sys.stderr)
    if use_graphs and cfg.rdrop_alpha > 0:
        use_graphs = False
        if dist.is_main():
            print("note: train.rdrop_alpha has no CUDA-graph program; training eagerly",
                  file=sys.stderr)
    # With graphs the gradients are summed over ranks by StaticSteps, not by DDP (whose
    # hooks cannot be recorded); every rank starts from the same seeded weights.
    ddp_model = model if use_graphs else dist.wrap_ddp(model, device)
    optimizer = make_optimizer(model, recipe, device, static=use_graphs)
    dtype = autocast_dtype(cfg.precision, device)
    parts = (model, optimizer, train_set, trg_lens, cfg, dtype, last_checkpoint)
    if use_graphs:
        return GraphedStep(*parts, capture=capture)
    return EagerStep(*parts, ddp_model=ddp_model)


def say_recipe_warnings(recipe: Recipe, trg_lens: np.ndarray) -> None:
    """Say (main process) what the recipe asks for that this run will not do
    (:func:`~seq2seq.config.checks.recipe_warnings`), and a warm-up as long as a run set in
    epochs, whose updates the training pairs' target lengths ``trg_lens`` decide."""
    if not dist.is_main():
        return
    cfg, found = recipe.train, recipe_warnings(recipe)
    # With train.max_steps at most the warm-up, recipe_warnings has said it; subword
    # regularisation re-tokenises every epoch, so its batches are not known in advance.
    if cfg.warmup_steps and cfg.max_epochs and not cfg.sample_alpha and not (
            cfg.max_steps and cfg.max_steps <= cfg.warmup_steps):
        group = dist.world_size() * cfg.accumulate
        # The batches are cut by target length: the source lengths (a secondary sort key)
        # change their order, not their count.
        per_epoch = len(epoch_batches(trg_lens, trg_lens, cfg.batch_tokens,
                                      cfg.batch_sentences, recipe.seed, 0, group)) // group
        about = "about " if len(trg_lens) > SORT_CHUNK else ""  # (chunks differ by epoch)
        found += warmup_warnings(cfg, per_epoch * cfg.max_epochs, (
            f"the run's {about}{per_epoch * cfg.max_epochs} updates (train.max_epochs "
            f"{cfg.max_epochs} x {per_epoch} an epoch)"))
    for message in found:
        warn(message)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: fp32); says once, on the
    main process, what ``auto`` (or a precision the device cannot use) became and why."""
    resolved, why = resolve_precision(precision, device)
    if why != "as asked" and dist.is_main():
        print(f"note: train.precision={precision}: training in {resolved} ({why})",
              file=sys.stderr)
    if resolved == "fp32" and device.type == "cpu" and fp32_backend()[0] == "onednn" \
            and dist.is_main():  # torch's default, BLAS, goes without saying
        print(f"note: fp32 matrix products by oneDNN ({fp32_backend()[1]})", file=sys.stderr)
    return precision_dtype(resolved)


class _Step:
    """What both steps share: the optimizer, the grad scaler and the skipped-update limit."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_set: Any,
                 trg_lens: np.ndarray, cfg: TrainConfig, dtype: torch.dtype | None,
                 last_checkpoint: Path):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.train_set, self.trg_lens = train_set, trg_lens
        self.autocast_dtype = dtype
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype is torch.float16)
        self.last_checkpoint = last_checkpoint

    def use_pairs(self, train_set: Any, trg_lens: np.ndarray) -> None:
        """Train on other pairs from now on (an epoch's re-tokenised ones)."""
        self.train_set, self.trg_lens = train_set, trg_lens

    @property
    def precision(self) -> str:
        """What this step computes in, resolved (``train.precision: auto`` stored as such
        would not say what a run trained in)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype, "fp32")

    @property
    def products(self) -> str:
        """Which library this step's fp32 CPU products run on, "onednn" or "blas"
        (:mod:`seq2seq.models.gemm`); "torch" for bf16/fp16 and on a GPU."""
        if self.precision == "fp32" and self.device.type == "cpu":
            return fp32_backend()[0]
        return "torch"

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "precision": self.precision, "products": self.products}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        before = state.get("precision")  # absent in checkpoints written before it was kept
        if before is not None and before != self.precision and dist.is_main():
            print(f"note: this run computed in {before} up to its checkpoint and continues in "
                  f"{self.precision} (train.precision={self.cfg.precision} on this machine); "
                  "a resume is bitwise only within one precision", file=sys.stderr)
        products = state.get("products")  # absent before fp32 products could go to oneDNN
        if before == self.precision and products not in (None, self.products) \
                and dist.is_main():
            print(f"note: this run's fp32 products ran on {products} up to its checkpoint and "
                  f"continue on {self.products} (SEQ2SEQ_FP32_GEMM on this machine: "
                  f"{fp32_backend()[1]}); a resume is bitwise only on one", file=sys.stderr)

    def start(self, progress: Progress) -> None:
        """Called once the (resumed) optimizer state and progress are in place."""

    def close(self) -> None:
        """Let go of anything that holds the process group."""

    def count(self, ok: bool, progress: Progress) -> None:
        """Count an update that :meth:`apply` skipped (where the host knows of it)."""

    def sync(self, progress: Progress) -> None:
        """Bring skipped-update counts kept elsewhere (the device) into ``progress``."""

    def check_in_a_row(self, in_a_row: int) -> None:
        if in_a_row >= self.cfg.max_bad_steps:
            raise TrainingStopped(
                f"stopping: {in_a_row} updates in a row had a non-finite loss or "
                f"gradient (train.max_bad_steps={self.cfg.max_bad_steps}); the last "
                f"good checkpoint is {self.last_checkpoint}")


class EagerStep(_Step):
    """The update as PyTorch runs it: DDP sums gradients, a GPU OOM splits the batch."""

    def __init__(self, *parts: Any, ddp_model: torch.nn.Module):
        super().__init__(*parts)
        self.ddp_model = ddp_model
        self.world = dist.world_size()

    def close(self) -> None:
        self.ddp_model = self.model

    def accumulate(self, micro_batches: list, global_tokens: int) -> torch.Tensor:
        """One update's gradients from this rank's micro-batches; returns the summed loss.

        A GPU out-of-memory error on a micro-batch is recovered from, not fatal: the gradients
        of the update are dropped (the failed backward may have added part of its own) and the
        whole update is redone with every micro-batch split in halves, recursively. The
        normalisation by ``global_tokens`` stays, so the update is mathematically the same.
        """
        while True:
            try:
                return self.forward_backward(micro_batches, global_tokens)
            except BatchOutOfMemory as error:
                message = str(error)
            # Out of the handler, the failed pass's tensors are released and can be freed.
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.world > 1:
                # Ranks would disagree on their number of backward passes and all-reduces.
                raise TrainingStopped(f"{message}; with several processes this cannot be "
                                      "recovered from: lower train.batch_tokens")
            if all(len(indices) == 1 for indices in micro_batches):
                raise TrainingStopped(f"{message}: one sentence does not fit in memory; lower "
                                      "data.max_src_tokens / data.max_trg_tokens")
            print(f"warning: {message}; splitting it", file=sys.stderr)
            micro_batches = [half for indices in micro_batches
                             for half in (indices[:len(indices) // 2],
                                          indices[len(indices) // 2:]) if len(half)]

    def forward_backward(self, micro_batches: list, global_tokens: int) -> torch.Tensor:
        """Forward and backward every micro-batch, summing gradients; returns the summed loss."""
        dtype = self.autocast_dtype
        # DDP averages gradients over ranks; scaling by world size turns that into the sum,
        # so the update is (sum of token losses) / (global target tokens).
        norm = self.world / global_tokens
        loss_total = torch.zeros((), device=self.device)
        for i, indices in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            out_of_memory = False
            try:
                batch = collate(self.train_set, indices, self.device)
                src, src_lens, trg_in = batch.src, batch.src_lens, batch.trg_in
                rdrop = self.cfg.rdrop_alpha > 0
                if rdrop:
                    # Every sentence twice in one batch: each copy draws its own dropout masks.
                    src, src_lens = src.repeat(2, 1), src_lens.repeat(2)
                    trg_in = trg_in.repeat(2, 1)
                with dist.no_sync(self.ddp_model, skip=not last):
                    with torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                        enabled=dtype is not None):
                        hidden = self.ddp_model(src, src_lens, trg_in, features=True)
                    if rdrop:
                        objective, loss = rdrop_cross_entropy(
                            hidden.flatten(0, 1), self.model.decoder.output,
                            batch.trg_out.flatten(), self.cfg.label_smoothing,
                            self.cfg.rdrop_alpha)
                    else:
                        objective = loss = linear_cross_entropy(
                            hidden.flatten(0, 1), self.model.decoder.output,
                            batch.trg_out.flatten(), self.cfg.label_smoothing)
                    self.scaler.scale(objective * norm).backward()
            except torch.OutOfMemoryError:
                out_of_memory = True  # raised below, where the error's traceback is gone
            if out_of_memory:
                longest = int(self.trg_lens[indices].max()) + 1  # + EOS
                raise BatchOutOfMemory(len(indices), longest)
            loss_total += loss.detach()
        return loss_total

    def apply(self, lr: float) -> bool:
        """Clip, check for non-finite gradients, step; False when the update was skipped."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.clip_norm if self.cfg.clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm))
        if finite or self.scaler.is_enabled():
            # With fp16 the scaler itself skips non-finite steps and lowers its scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def count(self, ok: bool, progress: Progress) -> None:
        """Count a skipped update; stop after ``train.max_bad_steps`` in a row."""
        if ok:
            progress.bad_updates = 0
            return
        progress.bad_updates += 1
        progress.skipped_updates += 1
        if dist.is_main():
            print(f"warning: step {progress.step}: non-finite loss or gradient; update skipped "
                  f"({progress.skipped_updates} so far)", file=sys.stderr)
        self.check_in_a_row(progress.bad_updates)


class GraphedStep(_Step):
    """The update as fixed-shape programs, replayed as CUDA graphs (not split on OOM)."""

    def __init__(self, *parts: Any, capture: bool):
        super().__init__(*parts)
        self.capture = capture
        self.static: StaticSteps | None = None

    def start(self, progress: Progress) -> None:
        """Record the programs around the (resumed) optimizer; restore the skip counters."""
        self.static = StaticSteps(self.model, self.optimizer, self.cfg.clip_norm,
                                  self.cfg.label_smoothing, self.autocast_dtype, self.capture)
        self.static.set_bad_updates(progress.bad_updates, progress.skipped_updates)

    def accumulate(self, micro_batches: list, global_tokens: int) -> torch.Tensor:
        """:meth:`EagerStep.accumulate` as forward-backward replays into fixed buffers."""
        loss_total = torch.zeros((), device=self.device)
        for indices in micro_batches:
            batch = collate(self.train_set, indices)  # padded to its bucket on the host
            out_of_memory = False
            try:
                loss_total += self.static.run_forward_backward(batch, 1.0 / global_tokens)
            except torch.OutOfMemoryError:
                out_of_memory = True  # raised below, where the error's traceback is gone
            if out_of_memory:
                # A graph's shapes are fixed when it is recorded, so the batch cannot be split
                # and retried as the eager path does.
                rows, src_len, trg_len = bucket_shape(batch)
                raise TrainingStopped(
                    f"out of GPU memory on a CUDA-graph bucket of {rows} sentences x "
                    f"{src_len} source x {trg_len} target tokens; lower train.batch_tokens, or "
                    f"set train.cuda_graphs=false (the eager path splits such batches)")
        return loss_total

    def apply(self, lr: float) -> bool:
        """Replay the update; the non-finite check happens on the device, so this is True
        and skipped updates are counted by :meth:`sync`."""
        self.static.run_update(lr)
        return True

    def sync(self, progress: Progress) -> None:
        """Read the device's skipped-update counters (a host synchronisation)."""
        in_a_row, worst, skipped = self.static.read_bad_updates()
        if skipped > progress.skipped_updates and dist.is_main():
            print(f"warning: step {progress.step}: {skipped - progress.skipped_updates} "
                  f"update(s) skipped since the last report (non-finite loss or gradient; "
                  f"{skipped} so far)", file=sys.stderr)
        progress.bad_updates, progress.skipped_updates = in_a_row, skipped
        self.check_in_a_row(worst)

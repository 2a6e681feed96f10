"""Training: setup -> fit -> train_step / validate.

The loss of an update is the label-smoothed cross-entropy summed over every target token of the
*global* batch (all ranks, all accumulation steps) divided by that batch's target-token count, so
an update does not depend on how the batch is split. Batches come from the deterministic
(seed, epoch) batching, so a run resumed from a checkpoint at step k sees exactly the batches an
uninterrupted run would, and (with every RNG state restored) ends bit for bit where it would have
on the CPU. (With CUDA graphs the warm-ups and captures draw dropout masks too, so a resumed
graphed run sees the same batches but not the same masks.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seq2seq import distributed as dist
from seq2seq.checkpoint import (
    check_resumable,
    load_latest,
    remove_partial_writes,
    save_checkpoint,
)
from seq2seq.config import Recipe, recipe_to_dict, recipe_to_yaml
from seq2seq.errors import Seq2SeqError
from seq2seq.optim import Schedule, load_optimizer_state, make_optimizer
from seq2seq.tokenizer import PAD
from seq2seq.translate import resolve_device


class TrainingStopped(Seq2SeqError):
    """Training ended early for a reason the user must see (e.g. repeated non-finite losses)."""


class BatchOutOfMemory(Exception):
    """A micro-batch ran out of (GPU) memory; ``train_step`` splits it and tries again."""

    def __init__(self, sentences: int, tokens: int):
        super().__init__(f"out of memory on a batch of {sentences} sentences x {tokens} tokens")


def train_command(recipe: Recipe, recipe_path: Path, overrides: list[str]) -> int:
    """``seq2seq train``: launch workers through torchrun when asked for, else train here."""
    cfg = recipe.distributed
    wanted = cfg.nproc_per_node * cfg.nnodes
    if wanted > 1 and "LOCAL_RANK" not in os.environ:
        from seq2seq.launch import launch_workers

        return launch_workers(recipe, recipe_path, overrides)
    trainer = fit(recipe)
    if trainer.stop_signal is None or "LOCAL_RANK" in os.environ:
        # torchrun reads a worker's non-zero exit as a failure and restarts the group; its
        # launcher exits 2 itself when signalled (seq2seq.distributed.launch).
        return 0
    # The shell's convention for a signalled process (130 for SIGINT, 143 for SIGTERM), after
    # the clean save: `seq2seq train R && seq2seq evaluate R` stops after Ctrl-C.
    return 128 + trainer.stop_signal


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def check_output_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise Seq2SeqError(f"output_dir {path}: exists and is not a directory")


@dataclasses.dataclass
class Progress:
    """Where training is: everything besides tensors that a checkpoint must restore."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # steps of the current epoch already done
    best_value: float | None = None
    best_step: int = 0
    bad_validations: int = 0  # for early stopping
    bad_updates: int = 0  # non-finite updates in a row
    skipped_updates: int = 0


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "bleu" else value < best


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class Trainer:
    """Holds the pieces of one run; ``fit`` drives it."""

    def __init__(self, recipe: Recipe):
        from seq2seq.data.cache import prepare_data
        from seq2seq.models.seq2seq import build_model

        self.recipe = recipe
        cfg = recipe.train
        self.out = Path(recipe.output_dir)
        check_output_dir(self.out)
        dist_device = dist.init_from_env(recipe.distributed.backend, recipe.distributed.timeout_s)
        self.device = dist_device or resolve_device(cfg.device, what="train.device")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        # A run that cannot be resumed is refused before prepare_data could retrain its
        # tokenizer or add a cache for a recipe it will not train with.
        self.found = self.latest_checkpoint()
        if dist.is_main():
            # prepare_data first: it reports bad corpora before anything is written.
            self.data = prepare_data(recipe, show_progress=True)
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()  # other ranks reuse the cache the main rank built
        if not dist.is_main():
            self.data = prepare_data(recipe, show_progress=False)
        tok = self.data.tokenizer
        torch.manual_seed(recipe.seed)
        self.model = build_model(recipe.model, tok.src_vocab_size, tok.trg_vocab_size)
        self.model.to(self.device)
        if dist.is_main():
            group = (f" in a process group of {self.world} ({dist.backend()})"
                     if dist.is_initialized() else "")
            print(f"model: {self.model.num_parameters:,} parameters; training on "
                  f"{self.device}{group}", file=sys.stderr)
        use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        if cfg.cuda_graphs and not use_graphs and dist.is_main():
            print("note: train.cuda_graphs applies on a GPU only; training eagerly",
                  file=sys.stderr)
        # With graphs the gradients are summed over ranks by StaticSteps, not by DDP (whose
        # hooks cannot be recorded); every rank starts from the same seeded weights.
        self.ddp_model = self.model if use_graphs else dist.wrap_ddp(self.model, self.device)
        self.optimizer = make_optimizer(self.model, recipe, self.device, static=use_graphs)
        self.schedule = Schedule(cfg.lr, cfg.schedule, cfg.warmup_steps, cfg.min_lr,
                                 cfg.plateau_factor, cfg.plateau_patience)
        # Mixed precision is a GPU feature here: CPU autocast is slower and fails for LSTMs.
        self.autocast_dtype = None
        if self.device.type == "cuda":
            self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                cfg.precision)
        elif cfg.precision != "fp32" and dist.is_main():
            print(f"note: train.precision={cfg.precision} applies on GPU only; training in fp32 "
                  "on the CPU", file=sys.stderr)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.autocast_dtype is torch.float16)
        self.progress = Progress()
        # Dropout streams differ per rank; rank 0 of a 1-process run uses the recipe seed.
        torch.manual_seed(recipe.seed + 1000 * self.rank)
        self.stop_reason: str | None = None
        # This session's training throughput: target tokens, and seconds spent validating.
        self.loop_start, self.session_tokens, self.validation_s = time.perf_counter(), 0, 0.0
        self.resume()
        self.static = None
        if use_graphs:
            from seq2seq.graphs import StaticSteps

            self.static = StaticSteps(self.model, self.optimizer, cfg.clip_norm,
                                      cfg.label_smoothing, self.autocast_dtype, capture=True)
            self.static.set_bad_updates(self.progress.bad_updates,
                                        self.progress.skipped_updates)
        self.open_tensorboard()

    # ---- checkpoints ------------------------------------------------------------------------

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from, if any, once it is known that resuming is right."""
        if dist.is_main():  # a run killed while writing a checkpoint leaves its temporary file
            remove_partial_writes(self.out)
        dist.barrier()  # no rank reads the directory while the main rank cleans it
        found = load_latest([self.out / "last.pt"] + self.step_checkpoints()[::-1])
        if found is None:
            return None
        ckpt = found[1]
        check_resumable(ckpt["recipe"], self.recipe)
        saved_group = ckpt.get("group_size", self.world * self.recipe.train.accumulate)
        if saved_group != self.world * self.recipe.train.accumulate:
            # The epoch position counts updates of (world size x accumulate) batches.
            raise Seq2SeqError(
                f"cannot resume {self.out}: it was trained with {saved_group} batches per update "
                f"(processes x train.accumulate), this run uses {self.world} x "
                f"{self.recipe.train.accumulate}; keep the product equal")
        return found

    def resume(self) -> None:
        found, self.found = self.found, None  # the checkpoint's memory is freed after loading
        if found is None:
            return
        path, ckpt = found
        self.model.load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        rng = ckpt["rng"][self.rank] if self.rank < len(ckpt["rng"]) else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.resumed_from = (path, self.progress.step)
        if dist.is_main():
            print(f"resuming from {path} at step {self.progress.step} ({self.epoch_position()})",
                  file=sys.stderr)

    def epoch_position(self) -> str:
        progress = self.progress
        if progress.epoch_step == 0:
            return f"after epoch {progress.epoch}" if progress.epoch else "before epoch 1"
        return f"epoch {progress.epoch + 1}, {progress.epoch_step} updates into it"

    def epoch_label(self) -> int:
        """The epoch the latest update belongs to (1-based) for logged rows."""
        progress = self.progress
        return progress.epoch + (1 if progress.epoch_step > 0 or progress.epoch == 0 else 0)

    def step_checkpoints(self) -> list[Path]:
        return sorted(self.out.glob("step_*.pt"))

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` (all ranks take part: RNG states are gathered)."""
        self.read_bad_updates()
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = dist.gather_objects(rng)
        if not dist.is_main():
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "group_size": self.world * self.recipe.train.accumulate,
            "rng": rngs,
            "recipe": recipe_to_dict(self.recipe),
            "tokenizer": self.data.tokenizer.to_state(),
            "step": self.progress.step,
        }
        save_checkpoint(payload, self.out / name)

    def save_periodic(self) -> None:
        keep = self.recipe.train.keep_last
        if keep:
            self.save(f"step_{self.progress.step:08d}.pt")
            if dist.is_main():
                for old in self.step_checkpoints()[:-keep]:
                    old.unlink(missing_ok=True)
                    old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        self.save("last.pt")

    # ---- logging ----------------------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        if not dist.is_main():
            return
        # JSON has no NaN or infinity: a non-finite value (a skipped update) is written as null.
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in row.items()}
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "split", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{row['split']}/{key}", value, row["step"])
            self.tensorboard.flush()

    def open_tensorboard(self) -> None:
        """A TensorBoard writer in <output_dir>/tensorboard when the recipe asks for one."""
        self.tensorboard = None
        if not self.recipe.train.tensorboard or not dist.is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise Seq2SeqError("train.tensorboard: true needs the tensorboard package "
                               "(pip install 'seq2seq[tensorboard]')") from None
        self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))

    # ---- one update -------------------------------------------------------------------------

    def train_step(self, micro_batches: list, global_tokens: int) -> torch.Tensor:
        """One update's gradients from this rank's micro-batches; returns the summed loss.

        A GPU out-of-memory error on a micro-batch is recovered from, not fatal: the gradients
        of the update are dropped (the failed backward may have added part of its own) and the
        whole update is redone with every micro-batch split in halves, recursively. The
        normalisation by ``global_tokens`` stays, so the update is mathematically the same.
        (Not with CUDA graphs, whose bucket shapes are fixed: there the error stops the run
        with a message naming the bucket.)
        """
        if self.static is not None:
            return self.static_accumulate(micro_batches, global_tokens)
        while True:
            try:
                return self.accumulate(micro_batches, global_tokens)
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

    def accumulate(self, micro_batches: list, global_tokens: int) -> torch.Tensor:
        """Forward and backward every micro-batch, summing gradients; returns the summed loss."""
        from seq2seq.data.batching import collate

        cfg = self.recipe.train
        autocast_dtype = self.autocast_dtype
        # DDP averages gradients over ranks; scaling by world size turns that into the sum,
        # so the update is (sum of token losses) / (global target tokens).
        norm = self.world / global_tokens
        loss_total = torch.zeros((), device=self.device)
        for i, indices in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            out_of_memory = False
            try:
                batch = collate(self.data.train, indices, self.device)
                with dist.no_sync(self.ddp_model, skip=not last):
                    with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        logits = self.ddp_model(batch.src, batch.src_lens, batch.trg_in)
                    loss = F.cross_entropy(logits.float().flatten(0, 1),
                                           batch.trg_out.flatten(), ignore_index=PAD,
                                           reduction="sum", label_smoothing=cfg.label_smoothing)
                    self.scaler.scale(loss * norm).backward()
            except torch.OutOfMemoryError:
                out_of_memory = True  # raised below, where the error's traceback is gone
            if out_of_memory:
                longest = int(self.data.train_lengths()[1][indices].max()) + 1  # + EOS
                raise BatchOutOfMemory(len(indices), longest)
            loss_total += loss.detach()
        return loss_total

    def static_accumulate(self, micro_batches: list, global_tokens: int) -> torch.Tensor:
        """:meth:`accumulate` with CUDA graphs: forward-backward replays into fixed buffers."""
        from seq2seq.data.batching import collate
        from seq2seq.graphs import bucket_shape

        loss_total = torch.zeros((), device=self.device)
        for indices in micro_batches:
            batch = collate(self.data.train, indices)  # padded to its bucket on the host
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

    def apply_update(self, lr: float) -> bool:
        """Clip, check for non-finite gradients, step; False when the update was skipped.

        With CUDA graphs the check happens on the device and this returns True; the skipped
        updates are counted by :meth:`read_bad_updates`.
        """
        if self.static is not None:
            self.static.run_update(lr)
            return True
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        cfg = self.recipe.train
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm))
        if finite or self.scaler.is_enabled():
            # With fp16 the scaler itself skips non-finite steps and lowers its scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    # ---- validation -------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        from seq2seq.validation import validate

        return validate(self.model, self.data.valid, self.data.tokenizer, self.recipe,
                        self.device)

    def after_validation(self, metrics: dict[str, float], scheduled: bool) -> None:
        """best.pt, plateau schedule and early stopping bookkeeping."""
        cfg = self.recipe.train
        progress = self.progress
        value = metrics[cfg.early_stop_metric]
        improved = better(cfg.early_stop_metric, value, progress.best_value)
        if improved:
            progress.best_value, progress.best_step = value, progress.step
        if scheduled:
            # Only scheduled validations drive the schedule and patience, so a run stopped
            # and resumed makes exactly the decisions an uninterrupted run makes.
            self.schedule.validated(improved)
            progress.bad_validations = 0 if improved else progress.bad_validations + 1
            if cfg.patience and progress.bad_validations >= cfg.patience:
                self.stop_reason = (f"early stopping: no {cfg.early_stop_metric} improvement "
                                    f"in {cfg.patience} validations")
        if improved:
            self.save("best.pt")

    # ---- fit --------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until a stop condition, then write ``last.pt``; SIGINT/SIGTERM stop it cleanly."""
        previous = self.install_signal_handlers()
        try:
            self.train_loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def train_loop(self) -> None:
        from tqdm import tqdm

        from seq2seq.data.batching import epoch_batches, rank_steps

        cfg, progress = self.recipe.train, self.progress
        if dist.is_main():
            (self.out / "recipe.yaml").write_text(recipe_to_yaml(self.recipe), encoding="utf-8")
        src_lens, trg_lens = self.data.train_lengths()
        group = self.world * cfg.accumulate
        bar = tqdm(total=cfg.max_steps or None, initial=progress.step, disable=not dist.is_main(),
                   desc="train", dynamic_ncols=True)
        window_loss = torch.zeros((), device=self.device)
        window_tokens, window_start = 0, time.perf_counter()
        self.loop_start = window_start
        self.model.train()
        while self.stop_reason is None:
            if cfg.max_epochs and progress.epoch >= cfg.max_epochs:
                self.stop_reason = f"reached train.max_epochs={cfg.max_epochs}"
                break
            batches = epoch_batches(trg_lens, src_lens, cfg.batch_tokens, cfg.batch_sentences,
                                    self.recipe.seed, progress.epoch, group)
            steps = rank_steps(batches, self.rank, self.world, cfg.accumulate)
            for s in range(progress.epoch_step, len(steps)):
                global_batch = batches[s * group:(s + 1) * group]
                global_tokens = int(sum(int(trg_lens[i].sum()) for i in global_batch)
                                    + sum(len(i) for i in global_batch))  # + one EOS each
                lr = self.schedule.at(progress.step + 1)
                window_loss += self.train_step(steps[s], global_tokens)
                ok = self.apply_update(lr)
                progress.step += 1
                progress.epoch_step = s + 1
                window_tokens += global_tokens
                self.session_tokens += global_tokens
                bar.update(1)
                self.count_bad_update(ok)
                if progress.step % cfg.log_every == 0:
                    self.read_bad_updates()
                    loss = dist.all_reduce_sum(window_loss.clone()).item() / window_tokens
                    rate = window_tokens / (time.perf_counter() - window_start)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                    self.log({"step": progress.step, "split": "train", "epoch": self.epoch_label(),
                              "loss": loss, "lr": lr, "tokens_per_s": rate})
                    window_loss.zero_()
                    window_tokens, window_start = 0, time.perf_counter()
                if progress.step % cfg.valid_every == 0:
                    self.validate_and_save(scheduled=True)
                if cfg.max_steps and progress.step >= cfg.max_steps:
                    self.stop_reason = f"reached train.max_steps={cfg.max_steps}"
                if self.world > 1 and self.stop_reason is None:
                    # A signal may reach the ranks at different steps: agree, so that all
                    # stop after the same update and the final checkpoint is consistent.
                    flag = torch.tensor([float(self.interrupted)], device=self.device)
                    if dist.all_reduce_sum(flag).item() > 0:
                        self.interrupted = True
                        self.stop_reason = "a rank received a stop signal"
                if self.stop_reason is not None:
                    break
            else:
                progress.epoch += 1
                progress.epoch_step = 0
        bar.close()
        self.finish()

    def count_bad_update(self, ok: bool) -> None:
        """Count an update skipped for a non-finite gradient; stop after too many in a row."""
        if self.static is not None:
            return  # counted on the device, read by read_bad_updates
        progress = self.progress
        if ok:
            progress.bad_updates = 0
            return
        progress.bad_updates += 1
        progress.skipped_updates += 1
        if dist.is_main():
            print(f"warning: step {progress.step}: non-finite loss or gradient; update skipped "
                  f"({progress.skipped_updates} so far)", file=sys.stderr)
        self.check_bad_updates(progress.bad_updates)

    def read_bad_updates(self) -> None:
        """CUDA graphs: bring the device's counts of skipped updates into the progress."""
        if self.static is None:
            return
        progress = self.progress
        in_a_row, worst, skipped = self.static.read_bad_updates()
        if skipped > progress.skipped_updates and dist.is_main():
            print(f"warning: step {progress.step}: {skipped - progress.skipped_updates} "
                  f"update(s) skipped since the last report (non-finite loss or gradient; "
                  f"{skipped} so far)", file=sys.stderr)
        progress.bad_updates, progress.skipped_updates = in_a_row, skipped
        self.check_bad_updates(worst)

    def check_bad_updates(self, in_a_row: int) -> None:
        if in_a_row >= self.recipe.train.max_bad_steps:
            raise TrainingStopped(
                f"stopping: {in_a_row} updates in a row had a non-finite loss or "
                f"gradient (train.max_bad_steps={self.recipe.train.max_bad_steps}); the last "
                f"good checkpoint is {self.out / 'last.pt'}")

    def validate_and_save(self, scheduled: bool) -> None:
        start = time.perf_counter()
        metrics = self.validate()
        self.validation_s += time.perf_counter() - start
        self.model.train()
        row = {"step": self.progress.step, "split": "valid", "epoch": self.epoch_label(),
               **metrics}
        self.log(row)
        if dist.is_main():
            shown = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items())
            print(f"\nstep {self.progress.step} valid: {shown}", file=sys.stderr)
        self.after_validation(metrics, scheduled)
        self.save_periodic()

    def finish(self) -> None:
        """Validate once more if the last update was not validated, then write last.pt.

        A run resumed from its ``last.pt`` that made no update (it had already finished, or
        was stopped at once) leaves its files as they are: nothing changed to validate or save.
        """
        progress, metric = self.progress, self.recipe.train.early_stop_metric
        unchanged = self.resumed_from == (self.out / "last.pt", progress.step)
        validated = progress.step % self.recipe.train.valid_every == 0
        if not unchanged:
            if not validated and progress.step > 0 and not self.interrupted:
                self.validate_and_save(scheduled=False)
            else:
                self.save("last.pt")
        if dist.is_main():
            best = (f"best {metric} {progress.best_value} at step {progress.best_step}"
                    if progress.best_value is not None else "not validated yet")
            if unchanged and not self.interrupted:
                print(f"nothing to train: {self.stop_reason} at step {progress.step}; raise "
                      f"that limit to train further; {best}; checkpoints in {self.out}",
                      file=sys.stderr)
            else:
                print(f"stopped at step {progress.step}: {self.stop_reason}; {best}; "
                      f"checkpoints in {self.out}", file=sys.stderr)
            seconds = time.perf_counter() - self.loop_start - self.validation_s
            if self.session_tokens and seconds > 0:
                print(f"trained on {self.session_tokens:,} target tokens in {seconds:,.1f} s "
                      f"outside validation: {self.session_tokens / seconds:,.0f} target "
                      "tokens/s", file=sys.stderr)
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                print(f"peak GPU memory: {peak:,.0f} MiB (torch.cuda.max_memory_allocated)",
                      file=sys.stderr)

    interrupted = False
    stop_signal: int | None = None  # the signal that stopped this process's run, if any
    resumed_from: tuple[Path, int] | None = None  # (checkpoint, its step) when resumed

    def install_signal_handlers(self) -> dict[int, Any]:
        """Make SIGINT/SIGTERM stop after the current update; returns the handlers replaced."""
        def handler(signum: int, frame: Any) -> None:
            self.interrupted = True
            self.stop_signal = signum
            self.stop_reason = f"received {signal.Signals(signum).name}"

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return previous

    def close(self) -> None:
        """Let go of the DDP wrapper (and with it the process group) and the TensorBoard writer.

        Called before the process group is destroyed: a gloo group still referenced when the
        interpreter shuts down is torn down during finalization, which can abort the process.
        """
        self.ddp_model = self.model
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def fit(recipe: Recipe) -> Trainer:
    """Train (or resume) the run described by ``recipe``; returns the finished trainer."""
    trainer, finished = None, False
    try:
        trainer = Trainer(recipe)
        trainer.fit()
        finished = True
    finally:
        if trainer is not None:
            trainer.close()
        # After a success every rank is done with its collectives and writes: meet, then tear
        # down. After a failure the other ranks may never arrive.
        dist.shutdown(wait_for_all=finished)
    return trainer


"""The story of a training run: set up, resume, loop over epochs, validate, save, stop.

Batches come from the deterministic (seed, epoch) batching, so a run resumed from a checkpoint
at step k sees exactly the batches an uninterrupted run would, and (with every RNG state
restored) ends bit for bit where it would have on the CPU. (With CUDA graphs the warm-ups and
captures draw dropout masks too, so a resumed graphed run sees the same batches but not the
same masks.)

What one update does is :mod:`seq2seq.training.step`; what the run leaves on disk and what a
resume may change is :mod:`seq2seq.training.run_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seq2seq import distributed as dist
from seq2seq.checkpoint import load_weights
from seq2seq.config import Recipe, recipe_to_dict
from seq2seq.data.batching import epoch_batches, rank_steps
from seq2seq.data.cache import prepare_data
from seq2seq.data.sampling import shared_epoch
from seq2seq.models.seq2seq import build_model
from seq2seq.signals import STOP_SIGNALS
from seq2seq.training.averaging import average_and_validate
from seq2seq.training.optim import Schedule, run_done
from seq2seq.training.progress import Progress
from seq2seq.training.run_dir import RunDirectory, print_summary
from seq2seq.training.step import build_step
from seq2seq.training.throughput import Session, Window
from seq2seq.training.validation import validate
from seq2seq.translate import resolve_device


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


def open_run(recipe: Recipe, group_size: int | None,
             ) -> tuple[RunDirectory, tuple[Path, dict[str, Any]] | None]:
    """The run directory, locked by the main rank, and the checkpoint to resume from, if any.

    A run that cannot be resumed is refused before prepare_data could retrain its tokenizer or
    add a cache for a recipe it will not train with.
    """
    run = RunDirectory(Path(recipe.output_dir))
    if dist.is_main():
        run.lock()
    try:
        found = run.resumable_checkpoint(recipe, group_size)
        if found is not None and group_size is not None and dist.is_main():  # train's
            run.drop_rows_after(Progress.from_state(found[1]["progress"]))
        return run, found
    except BaseException:
        run.close()
        raise


def prepare_on_main_first(recipe: Recipe, run: RunDirectory,
                          checkpoint: dict[str, Any] | None) -> Any:
    """The encoded data: the main rank builds the cache, the others then read it.

    Resuming ``checkpoint``, the corpus and tokenizer must be those its weights were trained on.
    """
    expect, prepared = (checkpoint.get("fingerprints") if checkpoint else None), []

    def prepare() -> dict[str, Any]:  # (prepare_data first: it reports bad corpora at once)
        prepared.append(prepare_data(recipe, show_progress=True, expect=expect))
        if checkpoint is None:  # from step 0: the rows of a try that made no checkpoint go
            run.drop_rows_after(Progress())
        return prepared[0].fingerprints

    known = dist.from_main("data preparation", prepare)  # (may outlast distributed.timeout_s)
    # The other ranks reuse the main rank's cache and fingerprints (which hash the corpus).
    return prepared[0] if prepared else prepare_data(recipe, False, expect, known)


def build_seeded_model(recipe: Recipe, tokenizer: Any, device: torch.device) -> Any:
    """The model, initialised from the recipe's seed (the same on every rank), on ``device``."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, tokenizer.src_vocab_size, tokenizer.trg_vocab_size)
    model.to(device)
    if dist.is_main():
        group = (f" in a process group of {dist.world_size()} ({dist.backend()})"
                 if dist.is_initialized() else "")
        print(f"model: {model.num_parameters:,} parameters; training on {device}{group}",
              file=sys.stderr)
    return model


class Trainer:
    """The pieces of one run (data, model, step, schedule, progress); :meth:`fit` drives it."""

    stop_reason: str | None = None
    interrupted = False
    stop_signal: int | None = None  # the signal that stopped this process's run, if any
    resumed_from: tuple[Path, int] | None = None  # (checkpoint, its step) when resumed

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        cfg, group = recipe.train, recipe.distributed
        dist_device = dist.init_from_env(group.backend, group.timeout_s, cfg.device)
        self.device = dist_device or resolve_device(cfg.device, what="train.device")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.run, found = open_run(recipe, self.world * cfg.accumulate)
        try:
            self.set_up(found)
        except BaseException:
            self.run.close()  # releases the lock; removes the directory if nothing was written
            raise

    def set_up(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        """Data, model, update step and schedule, resumed from ``found`` when given."""
        recipe, cfg = self.recipe, self.recipe.train
        self.data = prepare_on_main_first(recipe, self.run, found[1] if found else None)
        self.model = build_seeded_model(recipe, self.data.tokenizer, self.device)
        self.step = build_step(self.model, recipe, self.device, self.data.train,
                               self.data.train_lengths()[1], self.run.path / "last.pt")
        self.schedule = Schedule(cfg.lr, cfg.schedule, cfg.warmup_steps, cfg.min_lr,
                                 cfg.plateau_factor, cfg.plateau_patience, cfg.decay_last)
        self.progress = Progress()
        # Dropout streams differ per rank; rank 0 of a 1-process run uses the recipe seed.
        torch.manual_seed(recipe.seed + 1000 * self.rank)
        self.session = Session()
        if found is not None:
            self.resume(*found)  # the checkpoint's memory is freed after loading
        self.step.start(self.progress)
        if cfg.tensorboard and dist.is_main():
            self.run.open_tensorboard()

    def resume(self, path: Path, ckpt: dict[str, Any]) -> None:
        load_weights(self.model, ckpt["model"], path)
        self.step.load_state_dict(ckpt)
        self.schedule.load_state_dict(ckpt["schedule"])
        self.progress = Progress.from_state(ckpt["progress"])
        set_rng_state(ckpt["rng"], self.rank, self.device)
        self.resumed_from = (path, self.progress.step)
        if dist.is_main():
            print(f"resuming from {path} at step {self.progress.step} "
                  f"({self.progress.position()})", file=sys.stderr)

    def fit(self) -> None:
        """Train until a stop condition, then write ``last.pt``; SIGINT/SIGTERM stop it cleanly."""
        with stop_signals(self):
            self.train_loop()

    def train_loop(self) -> None:
        cfg, progress = self.recipe.train, self.progress
        limit = (cfg.max_steps, cfg.max_epochs, cfg.early_stop_metric, cfg.patience)
        if dist.is_main() and progress.limit_reached(*limit) is None:  # else: left as it is
            self.run.write_recipe(self.recipe)
        group = self.world * cfg.accumulate
        bar = tqdm(total=cfg.max_steps or None, initial=progress.step, disable=not dist.is_main(),
                   desc="train", dynamic_ncols=True)
        window = Window(self.device)
        self.session.start = window.start
        self.model.train()
        while self.stop_reason is None:
            if (reached := progress.limit_reached(*limit)) is not None:
                self.stop_reason = reached  # (a signal's reason is never set back to None)
                break
            src_lens, trg_lens = epoch_pairs(self, progress.epoch)
            batches = epoch_batches(trg_lens, src_lens, cfg.batch_tokens, cfg.batch_sentences,
                                    self.recipe.seed, progress.epoch, group)
            steps = rank_steps(batches, self.rank, self.world, cfg.accumulate)
            for s in range(progress.epoch_step, len(steps)):
                global_batch = batches[s * group:(s + 1) * group]
                global_tokens = int(sum(int(trg_lens[i].sum()) for i in global_batch)
                                    + sum(len(i) for i in global_batch))  # + one EOS each
                lr = self.schedule.at(progress.step + 1, run_done(cfg, progress, len(steps)))
                window.add(self.step.accumulate(steps[s], global_tokens), global_tokens)
                ok = self.step.apply(lr)
                progress.step += 1
                progress.epoch_step = s + 1
                self.session.tokens += global_tokens
                bar.update(1)
                self.step.count(ok, progress)
                if progress.step % cfg.log_every == 0:
                    self.log_window(window, lr, bar)
                if progress.step % cfg.valid_every == 0:
                    self.validate_and_save(scheduled=True)
                if self.stop_reason is None and cfg.max_steps and progress.step >= cfg.max_steps:
                    self.stop_reason = f"reached train.max_steps={cfg.max_steps}"  # (or a signal)
                if self.world > 1 and self.stop_reason is None and dist.any_rank(
                        self.interrupted, self.device):
                    # A signal may reach the ranks at different steps: agree, so that all
                    # stop after the same update and the final checkpoint is consistent.
                    self.interrupted = True
                    self.stop_reason = "a rank received a stop signal"
                if self.stop_reason is not None:
                    break
            else:
                progress.epoch += 1
                progress.epoch_step = 0
        bar.close()
        if self.world > 1:  # a signal during the last update may have reached one rank only
            self.interrupted = dist.any_rank(self.interrupted, self.device)
        self.finish()

    def log_window(self, window: Window, lr: float, bar: Any) -> None:
        """Log the mean loss and throughput of the updates since the last log."""
        self.step.sync(self.progress)
        loss, rate = window.summary()
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        self.run.log({"step": self.progress.step, "split": "train",
                      "epoch": self.progress.epoch_label(), "loss": loss, "lr": lr,
                      "tokens_per_s": rate})
        window.reset()

    def validate_and_save(self, scheduled: bool) -> None:
        """Validate; keep best.pt, the schedule and early stopping; write the checkpoints.

        Only scheduled validations drive the schedule and patience, so a run stopped and
        resumed makes exactly the decisions an uninterrupted run makes.
        """
        cfg, progress = self.recipe.train, self.progress
        start = time.perf_counter()
        metrics = validate(self.model, self.data.valid, self.data.tokenizer, self.recipe,
                           self.device)
        self.session.validation_s += time.perf_counter() - start
        self.model.train()
        self.run.log_validation(progress.step, progress.epoch_label(), metrics)
        improved, progressed, early_stop = progress.record_validation(
            cfg.early_stop_metric, metrics[cfg.early_stop_metric], scheduled, cfg.patience)
        if scheduled:
            self.schedule.validated(progressed)
        if early_stop is not None:
            self.stop_reason = early_stop
        if improved:
            self.save("best.pt")
        if cfg.keep_last:
            self.save(f"step_{progress.step:08d}.pt")
            if dist.is_main():
                self.run.keep_last(cfg.keep_last)
        self.save("last.pt")

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` (all ranks take part: RNG states are gathered)."""
        self.step.sync(self.progress)
        rngs = dist.gather_objects(rng_state(self.device))
        if not dist.is_main():
            return
        self.run.save(name, {
            "model": self.model.state_dict(),
            **self.step.state_dict(),  # optimizer, scaler, the precision computed in
            "schedule": self.schedule.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "group_size": self.world * self.recipe.train.accumulate,
            "rng": rngs,
            "recipe": recipe_to_dict(self.recipe),
            "tokenizer": self.data.tokenizer.to_state(),
            "lexicon": self.data.lexicon().to_state(),  # for decode.shortlist
            "fingerprints": self.data.fingerprints,
            "step": self.progress.step,
        })

    def finish(self) -> None:
        """Validate if the last update was not, average, write last.pt; a rerun of a run whose
        end this did (no signal cut it) that made no update leaves its files as they are."""
        progress, metric, interrupted = self.progress, self.recipe.train.early_stop_metric, \
            self.interrupted  # (as the ranks agreed: a signal in the saves below is too late)
        unchanged = self.resumed_from == (self.run.path / "last.pt", progress.step) and \
            progress.closed_step == progress.step
        validated = progress.validated_step == progress.step  # (a rerun's too)
        if not unchanged:
            if not validated and progress.step > 0 and not interrupted:
                self.validate_and_save(scheduled=False)
            else:
                self.save("last.pt")
            if self.recipe.train.average_last and not interrupted and progress.step > 0:
                average_and_validate(self.run, self.model, self.data, self.recipe, self.device,
                                     progress.step, progress.epoch_label())
            if not interrupted:  # (last: a kill before this one is done again by a rerun)
                progress.closed_step = progress.step
                self.save("last.pt")
        if dist.is_main():
            print_summary(self.stop_reason, progress, metric, self.run.path,
                          idle=unchanged and not interrupted)
            self.session.report(self.device)

    def close(self) -> None:
        """Let go of the DDP wrapper (and with it the process group) and the TensorBoard writer.

        Called before the process group is destroyed: a gloo group still referenced when the
        interpreter shuts down is torn down during finalization, which can abort the process.
        """
        self.step.close()
        self.run.close()


def epoch_pairs(trainer: Trainer, epoch: int) -> tuple[Any, Any]:
    """The (N,) source and target lengths of ``epoch``'s training pairs.

    With subword regularisation (``train.sample_alpha``) the pairs are re-tokenised for the
    epoch (:mod:`seq2seq.data.sampling`, kept in the run directory's ``sampled/``) and the
    trainer's step trains on them.
    """
    data, recipe, cfg = trainer.data, trainer.recipe, trainer.recipe.train
    if not cfg.sample_alpha:
        return data.train_lengths()
    table, src_lens, trg_lens = shared_epoch(trainer.run.path / "sampled", data,
                                             cfg.sample_alpha, cfg.sample_nbest, recipe.seed,
                                             epoch)
    trainer.step.use_pairs(table, trg_lens)
    return src_lens, trg_lens


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states (the CPU's, and the GPU's when training on one)."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rngs: list[dict[str, torch.Tensor]], rank: int, device: torch.device) -> None:
    """Restore rank ``rank``'s :func:`rng_state` from a checkpoint's list of every rank's."""
    if rank >= len(rngs):  # the checkpoint was written by fewer processes
        return
    rng = rngs[rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


@contextlib.contextmanager
def stop_signals(trainer: Trainer) -> Iterator[None]:
    """Make SIGINT, SIGTERM and SIGHUP (unless ignored, as under nohup) stop ``trainer``
    after the current update; restore the handlers."""
    def handler(signum: int, frame: Any) -> None:
        trainer.interrupted = True
        trainer.stop_signal = signum
        if trainer.world == 1:  # else the ranks agree after the update; alone, this one
            trainer.stop_reason = f"received {signal.Signals(signum).name}"  # skipped it

    previous = {}
    for sig in STOP_SIGNALS:
        if sig != signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)

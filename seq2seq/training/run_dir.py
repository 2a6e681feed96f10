"""The run directory: what a run leaves in its ``output_dir`` and what a resume may continue.

``<output_dir>`` holds ``recipe.yaml`` (the resolved recipe), ``metrics.jsonl`` (one row per
logged training window and per validation), ``tensorboard/`` when asked for, and the
checkpoints: ``last.pt`` (after every validation and at the end), ``best.pt`` (best validation
metric) and the last ``train.keep_last`` ``step_XXXXXXXX.pt``. Every process may read; only the
main rank writes.

A run directory has one owner: ``train`` (main rank, or on one node the launcher of its torchrun
workers) holds an ``fcntl`` lock on ``.lock`` for the whole run (the kernel releases it if the
process dies); a second ``train`` there is refused at once, naming the holder. Reading its
checkpoints (``translate``, ``evaluate``) needs no lock.

Resuming checks the checkpoint's recipe against the run's: only the keys of
``RESUMABLE_CHANGES`` (more steps or epochs, logging, devices, decoding) may differ. It also
checks what the weights depend on beyond the recipe: the training corpus and the tokenizer
(:func:`seq2seq.data.cache.check_same_inputs`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from seq2seq import distributed as dist
from seq2seq.checkpoint import load_latest, save_checkpoint
from seq2seq.config import Recipe, RecipeError, recipe_from_dict, recipe_to_dict, recipe_to_yaml
from seq2seq.data.preflight import directory_problem, is_run_file
from seq2seq.errors import Seq2SeqError, warn
from seq2seq.files import remove_partial_writes, write_bytes
from seq2seq.locks import held_by_parent, own, take_when_free
from seq2seq.training.progress import Progress

LOCK_FILE = ".lock"

# What a checkpoint holds besides the weights for a run to resume from it (Trainer.save).
TRAINING_STATE = ("optimizer", "scaler", "schedule", "progress", "rng")

# Keys that may change between a run and its resumption without making the resumed run wrong.
RESUMABLE_CHANGES = ("name", "output_dir", "train.max_steps", "train.max_epochs",
                     "train.accumulate",  # with the processes: their product is checked
                     "train.valid_every", "train.log_every", "train.patience", "train.keep_last",
                     "train.tensorboard", "train.device", "train.threads", "train.max_bad_steps",
                     "train.cuda_graphs", "train.average_last",
                     "decode.", "eval.", "distributed.", "data.num_proc", "data.root",
                     "data.cache_dir")


class RunDirectory:
    """One run's ``output_dir``: its checkpoints, metrics log and recipe."""

    def __init__(self, path: Path):
        if path.exists() and not path.is_dir():
            raise Seq2SeqError(f"output_dir {path}: exists and is not a directory")
        self.path = path
        self.tensorboard: Any = None
        self.lock_file: Any = None
        self.created: list[Path] = []  # directories this run made (removed if left empty)

    # ---- ownership --------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the run's exclusive lock (main rank), creating the directory if needed, unless
        this process's parent holds it for it (``seq2seq train``'s torchrun workers).

        Raises:
            Seq2SeqError: another process holds it, or the directory cannot be written.
        """
        if held_by_parent(self.path):  # (and taken here should the launcher die first)
            return take_when_free(self.path / LOCK_FILE)
        problem = directory_problem(self.path)  # in the words of prepare's checks
        if problem:
            raise Seq2SeqError(f"output_dir {self.path}: {problem}")
        try:
            for directory in (self.path, *self.path.parents):
                if directory.exists():
                    break
                self.created.append(directory)
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_FILE, "a")  # noqa: SIM115 (held for the run)
        except OSError as error:
            raise Seq2SeqError(f"output_dir {self.path}: cannot write there "
                               f"({error.strerror or error})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(os.fstat(handle.fileno())) or "another process"
            handle.close()
            raise Seq2SeqError(in_use(self.path, holder)) from None
        except OSError as error:  # a filesystem without locks
            handle.close()
            raise Seq2SeqError(f"output_dir {self.path}: cannot lock {LOCK_FILE} there "
                               f"({error.strerror or error})") from None
        self.lock_file = own(handle)  # (not a forked worker's too)

    def unlock(self) -> None:
        """Release the lock; remove the directory if this run made it and wrote nothing."""
        if self.lock_file is None:
            return
        if self.created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink()
            for directory in self.created:  # deepest first
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only an empty directory goes
        self.lock_file.close()  # closing the file releases the lock
        self.lock_file = None

    # ---- resuming ---------------------------------------------------------------------------

    def resumable_checkpoint(self, recipe: Recipe,
                             group_size: int | None) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from, if any, once it is known that resuming is right.

        Args:
            group_size: batches per update of this run (processes x ``train.accumulate``);
                None: not checked (``prepare``, which makes no update).
        """
        if dist.is_main():  # a run killed while writing a checkpoint leaves its temporary file
            remove_partial_writes(self.path, is_run_file)
        dist.barrier()  # no rank reads the directory while the main rank cleans it
        return find_resumable(self.path, recipe, group_size, warn_skips=dist.is_main())

    # ---- checkpoints ------------------------------------------------------------------------

    def step_checkpoints(self) -> list[Path]:
        return sorted(self.path.glob("step_*.pt"))

    def save(self, name: str, payload: dict[str, Any]) -> None:
        """Write checkpoint ``name`` atomically (main rank only)."""
        save_checkpoint(payload, self.path / name)

    def keep_last(self, keep: int) -> None:
        """Delete all step checkpoints but the newest ``keep`` (main rank only)."""
        for old in self.step_checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)

    # ---- logs -------------------------------------------------------------------------------

    def write_recipe(self, recipe: Recipe) -> None:
        write_bytes(self.path / "recipe.yaml", recipe_to_yaml(recipe).encode())

    def open_tensorboard(self) -> None:
        """A TensorBoard writer in <output_dir>/tensorboard (main rank only)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise Seq2SeqError("train.tensorboard: true needs the tensorboard package "
                               "(pip install 'seq2seq[tensorboard]')") from None
        self.tensorboard = SummaryWriter(str(self.path / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl (and TensorBoard); other ranks write nothing."""
        if not dist.is_main():
            return
        # JSON has no NaN or infinity: a non-finite value (a skipped update) is written as null.
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in row.items()}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "split", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{row['split']}/{key}", value, row["step"])
            self.tensorboard.flush()

    def drop_rows_after(self, progress: Progress) -> int:
        """Remove the metrics rows after ``progress.step`` and half-written ones (a resumed run
        logs those steps again), and that step's averaging row when the run's end is done
        again. Returns how many rows went."""
        step, closed = progress.step, progress.closed_step == progress.step
        path = self.path / "metrics.jsonl"
        try:
            lines = path.read_bytes().splitlines(keepends=True)
        except FileNotFoundError:
            return 0

        def kept(line: bytes) -> bool:
            try:
                row = json.loads(line)
                return line.endswith(b"\n") and (int(row["step"]) < step or int(
                    row["step"]) == step and (closed or row["split"] != "averaged"))
            except (ValueError, TypeError, KeyError):
                return False
        keep = [line for line in lines if kept(line)]
        if len(keep) < len(lines):
            write_bytes(path, b"".join(keep))
        return len(lines) - len(keep)

    def log_validation(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        """Log a validation's metrics, and show them on stderr (main rank only)."""
        self.log({"step": step, "split": "valid", "epoch": epoch, **metrics})
        if dist.is_main():
            print_validation(step, metrics)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.unlock()


def in_use(path: Path, holder: str) -> str:
    return (f"output_dir {path} is in use by another training run ({holder}); wait for it to "
            "end, or use another output_dir")


def lock_holder(info: os.stat_result) -> str | None:
    """``process N`` holding a lock on the file of ``info`` (its device and inode), from
    Linux's /proc/locks; None when no process is listed there (or there is no /proc/locks)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    file = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:  # e.g. "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == file:
            return f"process {fields[4]}"
    return None


def find_resumable(path: Path, recipe: Recipe, group_size: int | None,
                   warn_skips: bool) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint in run directory ``path`` that a run of ``recipe`` resumes from (the
    newest that loads), None for a fresh start; reads only.

    Args:
        group_size: batches per update of this run (processes x ``train.accumulate``);
            None: not checked (``prepare``, which makes no update).
        warn_skips: say on stderr which checkpoints cannot be loaded.

    Raises:
        Seq2SeqError: the run cannot resume (its checkpoints do not load, or the recipe or
            the batches per update changed) and may not start again either.
    """
    skipped: list[str] = []

    def skip(message: str) -> None:
        skipped.append(message)
        if warn_skips:
            warn(f"{message}; trying the previous checkpoint")

    # best.pt last: a run killed right after its first best.pt has only that whole checkpoint
    candidates = [path / "last.pt", *sorted(path.glob("step_*.pt"))[::-1], path / "best.pt"]
    found = load_latest(candidates, skip, require=TRAINING_STATE)
    if found is None:
        if skipped:  # starting again from step 0 would write over best.pt and the metrics
            raise Seq2SeqError(f"cannot resume {path}: no checkpoint there can be resumed; move "
                               "its checkpoints away (or use another output_dir) to train from "
                               "the start")
        return None
    ckpt = found[1]
    check_resumable(ckpt["recipe"], recipe)
    best_step = ckpt["progress"].get("best_step", 0)
    if warn_skips and best_step and not (path / "best.pt").is_file():
        warn(f"{path / 'best.pt'}: missing; the best validation so far (step {best_step}) has "
             "no checkpoint until a later one beats it (eval.checkpoint: best needs one)")
    saved_group = ckpt.get("group_size", group_size)
    if group_size is not None and saved_group != group_size:
        # The epoch position counts updates of (world size x accumulate) batches.
        raise Seq2SeqError(
            f"cannot resume {path}: it was trained with {saved_group} batches per update "
            f"(processes x train.accumulate), this run uses {group_size // recipe.train.accumulate}"
            f" x {recipe.train.accumulate}; keep the product equal")
    return found


def train_problems(recipe: Recipe) -> list[str]:
    """What ``train`` would refuse before its work beyond ``prepare``'s checks, found without
    writing anything (``seq2seq check``): ``train.device`` naming a GPU this machine lacks, a
    training run holding ``output_dir``, a checkpoint there that cannot be resumed, or a resume
    on another training corpus (of files) or tokenizer."""
    from seq2seq.data.fingerprint import check_same_inputs, current_inputs, file_corpus
    from seq2seq.translate import resolve_device

    problems = []
    cfg = recipe.distributed
    processes = cfg.nproc_per_node * cfg.nnodes
    if processes == 1 and recipe.train.device not in ("auto", "cpu"):
        try:  # (a process group's workers take the device its backend gives them)
            resolve_device(recipe.train.device, what="train.device")
        except Seq2SeqError as error:
            problems.append(str(error))
    path = Path(recipe.output_dir)
    if not path.is_dir():
        return problems
    try:
        holder = lock_holder((path / LOCK_FILE).stat())
    except OSError:  # no lock file: no run has held the directory
        holder = None
    if holder:
        problems.append(in_use(path, holder))
    try:
        found = find_resumable(path, recipe, processes * recipe.train.accumulate,
                               warn_skips=True)
        # Only a corpus of files is compared here (by their digests): a hub dataset's or the
        # generated task's fingerprint hashes every pair (and downloads the dataset).
        if found is not None and file_corpus(recipe.data.train, recipe.data):
            expect = found[1].get("fingerprints") or {}
            check_same_inputs(expect, recipe, *current_inputs(recipe, False, expect))
    except Seq2SeqError as error:
        problems.append(str(error))
    return problems


def exit_code(stop_signal: int | None, interrupted: bool, under_torchrun: bool) -> int:
    """The exit code of ``seq2seq train`` for a run that ended without an error;
    ``interrupted``: by a signal to this process or (torchrun) to another rank."""
    if under_torchrun:
        # torchrun reads a worker's non-zero exit as a failure and restarts the group; its
        # launcher exits 128 + the signal (seq2seq.distributed.launch, seq2seq.launch).
        from seq2seq.launch import record_end
        record_end(interrupted, stop_signal)
        return 0
    if stop_signal is None:
        return 0
    # The shell's convention for a signalled process (130 for SIGINT, 143 for SIGTERM), after
    # the clean save: `seq2seq train R && seq2seq evaluate R` stops after Ctrl-C.
    return 128 + stop_signal


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 4.807  ppl 122.398  bleu 0.000  n_sentences 500`` for the log on stderr."""
    return "  ".join(f"{k} {v:{'.3f' if abs(v) < 1e9 else '.3e'}}" if isinstance(v, float)
                     else f"{k} {v}" for k, v in metrics.items())  # (ppl: e^700 at most)


def print_validation(step: int, metrics: dict[str, Any]) -> None:
    print(f"\nstep {step} valid: {format_metrics(metrics)}", file=sys.stderr)


def print_summary(reason: str, progress: Progress, metric: str, out: Path, idle: bool) -> None:
    """How the run ended, in one line: why it stopped, the best checkpoint, where they are.

    ``idle``: this session made no update (the run had already reached a limit).
    """
    step = progress.step
    best = (f"best {metric} {round(progress.best_value, 4)} at step {progress.best_step}"
            if progress.best_value is not None else "not validated yet")
    if idle:
        print(f"nothing to train: {reason} at step {step}; raise that limit to train further; "
              f"{best}; checkpoints in {out}", file=sys.stderr)
    else:
        print(f"stopped at step {step}: {reason}; {best}; checkpoints in {out}",
              file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Resume compatibility
# --------------------------------------------------------------------------------------------


def recipe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def run_changes(saved: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The keys outside :data:`RESUMABLE_CHANGES` in which two recipes (plain data, as in a
    checkpoint) differ: no run changes them, so their checkpoints are of two runs."""
    def completed(tree: dict[str, Any]) -> dict[str, Any]:
        try:  # a key added to the recipe since the checkpoint was written takes its default
            return recipe_to_dict(recipe_from_dict(tree))
        except RecipeError:
            return tree  # a key since removed: compare as saved, and name it

    return [k for k in recipe_changes(completed(saved), completed(other))
            if not any(k == allowed or (allowed.endswith(".") and k.startswith(allowed))
                       for allowed in RESUMABLE_CHANGES)]


def check_resumable(saved: dict[str, Any], recipe: Recipe) -> None:
    """Refuse to resume a run whose recipe changed in a way that would make it wrong.

    Args:
        saved: the recipe stored in the checkpoint (plain data).
        recipe: the recipe of this run.

    Raises:
        Seq2SeqError: naming every changed key outside :data:`RESUMABLE_CHANGES`.
    """
    changed = run_changes(saved, recipe_to_dict(recipe))
    if changed:
        raise Seq2SeqError(
            f"cannot resume {recipe.output_dir}: the recipe changed in {', '.join(changed)} "
            "(use a new output_dir, or restore those values)")

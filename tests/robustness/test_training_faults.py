"""Crashes, damaged checkpoints, a full disk, non-finite losses and out-of-memory batches.

Training runs in this process (tiny model, one thread) except where a real SIGKILL is needed.
The reference for "resumed exactly" is one uninterrupted run of the same recipe, shared by the
module.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq import checkpoint, files
from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from seq2seq.cli import main as cli_main
from seq2seq.config import apply_override, parse_override, recipe_from_dict
from seq2seq.errors import Seq2SeqError
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.training.step import TrainingStopped, build_step
from seq2seq.training.trainer import Trainer, fit
from tests.conftest import REPO
from tests.robustness.conftest import error_lines, tiny_tree, write_recipe

STEPS = 6  # the reference run's length; checkpoints every 2 steps


def tree(tmp_path: Path, name: str, *overrides: str) -> dict:
    """The tiny recipe, run ``name`` under ``tmp_path``, with dotted overrides applied."""
    base = tiny_tree(str(tmp_path / name))
    base["train"].update(max_steps=STEPS, valid_every=2, threads=1)
    base["data"]["cache_dir"] = str(tmp_path.parent / "shared-cache")
    for text in overrides:
        apply_override(base, *parse_override(text))
    return base


def recipe(tmp_path: Path, name: str, *overrides: str):
    return recipe_from_dict(tree(tmp_path, name, *overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diffs = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diffs, f"weights differ (max abs difference per tensor): {diffs}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """last.pt of an uninterrupted run of STEPS updates."""
    root = tmp_path_factory.mktemp("faults") / "r"
    root.mkdir()
    fit(recipe(root, "full"))
    return root / "full" / "last.pt"


@pytest.fixture
def root(reference) -> Path:
    """A directory beside the reference run, sharing its data cache."""
    path = reference.parent.parent / f"t{time.monotonic_ns()}"
    path.mkdir()
    return path


# --------------------------------------------------------------------------------------------
# Damaged checkpoints: detected, the previous one used with a warning, resume still exact
# --------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-last": lambda run: truncate(run / "last.pt"),
    "flipped-byte-in-last": lambda run: flip_a_byte(run / "last.pt"),
    "truncated-last-without-sidecar": lambda run: (
        (run / "last.pt.sha256").unlink(), truncate(run / "last.pt")),
    "last-and-newest-step-damaged": lambda run: (
        truncate(run / "last.pt"), flip_a_byte(run / "step_00000004.pt")),
    "empty-last": lambda run: (run / "last.pt").write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_detected_and_the_previous_one_resumes_exactly(
        damage, root, reference, capsys):
    fit(recipe(root, "run", "train.max_steps=4"))
    run = root / "run"
    DAMAGE[damage](run)
    capsys.readouterr()
    trainer = fit(recipe(root, "run"))
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned and re.fullmatch(r"warning: .*last.pt: .*; trying the previous checkpoint",
                                   warned[0])
    assert trainer.progress.step == STEPS
    assert_same_weights(run / "last.pt", reference)


NOTHING_TO_RESUME = {
    "every-checkpoint-damaged": lambda run: [truncate(p) for p in (
        run / "last.pt", run / "best.pt", *run.glob("step_*.pt"))],
    "empty-last-and-no-step-nor-best": lambda run: (
        [p.unlink() for p in (*run.glob("step_*.pt*"), *run.glob("best.pt*"))],
        (run / "last.pt").write_bytes(b"")),
    "averaged-last-alone": lambda run: (
        [p.unlink() for p in run.glob("step_*.pt*")],
        checkpoint.average_checkpoints([run / "best.pt"], run / "best.pt.avg"),
        (run / "best.pt").unlink(), (run / "best.pt.avg").rename(run / "last.pt")),
}

BEST_TO_RESUME = {
    # a kill between the first best.pt and the first last.pt leaves that one alone
    "best-alone": lambda run: [p.unlink() for p in (*run.glob("step_*.pt*"), *run.glob(
        "last.pt*"))],
    "empty-last-and-no-step": lambda run: (
        [p.unlink() for p in run.glob("step_*.pt*")], (run / "last.pt").write_bytes(b"")),
}


@pytest.mark.parametrize("damage", BEST_TO_RESUME, ids=list(BEST_TO_RESUME))
def test_a_run_with_best_pt_alone_resumes_from_it(damage, root, reference):
    """best.pt is a whole training checkpoint of its step: the run was refused for good."""
    fit(recipe(root, "run", "train.max_steps=4"))
    run = root / "run"
    BEST_TO_RESUME[damage](run)
    trainer = fit(recipe(root, "run"))
    assert trainer.resumed_from[0] == run / "best.pt" and trainer.progress.step == STEPS
    assert_same_weights(run / "last.pt", reference)


@pytest.mark.parametrize("damage", NOTHING_TO_RESUME, ids=list(NOTHING_TO_RESUME))
def test_a_run_with_no_checkpoint_to_resume_is_refused_and_left_as_it_is(damage, root):
    """Not a silent new start from step 0, which would write over best.pt and add a second
    set of rows to metrics.jsonl."""
    fit(recipe(root, "run", "train.max_steps=4"))
    run = root / "run"
    NOTHING_TO_RESUME[damage](run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(Seq2SeqError, match=rf"cannot resume {re.escape(str(run))}: .*; move "
                                           r"its checkpoints away \(or use another output_dir\)"):
        fit(recipe(root, "run"))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_an_averaged_last_pt_is_passed_over_for_the_previous_step_checkpoint(
        root, reference, capsys):
    fit(recipe(root, "run", "train.max_steps=4"))
    run = root / "run"
    checkpoint.average_checkpoints([run / "step_00000002.pt", run / "step_00000004.pt"],
                                   run / "last.pt")
    capsys.readouterr()
    trainer = fit(recipe(root, "run"))
    assert "last.pt: holds no training state (optimizer, scaler, schedule, progress, rng): " \
           "an averaged or exported checkpoint" in capsys.readouterr().err
    assert trainer.progress.step == STEPS
    assert_same_weights(run / "last.pt", reference)


CRASH_POINTS = ["first-write", "second-write", "after-the-writes"]


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new-file"])
@pytest.mark.parametrize("crash_at", [1, 2, 3], ids=CRASH_POINTS)
def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_old_or_new_file(
        crash_at, existing, tmp_path, monkeypatch, capsys):
    path = tmp_path / "last.pt"
    old = {"model": {"w": torch.zeros(64)}, "recipe": {"step": 1}}
    new = {"model": {"w": torch.ones(64)}, "recipe": {"step": 2}}
    if existing:
        save_checkpoint(old, path)
    real, calls = checkpoint.write_bytes, []

    def crashing(target, data):
        calls.append(target.name)
        if len(calls) == crash_at:
            raise Crash()
        real(target, data)

    monkeypatch.setattr(checkpoint, "write_bytes", crashing)
    with pytest.raises(Crash):
        save_checkpoint(new, path)
        raise Crash()  # fewer writes than crash_at: the crash comes after the save
    monkeypatch.undo()
    if not path.exists():
        assert not existing and calls[0] == "last.pt"  # crashed while writing the first file
        return
    loaded = load_checkpoint(path)
    assert "warning" not in capsys.readouterr().err  # no "corrupt" warning for a good file
    assert loaded["recipe"]["step"] in ((1, 2) if existing else (2,))
    assert not list(tmp_path.glob(".*.tmp"))


def test_sigkill_during_training_then_the_same_command_resumes_exactly(root, reference):
    """SIGKILL (the first time a checkpoint is being written, if the poll sees it), re-run."""
    path = write_recipe(root / "r.yaml", tree(root, "run"))
    command = [sys.executable, "-m", "seq2seq", "train", str(path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = root / "run"
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if run.is_dir() and any(p.name.endswith(".tmp") for p in os.scandir(run)):
            break  # a checkpoint (or its sidecar) is half written right now
        if (run / "step_00000004.pt").exists():
            break  # the poll missed every write so far: kill mid-run all the same
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert_same_weights(run / "last.pt", reference)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# Disk full while saving
# --------------------------------------------------------------------------------------------


class DiskFullOs:
    """``os`` for checkpoint.py, except that writing ``victim`` fills the disk half way."""

    def __init__(self, victim: str):
        self.victim = victim

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="r"):
        handle = os.fdopen(fd, mode)
        if self.victim not in os.readlink(f"/proc/self/fd/{fd}"):
            return handle

        class Full:
            """Writes half of the data, then finds the disk full."""

            def write(self, data):
                handle.write(bytes(data)[: len(data) // 2])
                handle.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def close(self):
                handle.close()

        return Full()


# (the temporary file that fills the disk, the checkpoint the error names)
FULL_DISK = {"step-checkpoint": (".step_00000004.pt.", "step_00000004.pt"),
             "sidecar-of-last": (".last.pt.sha256.", "last.pt")}


@pytest.mark.parametrize("where", FULL_DISK)
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
        where, root, monkeypatch, capfd):
    temporary, victim = FULL_DISK[where]
    path = write_recipe(root / "r.yaml", tree(root, "run"))
    fit(recipe(root, "run", "train.max_steps=2"))
    run = root / "run"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "step_00000002.pt")}
    capfd.readouterr()
    monkeypatch.setattr(files, "os", DiskFullOs(temporary))
    assert cli_main(["train", str(path)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err.encode())
    if where == "step-checkpoint":
        assert "cannot write checkpoint (No space left on device)" in line
        assert "previous checkpoint is unchanged" in line and victim in line
    else:  # the checkpoint itself was written: only its side file is missing
        assert line == (f"error: {run / victim}.sha256: cannot write the checksum file (No "
                        f"space left on device); {run / victim} itself is complete")
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert load_checkpoint(run / "step_00000002.pt")["step"] == 2
    assert (run / "step_00000002.pt").read_bytes() == before["step_00000002.pt"]
    assert load_checkpoint(run / "last.pt")["step"] in (2, 4)  # old, or new and whole
    trainer = fit(recipe(root, "run"))  # and the run carries on from there, exactly
    assert trainer.progress.step == STEPS


# --------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# --------------------------------------------------------------------------------------------


def poison_forward(monkeypatch, bad_calls: set[int], kind: str) -> list[int]:
    """Make the training forward passes numbered in ``bad_calls`` (1-based) non-finite."""
    real, calls = Seq2Seq.forward, []

    def forward(self, src, src_lens, trg_in, features=False):
        # the training step asks for the output layer's inputs: poisoning them poisons the loss
        logits = real(self, src, src_lens, trg_in, features)
        if not self.training:
            return logits
        calls.append(1)
        if len(calls) in bad_calls:
            if kind == "loss":
                return logits * float("nan")
            logits.register_hook(lambda grad: grad * float("inf"))  # finite loss, inf gradient
        return logits

    monkeypatch.setattr(Seq2Seq, "forward", forward)
    return calls


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_update_is_skipped_warned_and_counted(kind, root, monkeypatch, capfd):
    trainer = Trainer(recipe(root, "run", "train.max_steps=4", "train.valid_every=100"))
    poison_forward(monkeypatch, {2}, kind)
    params = []
    real_apply = trainer.step.apply

    def apply_update(lr):
        ok = real_apply(lr)
        params.append([p.detach().clone() for p in trainer.model.parameters()])
        return ok

    trainer.step.apply = apply_update
    trainer.fit()
    err = capfd.readouterr().err
    assert trainer.progress.step == 4 and trainer.progress.skipped_updates == 1
    assert "warning: step 2: non-finite loss or gradient; update skipped (1 so far)" in err
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(params[1], params[2]))  # step 3 did
    assert all(torch.isfinite(p).all() for p in params[-1])


def test_too_many_non_finite_updates_stop_the_run_keeping_the_last_good_checkpoint(
        root, monkeypatch, capfd):
    path = write_recipe(root / "r.yaml", tree(root, "run", "train.max_bad_steps=3"))
    poison_forward(monkeypatch, {3, 4, 5, 6}, "loss")
    assert cli_main(["train", str(path)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err.encode())
    assert "3 updates in a row had a non-finite loss" in line and "last.pt" in line
    run = root / "run"
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 4 and last["progress"]["skipped_updates"] == 2
    # Steps 3 and 4 were skipped, so last.pt holds the weights of step 2, all finite.
    assert_same_weights(run / "last.pt", run / "step_00000002.pt")
    assert all(torch.isfinite(t).all() for t in last["model"].values())


# --------------------------------------------------------------------------------------------
# Out of memory: split the batch, same update
# --------------------------------------------------------------------------------------------


def out_of_memory_above(monkeypatch, max_sentences: int) -> None:
    real = Seq2Seq.forward

    def forward(self, src, src_lens, trg_in, features=False):
        if src.shape[0] > max_sentences:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, src, src_lens, trg_in, features)

    monkeypatch.setattr(Seq2Seq, "forward", forward)


def one_update(trainer, micro_batches, tokens):
    """The summed loss and the accumulated gradients of one update (then applied)."""
    loss = trainer.step.accumulate(micro_batches, tokens)
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    assert trainer.step.apply(trainer.recipe.train.lr)
    return loss, grads


@pytest.mark.parametrize("accumulate", [1, 2])
def test_out_of_memory_splits_the_batch_and_gives_the_same_update(
        accumulate, root, monkeypatch, capfd):
    import copy

    from seq2seq.data.batching import epoch_batches

    trainer = Trainer(recipe(root, "run", "model.dropout=0.0", "train.clip_norm=0"))
    trainer.model.train()
    src_lens, trg_lens = trainer.data.train_lengths()
    batches = epoch_batches(trg_lens, src_lens, 300, 0, 1, 0, 1)[:accumulate]
    tokens = int(sum(int(trg_lens[b].sum()) + len(b) for b in batches))
    start = (copy.deepcopy(trainer.model.state_dict()),
             copy.deepcopy(trainer.step.optimizer.state_dict()))
    expected = one_update(trainer, batches, tokens)
    trainer.model.load_state_dict(start[0])
    trainer.step.optimizer.load_state_dict(start[1])
    capfd.readouterr()
    largest = max(len(b) for b in batches)
    out_of_memory_above(monkeypatch, largest // 3)
    got = one_update(trainer, batches, tokens)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    # The gradients, not the Adam steps: a first Adam step is lr * g / (|g| + eps), which
    # blows float noise in gradients near eps (1e-8) up to lr-sized differences.
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    warned = [line for line in capfd.readouterr().err.splitlines() if "out of memory" in line]
    longest = int(trg_lens[batches[0]].max()) + 1
    assert warned[0] == (f"warning: out of memory on a batch of {len(batches[0])} sentences x "
                         f"{longest} tokens; splitting it")
    assert 2 <= len(warned) <= 3 * accumulate  # one line per event: halves, then quarters


def test_out_of_memory_on_one_sentence_stops_with_a_clear_message(root, monkeypatch):
    trainer = Trainer(recipe(root, "run"))
    out_of_memory_above(monkeypatch, 0)
    with pytest.raises(TrainingStopped, match=r"out of memory on a batch of 1 sentences x \d+ "
                                              r"tokens: one sentence does not fit"):
        trainer.fit()



def test_out_of_memory_with_cuda_graphs_names_the_bucket_and_the_remedy(root, monkeypatch):
    """Graph shapes are fixed, so there is no splitting: the run stops with one clear line.

    The static path runs eagerly here (no GPU); its forward raises as a GPU would."""
    trainer = Trainer(recipe(root, "run"))
    trainer.step = build_step(trainer.model, trainer.recipe, trainer.device, trainer.data.train,
                              trainer.data.train_lengths()[1], root / "run" / "last.pt",
                              graphs=True, capture=False)
    trainer.step.start(trainer.progress)
    out_of_memory_above(monkeypatch, 0)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit()
    message = str(stopped.value)
    assert "\n" not in message
    assert re.fullmatch(r"out of GPU memory on a CUDA-graph bucket of \d+ sentences x \d+ "
                        r"source x \d+ target tokens; lower train.batch_tokens, or set "
                        r"train.cuda_graphs=false \(the eager path splits such batches\)",
                        message), message
    rows = int(message.split("bucket of ")[1].split()[0])
    assert rows % 32 == 0  # the padded bucket, not the batch


# --------------------------------------------------------------------------------------------
# Safety: weights-only loads, nothing executes recipe content
# --------------------------------------------------------------------------------------------

UNSAFE = {
    "eval(": r"(?<![\w.])eval\(",
    "exec(": r"(?<![\w.])exec\(",
    "importlib.import_module": r"import_module\(",
    "__import__": r"__import__\(",
    "yaml.load( without SafeLoader":
        r"yaml\.(load|load_all|unsafe_load|full_load)\((?![^)]*SafeLoader)",
    "pickle": r"(?<![\w.])(c?pickle|marshal|shelve|dill)\.loads?\(",
    "torch.load( without weights_only=True":
        r"torch\.load\((?![\s\S]{0,200}?weights_only=True)",
}


@pytest.mark.parametrize("name", UNSAFE)
def test_nothing_in_the_package_executes_data(name):
    pattern = re.compile(UNSAFE[name])
    hits = [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}"
            for path in sorted((REPO / "seq2seq").rglob("*.py"))
            for text in [path.read_text(encoding="utf-8")]
            for m in pattern.finditer(text)]
    assert not hits, f"{name} in {hits}"


def test_the_unsafe_patterns_do_find_what_they_look_for():
    samples = {"eval(": "x = eval(text)", "exec(": "exec(code)",
               "importlib.import_module": "importlib.import_module(name)",
               "__import__": "m = __import__(name)",
               "yaml.load( without SafeLoader": "yaml.load(text, Loader=yaml.Loader)",
               "pickle": "pickle.loads(data)",
               "torch.load( without weights_only=True": "torch.load(path, map_location='cpu')"}
    for name, pattern in UNSAFE.items():
        assert re.search(pattern, samples[name]), name
    assert not re.search(UNSAFE["eval("], "model.eval()")
    assert not re.search(UNSAFE["torch.load( without weights_only=True"],
                         "torch.load(io.BytesIO(data), map_location=m, weights_only=True)")

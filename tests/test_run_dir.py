"""The run directory: one owner at a time, and a resume that continues the same run or refuses."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import load_checkpoint
from seq2seq.config import recipe_from_dict
from seq2seq.errors import Seq2SeqError
from seq2seq.training.trainer import fit
from tests.conftest import REPO, tiny_tree

HOLD_LOCK = '''
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
'''


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the run's lock, as a training run would."""
    run.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def text_recipe(tmp_path: Path, root: Path, *overrides: str):
    """The tiny recipe trained on text files under ``root`` (written once)."""
    tree = tiny_tree(str(tmp_path / "run"))
    tree["data"]["root"] = str(root)
    tree["data"]["train"] = {"format": "text", "src": "train.en", "trg": "train.de"}
    return recipe_from_dict(tree, list(overrides))


def write_corpus(root: Path, pairs: int = 200) -> None:
    from seq2seq.data.synthetic import write_synthetic

    write_synthetic(root, {"train": pairs, "valid": 0, "test": 0})


def test_a_second_train_on_a_locked_run_is_refused_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        recipe = recipe_from_dict(tiny_tree(str(run)))
        start = time.monotonic()
        with pytest.raises(Seq2SeqError) as refused:
            fit(recipe)
        assert time.monotonic() - start < 30
        assert str(refused.value) == (f"output_dir {run} is in use by another training run "
                                      f"(process {holder.pid}); wait for it to end, or use "
                                      "another output_dir")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    trainer = fit(recipe_from_dict(tiny_tree(str(run), train={"max_steps": 2})))
    assert trainer.progress.step == 2  # the kernel released the dead holder's lock


def test_a_forked_worker_that_outlives_a_killed_run_does_not_hold_its_lock(tmp_path):
    """After a kill -9 during the corpus encoding, the pool's workers (forked, so sharing the
    lock file) lived on and every rerun was refused as "in use by process N" (the dead one)."""
    import signal

    from seq2seq.training.run_dir import RunDirectory

    code = ("import multiprocessing, os, signal, sys, time\n"
            "from pathlib import Path\n"
            "from seq2seq.training.run_dir import RunDirectory\n"
            "run = RunDirectory(Path(sys.argv[1]))\n"
            "run.lock()\n"
            "worker = multiprocessing.get_context('fork').Process(target=time.sleep, "
            "args=(60,))\n"
            "worker.start()\n"
            "Path(sys.argv[2]).write_text(str(worker.pid))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    # (no pipes: the orphan would hold them open, and the run would wait for it)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"),
                          str(tmp_path / "pid")], cwd=REPO, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert run.returncode == -signal.SIGKILL
    orphan = int((tmp_path / "pid").read_text())
    try:
        os.kill(orphan, 0)  # alive, as a pool worker is
        again = RunDirectory(tmp_path / "run")
        again.lock()
        again.unlock()
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_the_cli_refuses_a_locked_run_with_exit_2_and_translate_still_works(tmp_path):
    import yaml

    run = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(str(run), train={"max_steps": 2})))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def seq2seq(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], input=stdin,
                              capture_output=True, env=env, timeout=300)

    assert seq2seq("train", path).returncode == 0
    holder = hold_lock(run)
    try:
        refused = seq2seq("train", path, "train.max_steps=4")
        assert refused.returncode == 2
        assert refused.stderr.decode() == (
            f"error: output_dir {run} is in use by another training run (process "
            f"{holder.pid}); wait for it to end, or use another output_dir\n")
        translated = seq2seq("translate", "--checkpoint", run / "best.pt", stdin=b"a dog\n")
        assert translated.returncode == 0 and translated.stdout.count(b"\n") == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_first_run_leaves_no_run_directory(tmp_path):
    run = tmp_path / "deep" / "run"
    tree = tiny_tree(str(run))
    tree["data"]["train"]["size"] = 0  # no training pairs: refused while preparing
    with pytest.raises(Seq2SeqError):
        fit(recipe_from_dict(tree))
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("change", ["edited", "moved-data-root"])
def test_resume_on_other_training_data_is_refused_and_the_tokenizer_is_kept(change, tmp_path):
    data = tmp_path / "data"
    write_corpus(data)
    fit(text_recipe(tmp_path, data, "train.max_steps=2"))
    tokenizer = {p.name: p.read_bytes() for p in (tmp_path / "run" / "tokenizer").iterdir()}
    if change == "edited":
        with open(data / "train.en", "a", encoding="utf-8") as handle:
            handle.write("one more sentence\n")
        with open(data / "train.de", "a", encoding="utf-8") as handle:
            handle.write("noch ein Satz\n")
        root, named = data, str(data / "train.en")
    else:
        root = tmp_path / "elsewhere"
        write_corpus(root, pairs=150)
        named = str(root / "train.en")
    with pytest.raises(Seq2SeqError) as refused:
        fit(text_recipe(tmp_path, root, "train.max_steps=4"))
    message = str(refused.value)
    assert message.startswith(f"cannot resume {tmp_path / 'run'}: the training corpus is not "
                              "the one its checkpoint was trained on")
    assert named in message and "Use a new output_dir" in message
    assert {p.name: p.read_bytes()
            for p in (tmp_path / "run" / "tokenizer").iterdir()} == tokenizer
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2


def test_resume_without_the_runs_tokenizer_is_refused_not_retrained(tmp_path):
    fit(recipe_from_dict(tiny_tree(str(tmp_path / "run"), train={"max_steps": 2})))
    shutil.rmtree(tmp_path / "run" / "tokenizer")
    with pytest.raises(Seq2SeqError, match=r"its tokenizer \(.*tokenizer\) is missing or "
                                           r"differs .* never retrained"):
        fit(recipe_from_dict(tiny_tree(str(tmp_path / "run"), train={"max_steps": 4})))
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_a_checkpoint_records_what_its_weights_depend_on(tmp_path):
    data = tmp_path / "data"
    write_corpus(data)
    trainer = fit(text_recipe(tmp_path, data, "train.max_steps=2"))
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["fingerprints"]
    assert saved["tokenizer"] == trainer.data.tokenizer.fingerprint
    assert saved["train_corpus"].startswith("files:")
    assert saved["train_files"] == [
        [str(data / name), (data / name).stat().st_size,
         hashlib.sha256((data / name).read_bytes()).hexdigest()]
        for name in ("train.en", "train.de")]
    # And the same data resumes.
    assert fit(text_recipe(tmp_path, data, "train.max_steps=4")).progress.step == 4


def test_a_copy_of_the_data_elsewhere_resumes_with_the_runs_tokenizer_and_cache(tmp_path):
    """A cluster job copies the corpus to its node's disk and points data.root there: the
    same bytes under another path, written later, are the same corpus."""
    data = tmp_path / "data"
    write_corpus(data)
    first = fit(text_recipe(tmp_path, data, "train.max_steps=2"))
    copy = tmp_path / "node-disk"
    shutil.copytree(data, copy)  # (copytree keeps the times: a plain copy does not)
    for path in copy.iterdir():
        os.utime(path, (1e9, 1e9))
    resumed = fit(text_recipe(tmp_path, copy, "train.max_steps=4"))
    assert resumed.progress.step == 4
    assert resumed.data.stats["tokenizer"]["reused"] and resumed.data.stats["cache"]["reused"]
    assert resumed.data.fingerprints["train_corpus"] == first.data.fingerprints["train_corpus"]


def earlier_stat_fingerprint(recipe) -> tuple[str, list]:
    """The fingerprint checkpoints recorded before 2026-12-07, as that code computed it, and
    its ``train_files``."""
    train, root = recipe.data.train, Path(recipe.data.root)
    files = [[str((root / name).resolve()), (root / name).stat().st_size,
              (root / name).stat().st_mtime_ns] for name in (train.src, train.trg)]
    key = {"format": train.format, "split": train.split, "files": files,
           "src_field": train.src_field, "trg_field": train.trg_field,
           "languages": [recipe.data.src_lang, recipe.data.trg_lang]}
    return "stat:" + hashlib.sha256(json.dumps(key).encode()).hexdigest(), files


def test_a_run_with_the_earlier_stat_fingerprint_resumes_and_refuses_as_before(tmp_path):
    """Checkpoints written before the corpus was identified by its bytes record the paths,
    sizes and times of its files: such a run resumes while those hold, and refuses after."""
    from seq2seq.checkpoint import save_checkpoint
    from seq2seq.tokenizer import INFO_FILE, tokenizer_hash

    data, run = tmp_path / "data", tmp_path / "run"
    write_corpus(data)
    recipe = text_recipe(tmp_path, data, "train.max_steps=2")
    fit(recipe)
    stat, files = earlier_stat_fingerprint(recipe)
    info = json.loads((run / "tokenizer" / INFO_FILE).read_text())
    info["hash"] = tokenizer_hash(recipe.tokenizer, stat, recipe.data.src_lang,
                                  recipe.data.trg_lang)
    (run / "tokenizer" / INFO_FILE).write_text(json.dumps(info))
    for path in [run / "last.pt", *run.glob("step_*.pt")]:
        ckpt = load_checkpoint(path)
        ckpt["fingerprints"].update(train_corpus=stat, train_files=files)
        save_checkpoint(ckpt, path)
    resumed = fit(text_recipe(tmp_path, data, "train.max_steps=3"))
    assert resumed.progress.step == 3 and resumed.data.stats["tokenizer"]["reused"]
    assert load_checkpoint(run / "last.pt")["fingerprints"]["train_corpus"] == stat
    os.utime(data / "train.de", (1e9, 1e9))
    with pytest.raises(Seq2SeqError, match=(
            rf"its checkpoints know their training corpus by the paths, sizes and modification "
            rf"times of its files, and {data / 'train.de'} changed or moved; restore them")):
        fit(text_recipe(tmp_path, data, "train.max_steps=4"))


def test_check_reads_the_corpus_only_to_compare_it_with_a_checkpoint(tmp_path, monkeypatch):
    """Its fingerprint hashes every byte of the corpus: a run directory without checkpoints
    (after prepare) has nothing to compare it with."""
    from seq2seq.data import fingerprint
    from seq2seq.data.cache import prepare_data
    from seq2seq.training.run_dir import train_problems

    data = tmp_path / "data"
    write_corpus(data)
    recipe = text_recipe(tmp_path, data, "train.max_steps=2")
    prepare_data(recipe, show_progress=False)
    hashed = []
    monkeypatch.setattr(fingerprint, "_DIGESTS", {})
    real = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda *a: hashed.append(a) or real(*a))
    assert train_problems(recipe) == [] and hashed == []
    fit(recipe)
    hashed.clear()
    assert train_problems(text_recipe(tmp_path, data, "train.max_steps=4")) == []
    assert [path.name for path, _ in hashed] == ["train.en", "train.de"]


def test_weights_that_do_not_fit_the_recipe_are_one_line(tmp_path):
    from seq2seq.cli import main

    fit(recipe_from_dict(tiny_tree(str(tmp_path / "run"), train={"max_steps": 1})))
    path = tmp_path / "run" / "best.pt"
    ckpt = load_checkpoint(path)
    ckpt["model"] = {k: torch.zeros(3) for k in ckpt["model"]}
    from seq2seq.checkpoint import save_checkpoint

    save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(Seq2SeqError, match="bad.pt: its weights do not fit the model its "
                                           "recipe describes"):
        from seq2seq.translate import Translator

        Translator.from_checkpoint(tmp_path / "bad.pt")
    assert main(["translate", "--checkpoint", str(tmp_path / "bad.pt"), "--input",
                 str(path)]) == 2


def test_check_refuses_what_train_would_refuse_in_the_run_directory_and_writes_nothing(
        tmp_path, monkeypatch):
    """``check`` said OK (exit 0) to each of these, and ``train`` then refused them."""
    import yaml

    from tests.robustness.conftest import snapshot

    data = tmp_path / "data"
    write_corpus(data)
    fit(text_recipe(tmp_path, data, "train.max_steps=2"))
    run = tmp_path / "run"
    path = tmp_path / "r.yaml"
    tree = tiny_tree(str(run))
    tree["data"]["root"] = str(data)
    tree["data"]["train"] = {"format": "text", "src": "train.en", "trg": "train.de"}
    path.write_text(yaml.safe_dump(tree))

    def check(*overrides: str) -> list[str]:
        before = snapshot(tmp_path)
        result = subprocess.run([sys.executable, "-m", "seq2seq", "check", str(path),
                                 "train.max_steps=4", *overrides], capture_output=True,
                                text=True, cwd=REPO, timeout=300)
        assert snapshot(tmp_path) == before and "Traceback" not in result.stderr
        assert result.returncode == (2 if result.stdout == "" else 0), result.stderr
        return [line for line in result.stderr.splitlines() if line.startswith("error: ")]

    assert check() == []  # a resume with more steps is fine
    holder = hold_lock(run)
    try:
        assert check() == [f"error: {path}: output_dir {run} is in use by another training run "
                           f"(process {holder.pid}); wait for it to end, or use another "
                           "output_dir"]
    finally:
        holder.kill()
        holder.wait()
    assert check("model.emb_size=32") == [
        f"error: {path}: cannot resume {run}: the recipe changed in model.emb_size (use a new "
        "output_dir, or restore those values)"]
    with open(data / "train.en", "a", encoding="utf-8") as handle:
        handle.write("one more sentence\n")
    with open(data / "train.de", "a", encoding="utf-8") as handle:
        handle.write("noch ein Satz\n")
    (refused,) = check()
    assert f"cannot resume {run}: the training corpus is not the one its checkpoint" in refused
    for name in ("last.pt", "best.pt", *[p.name for p in run.glob("step_*.pt")]):
        (run / name).write_bytes(b"not a checkpoint")
    (refused,) = check()
    assert f"cannot resume {run}: no checkpoint there can be resumed" in refused

    # A GPU this machine lacks: train refuses it (prepare does not need it).
    from seq2seq.config import recipe_from_dict as load
    from seq2seq.training.run_dir import train_problems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fresh = dict(tree, output_dir=str(tmp_path / "fresh"))
    assert train_problems(load(fresh, ["train.device=cuda"])) == [
        "train.device cuda: no CUDA GPU is available"]
    assert train_problems(load(fresh, ["train.device=cpu"])) == []


def test_a_run_removes_its_own_partial_writes_only(tmp_path):
    """train (or a resume) deleted every .*.tmp in output_dir: a `translate --output
    RUN/hyp.txt` writing there at that moment failed at its end, its output gone."""
    recipe = recipe_from_dict(tiny_tree(str(tmp_path / "run")), ["train.max_steps=2"])
    fit(recipe)
    run = tmp_path / "run"
    killed = [run / ".last.pt.k1ll3d00.tmp", run / ".last.pt.sha256.k1ll3d01.tmp",
              run / ".metrics.jsonl.k1ll3d02.tmp"]
    others = [run / ".hyp.txt.w0rk1ng0.tmp", run / ".notes.k1ll3d03.tmp"]
    for path in killed + others:
        path.write_text("partial")
    fit(recipe_from_dict(tiny_tree(str(tmp_path / "run")), ["train.max_steps=3"]))
    assert [path.exists() for path in killed + others] == [False] * 3 + [True] * 2


def test_a_diverged_run_s_perplexity_is_logged_short():
    """A run at lr 10 logged `ppl 10142320547350044927...`, a 305-digit number."""
    from seq2seq.training.run_dir import format_metrics

    assert format_metrics({"loss": 700.0, "ppl": 1.0142320547350045e304, "n_sentences": 5}) \
        == "loss 700.000  ppl 1.014e+304  n_sentences 5"
    assert format_metrics({"ppl": 122.3981}) == "ppl 122.398"


def test_a_launcher_holds_the_runs_lock_for_its_workers_and_no_one_else(tmp_path, monkeypatch):
    """``seq2seq train`` with several processes on one node holds the run's lock while its
    torchrun workers run; their main rank, a child of it, takes it as held for it; another
    process is refused."""
    from seq2seq import launch
    from seq2seq.locks import HELD_FOR_CHILDREN, held_by_parent
    from seq2seq.training.commands import train_command
    from seq2seq.training.run_dir import RunDirectory

    run = tmp_path / "run"
    recipe = recipe_from_dict(tiny_tree(str(run)), ["distributed.nproc_per_node=2"])
    seen = []

    def workers(recipe, recipe_path, overrides):
        with pytest.raises(Seq2SeqError, match=f"is in use by another training run "
                                               f"\\(process {os.getpid()}\\)"):
            RunDirectory(run).lock()  # another process's run (another open file)
        held = os.environ[HELD_FOR_CHILDREN]
        seen.append(held)
        # A worker of this launcher: its parent is this process.
        worker = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from seq2seq.locks "
             "import held_by_parent; sys.exit(0 if held_by_parent(Path(sys.argv[1])) else 1)",
             str(run)], env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert worker.returncode == 0
        assert not held_by_parent(run)  # this process is no child of itself
        return 0

    monkeypatch.setattr(launch, "launch_workers", workers)
    assert train_command(recipe, tmp_path / "r.yaml", []) == 0
    assert seen == [f"{os.getpid()}:{run.resolve()}"]
    assert HELD_FOR_CHILDREN not in os.environ
    again = RunDirectory(run)
    again.lock()  # released when the workers ended
    again.unlock()
    # Named for another directory, or by a process that is not the parent: not held.
    monkeypatch.setenv(HELD_FOR_CHILDREN, f"{os.getppid()}:{tmp_path / 'other'}")
    assert not held_by_parent(run)
    monkeypatch.setenv(HELD_FOR_CHILDREN, f"{os.getppid()}:{run.resolve()}")
    assert held_by_parent(run)
    monkeypatch.setenv(HELD_FOR_CHILDREN, f"{os.getpid()}:{run.resolve()}")
    assert not held_by_parent(run)



def test_workers_that_outlive_their_launcher_keep_the_lock_of_a_new_directory(tmp_path,
                                                                              monkeypatch):
    """A launcher that made the run's directory removed it on close, ``.lock`` included, while
    its workers still ran (a second Ctrl-C cuts torchrun's wait for them short): their main
    rank then held a lock on a deleted file, and a new run took the directory."""
    from seq2seq import launch
    from seq2seq.training.commands import train_command
    from seq2seq.training.run_dir import RunDirectory, lock_holder

    run = tmp_path / "run"  # made by the launcher
    recipe = recipe_from_dict(tiny_tree(str(run)), ["distributed.nproc_per_node=2"])
    script = ("import sys, time; from pathlib import Path; from seq2seq.locks import "
              "take_when_free; take_when_free(Path(sys.argv[1])); print('waiting', flush=True);"
              " time.sleep(600)")
    workers = []

    def launch_and_leave(recipe, recipe_path, overrides):
        workers.append(subprocess.Popen([sys.executable, "-c", script, str(run / ".lock")],
                                        stdout=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONPATH=str(REPO))))
        assert workers[0].stdout.readline() == "waiting\n"
        return 130

    monkeypatch.setattr(launch, "launch_workers", launch_and_leave)
    try:
        assert train_command(recipe, tmp_path / "r.yaml", []) == 130
        deadline = time.monotonic() + 10
        while (time.monotonic() < deadline and (run / ".lock").exists()
               and lock_holder((run / ".lock").stat()) != f"process {workers[0].pid}"):
            time.sleep(0.05)
        with pytest.raises(Seq2SeqError, match=f"in use by another training run \\(process "
                                               f"{workers[0].pid}\\)"):
            RunDirectory(run).lock()
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_a_worker_takes_the_runs_lock_when_its_launcher_dies_first(tmp_path):
    """torchrun's workers train on when their launcher is killed (``kill -9``): the run's lock,
    which the launcher held for them, is taken by the main rank as soon as it is free, so a
    second run is still refused."""
    from seq2seq.training.run_dir import RunDirectory, lock_holder

    run = tmp_path / "run"
    launcher = hold_lock(run)
    script = ("import sys, time; from pathlib import Path; from seq2seq.locks import "
              "take_when_free; take_when_free(Path(sys.argv[1])); print('waiting', flush=True);"
              " time.sleep(600)")
    worker = subprocess.Popen([sys.executable, "-c", script, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert worker.stdout.readline() == "waiting\n"
        assert lock_holder((run / ".lock").stat()) == f"process {launcher.pid}"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while (lock_holder((run / ".lock").stat()) != f"process {worker.pid}"
               and time.monotonic() < deadline):
            time.sleep(0.05)
        with pytest.raises(Seq2SeqError, match=f"in use by another training run \\(process "
                                               f"{worker.pid}\\)"):
            RunDirectory(run).lock()
    finally:
        for process in (launcher, worker):
            process.kill()
            process.wait()

"""Checkpoint files (seq2seq/checkpoint.py): their mode on disk and the errors a user sees."""

import os
import re
import stat

import pytest
import torch

from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def umask():
    """Run the test under umask 027 (group may read, others nothing), then restore it."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_a_saved_checkpoint_has_the_mode_of_any_new_file(tmp_path, umask):
    # mkstemp alone gives 0600: the other nodes of a multi-node run (other users or a group)
    # could not read the checkpoint.
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "recipe": {}}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == 0o640
    sidecar = tmp_path / "best.pt.sha256"
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o640
    # Overwriting keeps the usual mode too (the new file replaces the old one by rename).
    save_checkpoint({"model": {"w": torch.zeros(2)}, "recipe": {}}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize("target", ["-", "/dev/null", "/dev/stdout", "fifo"])
def test_a_checkpoint_goes_to_a_regular_file_only(tmp_path, target, monkeypatch):
    """A checkpoint has its checksum file beside it: on stdout it was mixed with the status
    line and left a file named ``-.sha256``; a device got ``/dev/null.sha256``."""
    monkeypatch.chdir(tmp_path)
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="a checkpoint is written to a regular file"):
        save_checkpoint({"model": {}, "recipe": {}}, target)
    assert not os.path.exists(f"{target}.sha256")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fifo"] if target == "fifo" else [])


def test_through_a_symlink_the_checksum_file_is_beside_the_file_written(tmp_path):
    real, link = tmp_path / "real.pt", tmp_path / "link.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "recipe": {}}, real)
    link.symlink_to(real)
    (tmp_path / "link.pt.sha256").write_text("0" * 64 + "  link.pt\n")  # stale
    save_checkpoint({"model": {"w": torch.zeros(2)}, "recipe": {}}, link)
    assert link.is_symlink() and not (tmp_path / "link.pt.sha256").exists()
    assert torch.equal(load_checkpoint(real)["model"]["w"], torch.zeros(2))  # checked: no error
    assert (tmp_path / "real.pt.sha256").read_text().endswith("  real.pt\n")


def test_saving_onto_a_directory_is_one_line_and_writes_nothing(tmp_path):
    target = tmp_path / "avg.pt"
    target.mkdir()
    with pytest.raises(CheckpointError, match="avg.pt: is a directory, not an output file"):
        save_checkpoint({"model": {}, "recipe": {}}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["avg.pt"]


@pytest.mark.parametrize("content, reason", [
    (b"hello world, a text file\n", "not a PyTorch checkpoint file (it is a text file)"),
    (b"name: quickstart\nmodel: {cell: gru}\n", "(it is a text file)"),
    (bytes(range(256)) * 4, "(it is not the zip archive torch.save writes)"),
], ids=["text", "yaml", "binary"])
def test_a_file_that_is_no_checkpoint_is_named_in_words(tmp_path, content, reason):
    path = tmp_path / "notckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a PyTorch checkpoint file") and reason in message
    assert not re.search(r"\(\d+\)", message)  # torch's bare KeyError, e.g. "(105)"


def test_a_truncated_checkpoint_without_sidecar_says_damaged(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(100)}, "recipe": {}}, path)
    (tmp_path / "best.pt.sha256").unlink()
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="best.pt: .*a damaged one"):
        load_checkpoint(path)


def tensor_offset(data: bytes, tensor: torch.Tensor) -> int:
    """Where a tensor's bytes lie in a saved file (torch stores them uncompressed)."""
    return data.index(tensor.numpy().tobytes())


def test_a_checkpoint_proves_its_own_integrity_without_a_side_file(tmp_path):
    path = tmp_path / "best.pt"
    weights = torch.arange(64, dtype=torch.float32)
    save_checkpoint({"model": {"w": weights}, "recipe": {}}, path)
    (tmp_path / "best.pt.sha256").unlink()
    assert torch.equal(load_checkpoint(path)["model"]["w"], weights)
    data = bytearray(path.read_bytes())
    data[tensor_offset(bytes(data), weights) + 17] ^= 0x01  # one bit of one weight
    moved = tmp_path / "elsewhere.pt"  # wherever it travels
    moved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"elsewhere.pt: corrupt checkpoint \(its "
                                              r"contents do not match the checksum stored"):
        load_checkpoint(moved)


def test_the_side_file_is_sha256sum_format_and_a_stale_one_says_stale(tmp_path, capsys):
    import subprocess

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(4)}, "recipe": {}}, path)
    sidecar = tmp_path / "last.pt.sha256"
    checked = subprocess.run(["sha256sum", "-c", sidecar.name], cwd=tmp_path,
                             capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout == "last.pt: OK\n"
    old = sidecar.read_bytes()
    save_checkpoint({"model": {"w": torch.zeros(4)}, "recipe": {}}, path)
    sidecar.write_bytes(old)  # the side file of the previous save
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(4))
    assert re.fullmatch(r"warning: .*last.pt.sha256: stale checksum file \(it does not match "
                        r".*last.pt, whose own checksum verifies\); ignoring it\n",
                        capsys.readouterr().err)


def test_integrity_covers_every_part_of_a_checkpoint(tmp_path):
    from seq2seq.checkpoint import payload_digest

    base = {"model": {"w": torch.ones(3)}, "recipe": {"seed": 1}, "step": 5,
            "rng": [{"torch": torch.zeros(2, dtype=torch.uint8)}]}
    variants = [
        {**base, "model": {"w": torch.tensor([1.0, 1.0, 1.5])}},
        {**base, "model": {"w": torch.ones(3, dtype=torch.float64)}},
        {**base, "model": {"w": torch.ones(1, 3)}},
        {**base, "recipe": {"seed": 2}},
        {**base, "step": 6},
        {**base, "rng": [{"torch": torch.ones(2, dtype=torch.uint8)}]},
        {**base, "model": {"v": torch.ones(3)}},
    ]
    digests = {payload_digest(v) for v in variants}
    assert len(digests) == len(variants) and payload_digest(base) not in digests
    assert payload_digest(base) == payload_digest({**base, "model": {"w": torch.ones(3)}})


def test_average_refuses_checkpoints_of_another_architecture_or_tokenizer(tmp_path):
    from seq2seq.checkpoint import average_checkpoints

    def save(name, weight, tokenizer, recipe=None):
        path = tmp_path / name
        spm = torch.tensor(list(tokenizer), dtype=torch.uint8)
        save_checkpoint({"model": {"w": weight}, "recipe": recipe or {"seed": 1},
                         "tokenizer": {"spm_model": spm}}, path)
        return path

    a = save("a.pt", torch.zeros(3), b"one")
    b = save("b.pt", torch.ones(3), b"one")
    average_checkpoints([a, b], tmp_path / "ab.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ab.pt")["model"]["w"], torch.full((3,), 0.5))
    other_shape = save("c.pt", torch.ones(4), b"one")
    other_tokens = save("d.pt", torch.ones(3), b"two")  # same shapes, other token ids
    with pytest.raises(CheckpointError, match="c.pt: different model architecture from .*a.pt"):
        average_checkpoints([a, other_shape], tmp_path / "out.pt")
    with pytest.raises(CheckpointError, match="d.pt: its tokenizer differs from .*a.pt's"):
        average_checkpoints([a, other_tokens], tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_average_refuses_checkpoints_of_two_runs_and_files_of_other_programs(tmp_path):
    """Both were averaged (exit 0), or were a traceback ('int' object has no attribute
    'keys')."""
    from seq2seq.checkpoint import average_checkpoints
    from seq2seq.training.run_dir import run_changes

    spm = {"spm_model": torch.tensor(list(b"one"), dtype=torch.uint8)}

    def save(name, recipe, changes=None):
        path = tmp_path / name
        save_checkpoint({"model": {"w": torch.ones(3)}, "recipe": recipe, "tokenizer": spm,
                         **(changes or {})}, path)
        return path

    a = save("a.pt", {"seed": 1, "train": {"lr": 0.001, "max_steps": 10}})
    resumed = save("b.pt", {"seed": 1, "train": {"lr": 0.001, "max_steps": 20}})
    average_checkpoints([a, resumed], tmp_path / "ab.pt", run_changes)  # one run, resumed
    for name, recipe in (("seed.pt", {"seed": 2, "train": {"lr": 0.001, "max_steps": 10}}),
                         ("lr.pt", {"seed": 1, "train": {"lr": 0.01, "max_steps": 10}})):
        other = save(name, recipe)
        with pytest.raises(CheckpointError, match=rf"{name}: not of the run of .*a.pt \(the "
                           r"recipe differs in (seed|train.lr)\); average checkpoints of one run"):
            average_checkpoints([a, other], tmp_path / "out.pt", run_changes)
    for name, changes in (("int.pt", {"model": 5}), ("empty.pt", {"model": {}}),
                          ("norecipe.pt", {"recipe": {}}), ("notok.pt", {"tokenizer": None}),
                          ("strings.pt", {"model": {"w": "x"}})):
        odd = save(name, {"seed": 1}, changes)
        for order in ([odd], [a, odd]):
            with pytest.raises(CheckpointError, match=rf"{name}: not a seq2seq checkpoint"):
                average_checkpoints(order, tmp_path / "out.pt", run_changes)
    assert not (tmp_path / "out.pt").exists()


def test_a_directory_where_the_checksum_file_goes_is_refused_before_any_work(tmp_path):
    from seq2seq.checkpoint import check_checkpoint_output

    (tmp_path / "x.pt.sha256").mkdir()
    with pytest.raises(CheckpointError, match=r"x.pt.sha256: is a directory, where the "
                       "checksum file of .*x.pt goes"):
        check_checkpoint_output(tmp_path / "x.pt")
    (tmp_path / "real.pt.sha256").mkdir()
    (tmp_path / "link.pt").symlink_to(tmp_path / "real.pt")  # the side file goes beside real.pt
    with pytest.raises(CheckpointError, match="real.pt.sha256: is a directory"):
        check_checkpoint_output(tmp_path / "link.pt")


@pytest.mark.parametrize("signal_exception", ["Terminated", "KeyboardInterrupt"])
def test_a_stop_signal_while_a_checkpoint_loads_stops_the_command(tmp_path, monkeypatch,
                                                                   signal_exception):
    """A SIGTERM during torch.load was read as a damaged checkpoint: a resume skipped last.pt
    for an older one and trained on, the signal lost; average blamed a good file."""
    from seq2seq.checkpoint import load_latest
    from seq2seq.cli import Terminated

    save_checkpoint({"model": {"w": torch.zeros(2)}, "recipe": {}}, tmp_path / "last.pt")
    save_checkpoint({"model": {"w": torch.ones(2)}, "recipe": {}}, tmp_path / "older.pt")
    stop = Terminated(15) if signal_exception == "Terminated" else KeyboardInterrupt()

    def interrupted(*args, **kwargs):
        raise stop

    monkeypatch.setattr(torch, "load", interrupted)
    skipped = []
    with pytest.raises(type(stop)):
        load_latest([tmp_path / "last.pt", tmp_path / "older.pt"], skipped.append)
    assert skipped == []
    with pytest.raises(type(stop)):
        load_checkpoint(tmp_path / "older.pt")


@pytest.mark.parametrize("name", ["a\nb.pt", "c\\d.pt", "e\rf.pt"])
def test_a_checksum_file_of_an_odd_name_is_read_by_sha256sum(tmp_path, name, capsys):
    """A line break in the name split the side file's line: 'sha256sum -c' said it was
    improperly formatted. Such names are escaped as sha256sum escapes them."""
    import subprocess

    path = tmp_path / name
    save_checkpoint({"model": {"w": torch.ones(2)}, "recipe": {"seed": 1}}, path)
    checked = subprocess.run(["sha256sum", "-c", path.name + ".sha256"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.endswith(": OK\n"), checked
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert capsys.readouterr().err == ""  # read as matching, not as a stale side file
    sidecar = tmp_path / (name + ".sha256")
    sidecar.write_text(sidecar.read_text().replace(sidecar.read_text()[1:65], "0" * 64))
    load_checkpoint(path)
    assert "stale checksum file" in capsys.readouterr().err


def test_a_pickle_file_as_a_checkpoint_is_one_line_without_torch_s_warning(tmp_path, recwarn):
    """torch warned in two lines about the pickle protocol before the one-line refusal."""
    import pickle

    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps({"model": 1, "recipe": 2}, protocol=4))
    with pytest.raises(CheckpointError, match="not a loadable seq2seq checkpoint"):
        load_checkpoint(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_two_saves_to_one_path_leave_a_checkpoint_and_its_own_checksum(tmp_path, monkeypatch):
    """Two `average --output X.pt` at once could leave X.pt of one and X.pt.sha256 of the
    other (sha256sum -c failed, every load warned): the two files were renamed apart."""
    import hashlib
    import threading
    import time

    import seq2seq.checkpoint as module

    write = module.write_bytes

    def slow_write(path, data):  # the first save dawdles between its two files
        write(path, data)
        if threading.current_thread().name == "first" and str(path).endswith(".pt"):
            time.sleep(0.5)

    monkeypatch.setattr(module, "write_bytes", slow_write)
    path = tmp_path / "avg.pt"
    first = threading.Thread(target=save_checkpoint, name="first",
                             args=({"model": {"w": torch.ones(3)}, "recipe": {}}, path))
    first.start()
    time.sleep(0.1)
    save_checkpoint({"model": {"w": torch.zeros(3)}, "recipe": {}}, path)
    first.join()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "avg.pt.sha256").read_text().split()[0] == digest


@pytest.mark.parametrize("through", ["path", "symlink"])
def test_a_failed_save_keeps_the_old_checkpoint_and_its_checksum_file(tmp_path, monkeypatch,
                                                                     through):
    """A full disk left last.pt without last.pt.sha256 while the error said "the previous
    checkpoint is unchanged": the side file was removed before the write."""
    import seq2seq.checkpoint as module
    from seq2seq.paths import OutputError

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "recipe": {}}, path)
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "last.pt.sha256")}
    target = path
    if through == "symlink":
        target = tmp_path / "link.pt"
        target.symlink_to(path)
    write = module.write_bytes

    def full_disk(out, data):
        if str(out).endswith(".pt"):
            raise OutputError(f"{out}: cannot write (No space left on device)",
                              "No space left on device")
        write(out, data)

    monkeypatch.setattr(module, "write_bytes", full_disk)
    with pytest.raises(CheckpointError, match="the previous checkpoint is unchanged"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "recipe": {}}, target)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    load_checkpoint(path)  # whole, and its side file agrees


def test_a_language_pair_is_checked_by_one_rule_in_one_wording():
    """Ensemble members, evaluate and the benchmark each had their own check and wording."""
    from types import SimpleNamespace

    from seq2seq.checkpoint import check_language_pair, check_member

    check_language_pair(("en", "de"), ("en", "de"), "a.pt", "b.pt")  # the same pair passes
    with pytest.raises(CheckpointError) as error:
        check_language_pair(("de", "en"), ("en", "de"), "--checkpoint a.pt", "the recipe's data")
    assert str(error.value) == ("--checkpoint a.pt: translates de-en, but the language pair of "
                                "the recipe's data is en-de")

    def recipe(src: str, trg: str) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(src_lang=src, trg_lang=trg))

    check_member("b.pt", "a.pt", recipe("en", "de"), recipe("en", "de"), None, None)
    with pytest.raises(CheckpointError) as error:
        check_member("b.pt", "a.pt", recipe("fr", "de"), recipe("en", "de"), None, None)
    assert str(error.value) == ("b.pt: translates fr-de, but the language pair of a.pt is "
                                "en-de; an ensemble needs one language pair")

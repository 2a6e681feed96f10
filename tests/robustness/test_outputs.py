"""Every command's outputs, as a user gives them: an output never destroys an input or a special
file, and a command refused or interrupted leaves every file as it was, with no temporary file."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.robustness.conftest import error_lines, seq2seq, snapshot


@pytest.fixture
def workdir(tmp_path, trained):
    """A directory with an input file (the trained checkpoint lives elsewhere)."""
    (tmp_path / "in.txt").write_bytes(b"the dog sees the cat\n\na man\n")
    return tmp_path


@pytest.mark.parametrize("argv, named", [
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--output", "in.txt"],
     "in.txt"),
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--output", "./in.txt"],
     "./in.txt"),
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--output", "link.txt"],
     "link.txt"),
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--attention", "hard.txt"],
     "hard.txt"),
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--output", "{ckpt}"],
     "{ckpt}"),
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--output", "o.txt",
      "--attention", "o.txt"], "o.txt"),
    (["translate", "--checkpoint", "{ckpt}", "--input", "in.txt", "--output", "new.txt",
      "--attention", "./new.txt"], "./new.txt"),
    (["average", "{ckpt}", "{ckpt}", "--output", "{ckpt}"], "{ckpt}"),
    (["evaluate", "--checkpoint", "{ckpt}", "--src", "in.txt", "--ref", "r/in.txt.hyp.txt",
      "--report-dir", "r"], "r/in.txt.hyp.txt"),
], ids=["same", "dot", "symlink", "hardlink-attention", "checkpoint", "output-is-attention",
        "new-output-is-new-attention",
        "average-onto-an-input", "evaluate-report-onto-a-ref"])
def test_an_output_that_is_an_input_is_refused_before_any_work(argv, named, workdir, trained):
    (workdir / "link.txt").symlink_to(workdir / "in.txt")
    os.link(workdir / "in.txt", workdir / "hard.txt")
    (workdir / "o.txt").write_bytes(b"previous\n")
    (workdir / "r").mkdir()
    (workdir / "r" / "in.txt.hyp.txt").write_bytes(b"a\nb\nc\n")
    before = snapshot(workdir)
    ckpt_before = trained.read_bytes()
    result = seq2seq(*[a.format(ckpt=trained) for a in argv], cwd=workdir)
    assert result.returncode == 2, result.stderr.decode()
    (line,) = error_lines(result.stderr)
    other = "output" if named in ("o.txt", "./new.txt") else "input"  # --output, --attention
    assert line.startswith(f"error: {named.format(ckpt=trained)}: is the same file as the "
                           f"{other}"), line
    assert b"Traceback" not in result.stderr
    assert snapshot(workdir) == before and trained.read_bytes() == ckpt_before


def test_a_refused_command_touches_no_file(workdir, trained):
    before = snapshot(workdir)
    for argv in (["translate", "--checkpoint", trained, "--input", "missing.txt", "--output",
                  "out.txt"],
                 ["translate", "--checkpoint", "nope.pt", "--input", "in.txt", "--output",
                  "out.txt", "--attention", "att.jsonl"],
                 ["average", "nope.pt", "--output", "avg.pt"],
                 ["evaluate", "--checkpoint", "nope.pt", "--src", "in.txt", "--ref", "in.txt",
                  "--report-dir", "rep"]):
        result = seq2seq(*argv, cwd=workdir)
        assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, argv
    assert snapshot(workdir) == before


def test_special_outputs_are_written_through_not_replaced(workdir, trained):
    os.mkfifo(workdir / "fifo")
    os.mknod(workdir / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    reader = subprocess.Popen(["cat", str(workdir / "fifo")], stdout=subprocess.PIPE)
    result = seq2seq("translate", "--checkpoint", trained, "--input", "in.txt", "--output",
                     "fifo", "--attention", "null", cwd=workdir)
    out, _ = reader.communicate(timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert out.count(b"\n") == 3
    assert stat.S_ISFIFO((workdir / "fifo").stat().st_mode)
    assert stat.S_ISCHR((workdir / "null").stat().st_mode)
    assert not list(workdir.glob(".*.tmp"))


def test_a_full_disk_while_translating_is_one_line(workdir, trained):
    os.mknod(workdir / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # like /dev/full
    result = seq2seq("translate", "--checkpoint", trained, "--input", "in.txt", "--output",
                     "full", cwd=workdir)
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert error_lines(result.stderr) == ["error: full: cannot write (No space left on device)"]


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def hang_up_by_default() -> None:
    """As a command started from a terminal: the test runner itself may run with SIGHUP
    ignored (under nohup), which its children inherit and the CLI keeps."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("sig,launch", [(signal.SIGTERM, None), (signal.SIGINT, None),
                                        (signal.SIGINT, ignore_sigint),
                                        (signal.SIGHUP, hang_up_by_default)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-ignored-by-the-launcher",
                              "SIGHUP-of-a-closed-terminal"])
def test_an_interrupted_translation_leaves_the_old_output_and_no_temporary_file(
        sig, launch, workdir, trained):
    # A background job of a script starts with SIGINT ignored, and Python would keep it so:
    # the CLI installs its own SIGINT handler, so that SIGINT still stops it.
    big = workdir / "big.txt"
    big.write_bytes(b"the dog sees the cat and the man reads a book\n" * 200_000)
    (workdir / "out.txt").write_bytes(b"previous output\n")
    # PYTHONFAULTHANDLER: a process still running a minute after the signal is sent SIGABRT,
    # and the traceback of every thread it prints says where it was.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate", "--checkpoint",
                                str(trained), "--input", "big.txt", "--output", "out.txt",
                                "--attention", "att.jsonl"],
                               cwd=workdir, env=env, stderr=subprocess.PIPE,
                               preexec_fn=launch)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(workdir.glob(".*.tmp"))) < 2:
        time.sleep(0.05)  # both temporary files exist: translation is under way
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, err = process.communicate(timeout=30)
        pytest.fail(f"still running 60 s after {sig.name}; where it was:\n{err.decode()[-4000:]}")
    assert process.returncode == 128 + sig and b"Traceback" not in err, err.decode()
    assert (workdir / "out.txt").read_bytes() == b"previous output\n"
    assert not (workdir / "att.jsonl").exists()
    assert not list(workdir.glob(".*.tmp"))


def test_a_hang_up_ignored_by_the_launcher_as_by_nohup_stays_ignored(workdir, trained):
    (workdir / "some.txt").write_bytes(b"the dog sees the cat\n" * 3000)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate", "--checkpoint",
                                str(trained), "--input", "some.txt", "--output", "out.txt"],
                               cwd=workdir, env=env, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(workdir.glob(".*.tmp")):
        time.sleep(0.05)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]
    assert (workdir / "out.txt").read_bytes().count(b"\n") == 3000


def test_the_checkpoint_given_as_input_is_refused_before_it_loads(workdir, trained):
    result = seq2seq("translate", "--checkpoint", trained, "--input", trained, cwd=workdir)
    assert result.returncode == 2 and result.stdout == b""
    assert error_lines(result.stderr) == [f"error: --input {trained}: is the checkpoint, not "
                                          "text to translate"]

"""The command line's own answers: unknown options, and help, version and output that cannot
be written."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from seq2seq.cli import main
from seq2seq.stdout import Named
from tests.conftest import REPO

FULL = Path("/dev/full")  # every write fails with ENOSPC (Linux)


def seq2seq(*args, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], cwd=REPO,
                          stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          timeout=300)


@pytest.mark.parametrize("argv, unknown", [
    (["--bogus"], "--bogus"),
    (["-x", "--bogus=1"], "-x --bogus=1"),
    (["--bogus", "translate", "--scores"], "--bogus"),  # before the command, --checkpoint missing
    (["translate", "--bogus", "--checkpoint", "x.pt"], "--bogus"),
    (["translate", "--no-such=3"], "--no-such=3"),
    (["evaluate", "--src", "a", "--colour"], "--colour"),
])
def test_an_unknown_option_is_named_before_what_is_missing(argv, unknown, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unrecognized arguments: {unknown} (see" in err, err


@pytest.mark.parametrize("argv, missing", [
    ([], "COMMAND"),
    (["translate", "--scores"], "--checkpoint"),
    (["translate", "--check"], None),  # a prefix of --checkpoint, so known: its value is missing
    (["translate", "--input", "-.5"], "--checkpoint"),  # a negative number is a value
])
def test_a_missing_argument_alone_is_still_said(argv, missing, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized" not in err, err
    assert missing is None or f"required: {missing}" in err, err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["translate", "--help"]])
def test_help_and_version_into_a_full_disk_fail_with_one_line(argv):
    with FULL.open("w") as full:
        result = seq2seq(*argv, stdout=full)
    assert result.returncode == 1
    assert result.stderr.decode() == "error: <stdout>: No space left on device\n"


def test_a_command_whose_output_cannot_be_written_names_stdout(tmp_path):
    recipe = REPO / "recipes" / "quickstart.yaml"
    with FULL.open("w") as full:
        result = seq2seq("check", recipe, f"output_dir={tmp_path / 'run'}", stdout=full)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1:] == [
        "error: <stdout>: No space left on device"], result.stderr.decode()


def test_help_into_a_closed_pipe_is_not_an_error():
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate", "--help"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written
    assert process.wait(timeout=300) == 0
    assert process.stderr.read() == b""


def test_named_streams_name_their_failed_writes_and_pass_the_rest_through():
    class Failing(io.BytesIO):
        def __init__(self, error):
            super().__init__()
            self.error = error

        def write(self, data):
            raise self.error

    for error in (OSError(28, "No space left on device"), BrokenPipeError(32, "Broken pipe")):
        stream = io.TextIOWrapper(Failing(error), write_through=True)
        for write in (Named(stream).write, Named(stream).buffer.write):
            with pytest.raises(OSError) as failed:
                write("text" if write.__self__._stream is stream else b"text")
            assert failed.value is error and failed.value.filename == "<stdout>"
            error.filename = None
    named = Named(io.StringIO("read me"))
    assert named.read() == "read me" and named.write("x") == 1


@pytest.mark.parametrize("command, error, line", [
    ("translate", RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 1024000000 bytes. Error code 12 (Cannot allocate memory)"),
     "error: out of memory (allocating 0.95 GiB failed); a search needs less with a smaller "
     "--batch-tokens or --beam"),
    ("train", MemoryError(), "error: out of memory; a training batch needs less with a smaller "
     "train.batch_tokens"),
    ("evaluate", RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB "
                              "total capacity)"),
     "error: out of memory (allocating 20.00 GiB failed); a search needs less with a smaller "
     "--batch-tokens or --beam"),
])
def test_memory_that_runs_out_is_one_line_naming_what_sizes_it(command, error, line,
                                                               monkeypatch, capsys):
    """A search's memory grows with the beam and the batch, and the flags' ranges allow more
    than a machine holds: this was torch's traceback."""
    def fail(args):
        raise error

    monkeypatch.setattr(f"seq2seq.cli.cmd_{command}", fail)
    argv = {"translate": ["translate", "--checkpoint", "x.pt"],
            "train": ["train", "recipe.yaml"],
            "evaluate": ["evaluate", "recipe.yaml"]}[command]
    assert main(argv) == 1
    assert capsys.readouterr().err == line + "\n"


def test_any_other_runtime_error_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr("seq2seq.cli.cmd_translate", fail)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        main(["translate", "--checkpoint", "x.pt"])


def test_a_dangling_symlink_or_a_loop_as_the_data_directory_is_named(tmp_path, capsys):
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "missing" / "dir")
    assert main(["generate-data", str(link), "--train", "1", "--valid", "1", "--test", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {link}: {link} is a symbolic link to nothing "
                                       f"({tmp_path}/missing/dir)\n")
    (tmp_path / "a").symlink_to("b")  # a loop was "a symlink to b, which does not exist"
    (tmp_path / "b").symlink_to("a")
    assert main(["generate-data", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/a: {tmp_path}/a is a symbolic link "
                                       "in a loop (b)\n")


def test_overrides_may_follow_a_command_s_options(capsys):
    """`evaluate R --beam 3 eval.bootstrap=0` was 'unrecognized arguments', said by the top
    parser's name; an unknown word is now said by the command's."""
    from seq2seq.cli import build_parser

    args = build_parser().parse_args(["evaluate", "r.yaml", "train.lr=1", "--beam", "3",
                                      "eval.bootstrap=0", "--quantize", "seed=2"])
    assert args.overrides == ["train.lr=1", "eval.bootstrap=0", "seed=2"] and args.beam == 3
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "r.yaml", "--beam", "3", "stray"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: seq2seq evaluate: unrecognized arguments: stray "
                                       "(see seq2seq evaluate --help)\n")


def test_an_override_given_as_the_recipe_says_where_overrides_go(capsys):
    assert main(["check", "train.lr=1"]) == 2
    assert capsys.readouterr().err == ("error: train.lr=1: no such recipe file (overrides come "
                                       "after the recipe file)\n")


def test_warnings_and_errors_never_go_into_the_output_when_stderr_is_closed(tmp_path):
    """With fd 2 closed Python's sys.stderr is None, and print(file=None) writes to stdout:
    a warning became the first line of the translations, an error the whole output."""
    out = tmp_path / "out.txt"
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m seq2seq translate --checkpoint nowhere.pt "
                       f"2>&- > {out}"], capture_output=True, text=True)
    assert result.returncode == 2 and out.read_text() == ""
    # a path that is not UTF-8, said on the closed stderr, is not a crash (exit 1)
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m seq2seq translate --checkpoint $'\\xff.pt' "
                       f"2>&- > {out}"], capture_output=True, text=True)
    assert result.returncode == 2 and out.read_text() == ""


def test_a_usage_error_keeps_exit_code_2_where_stderr_cannot_be_written():
    with FULL.open("w") as full:
        result = subprocess.run([sys.executable, "-m", "seq2seq", "--bogus"], cwd=REPO,
                                stderr=full, stdout=subprocess.PIPE, timeout=300)
    assert result.returncode == 2 and result.stdout == b""


def test_serve_refuses_an_empty_api_keys_path_rather_than_serving_without_keys(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "best.pt", "--api-keys", ""])
    assert stop.value.code == 2
    assert "argument --api-keys: an empty path" in capsys.readouterr().err


def test_named_stdout_wraps_once_and_restores_what_it_replaced(monkeypatch):
    from seq2seq.stdout import named_stdout

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    with named_stdout():
        outer = sys.stdout
        assert isinstance(outer, Named)
        with named_stdout():  # a call within a call (or another thread's, meanwhile)
            assert sys.stdout is outer
        assert sys.stdout is outer
    assert sys.stdout is stream
    monkeypatch.setattr(sys, "stdout", None)  # a descriptor closed at start
    with named_stdout():
        assert sys.stdout is None

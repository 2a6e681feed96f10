"""Outputs (seq2seq/files.py): whatever a path names, nothing is destroyed or left half-written.

Special files (FIFOs, device nodes, sockets, links) are made in a temporary directory, never
taken from /dev.
"""

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from seq2seq.files import open_output, write_bytes
from seq2seq.paths import OutputError, check_distinct, check_output
from seq2seq.translate_io import write_lines


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old\n")
    with pytest.raises(ValueError), open_output(path) as stream:
        stream.write(b"partial")
        raise ValueError("model crashed")
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with open_output(path) as stream:
        write_lines(["new"], stream)
    assert path.read_bytes() == b"new\n"
    with pytest.raises(OutputError, match="does not exist"), \
            open_output(tmp_path / "missing" / "out.txt"):
        pass


class Stop(Exception):
    """What the test's signal handler raises (the CLI raises its own for SIGTERM)."""


@contextlib.contextmanager
def signal_once_made(monkeypatch, maker: str, sig: signal.Signals):
    """``tempfile.<maker>`` sends ``sig`` to this process the instant after it made its file
    or directory, as a Ctrl-C might come; the handler raises :class:`Stop`."""
    real = getattr(tempfile, maker)

    def make(*args, **kwargs):
        made = real(*args, **kwargs)
        signal.raise_signal(sig)  # its handler runs at once unless the signal is held back
        return made

    def stop(signum, frame):
        raise Stop()

    monkeypatch.setattr(tempfile, maker, make)
    previous = signal.signal(sig, stop)
    try:
        with pytest.raises(Stop):
            yield
    finally:
        signal.signal(sig, previous)
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # nothing left blocked


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_as_the_temporary_file_is_made_leaves_no_file(sig, tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old\n")
    with signal_once_made(monkeypatch, "mkstemp", sig), open_output(path) as stream:
        stream.write(b"new\n")
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_signal_as_a_tokenizer_or_the_kernels_start_leaves_nothing(tmp_path, monkeypatch):
    from seq2seq import native
    from seq2seq.config import TokenizerConfig
    from seq2seq.tokenizer import train_tokenizer

    with signal_once_made(monkeypatch, "mkdtemp", signal.SIGINT):
        train_tokenizer(TokenizerConfig(vocab_size=20), [("a b", "c d")], tmp_path / "tok")
    with signal_once_made(monkeypatch, "mkstemp", signal.SIGINT):
        native.build(native.compiler(), tmp_path / "built")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["built"]


def test_a_new_file_gets_the_mode_of_any_new_file(tmp_path):
    umask = os.umask(0o027)
    try:
        write_bytes(tmp_path / "new.txt", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640


def test_an_output_path_that_is_a_directory_is_one_line_and_nothing_is_written(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OutputError, match="out: is a directory, not an output file"):
        check_output(out_dir)
    with pytest.raises(OutputError, match="is a directory, not an output file"), \
            open_output(out_dir):
        pass
    with pytest.raises(OutputError, match="directory .*missing does not exist"):
        check_output(tmp_path / "missing" / "out.txt")
    check_output(None)
    check_output("-")
    check_output(tmp_path / "new.txt")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]  # no temporary file


def test_a_symlink_stays_and_its_target_gets_the_output(tmp_path):
    target = tmp_path / "real.txt"
    target.write_bytes(b"old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_bytes(link, b"new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new\n"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "not-yet.txt")
    write_bytes(dangling, b"made\n")
    assert dangling.is_symlink() and (tmp_path / "not-yet.txt").read_bytes() == b"made\n"


def test_a_replaced_file_keeps_its_permission_bits(tmp_path):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old\n")
    path.chmod(0o604)
    write_bytes(path, b"new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o604 and path.read_bytes() == b"new\n"


def test_a_read_only_file_is_an_error_and_is_not_replaced(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_bytes(b"precious\n")
    path.chmod(0o444)
    with pytest.raises(OutputError, match=r"keep.txt: is read-only; not replaced"):
        write_bytes(path, b"new\n")
    assert path.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_file_with_other_hard_links_is_rewritten_in_place(tmp_path):
    first = tmp_path / "a.txt"
    first.write_bytes(b"old\n")
    second = tmp_path / "b.txt"
    os.link(first, second)
    inode = first.stat().st_ino
    write_bytes(first, b"new\n")
    assert first.stat().st_ino == inode and first.stat().st_nlink == 2
    assert second.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_a_fifo_is_written_directly_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    with open_output(fifo) as stream:
        write_lines(["one", "two"], stream)
    reader.join(timeout=30)
    assert received == [b"one\ntwo\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_fifo_whose_reader_leaves_is_one_line(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def read_a_little():
        with open(fifo, "rb") as handle:
            handle.read(1)

    reader = threading.Thread(target=read_a_little)
    reader.start()
    with pytest.raises(OutputError, match=r"pipe: cannot write \(Broken pipe\)"), \
            open_output(fifo) as stream:
        reader.join(timeout=30)
        for _ in range(1000):
            stream.write(b"x" * 65536)
            stream.flush()


def make_char_device(path, major, minor):
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))


def test_a_character_device_is_written_directly_and_stays_a_device(tmp_path):
    null = tmp_path / "null"
    make_char_device(null, 1, 3)  # what /dev/null is
    with open_output(null) as stream:
        write_lines(["discarded"], stream)
    assert stat.S_ISCHR(null.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_full_disk_is_one_line_naming_the_output(tmp_path):
    full = tmp_path / "full"
    make_char_device(full, 1, 7)  # what /dev/full is: every write fails with ENOSPC
    with pytest.raises(OutputError) as caught, open_output(full) as stream:
        write_lines(["a line"], stream)
    assert str(caught.value) == f"{full}: cannot write (No space left on device)"


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(OutputError, match="sock: is a socket, not an output file"):
            check_output(path)
    finally:
        server.close()


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink", "hardlink"])
def test_an_output_that_is_an_input_is_refused_however_spelled(spelling, tmp_path):
    data = tmp_path / "in.txt"
    data.write_bytes(b"input\n")
    output = {"same": data, "dot": tmp_path / "." / "in.txt",
              "symlink": tmp_path / "link.txt", "hardlink": tmp_path / "hard.txt"}[spelling]
    if spelling == "symlink":
        output.symlink_to(data)
    elif spelling == "hardlink":
        os.link(data, output)
    with pytest.raises(OutputError, match="is the same file as the input .*in.txt"):
        check_distinct([output], [data])
    check_distinct([tmp_path / "other.txt"], [data])  # a different (new) file is fine
    check_distinct(["-", None], ["-", None])  # stdin and stdout are not files here


def test_two_outputs_that_are_one_file_are_refused_even_before_it_exists(tmp_path):
    (tmp_path / "link.txt").symlink_to(tmp_path / "new.txt")  # dangling: writes go to new.txt
    for a, b in [("new.txt", "./new.txt"), ("new.txt", "link.txt"), ("sub/../new.txt",
                                                                       "new.txt")]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match=f"{b}: is the same file as the output .*{a}"):
            check_distinct([tmp_path / a, tmp_path / b], [])
    check_distinct([tmp_path / "new.txt", tmp_path / "other.txt", "-", None, "/dev/null",
                    "/dev/null"], [])  # distinct files; stdout and devices are not compared


def test_a_descriptor_is_written_where_it_points_never_replaced(tmp_path):
    """/dev/stdout and its kin with stdout on a pipe (whose link target, pipe:[N], is no path)
    or on a file opened to append (as `>>` opens it)."""
    read, write = os.pipe()
    with open_output(f"/dev/fd/{write}") as out:
        out.write(b"through a pipe\n")
    os.close(write)
    assert os.read(read, 100) == b"through a pipe\n"
    os.close(read)
    log = tmp_path / "log.txt"
    log.write_bytes(b"previous\n")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    (tmp_path / "link").symlink_to(f"/proc/self/fd/{fd}")
    for name in (f"/proc/self/fd/{fd}", tmp_path / "link"):
        check_output(name)
        with open_output(name) as out:
            out.write(b"more\n")
    os.close(fd)
    assert log.read_bytes() == b"previous\nmore\nmore\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "log.txt"]  # no .tmp


def _in_child(code: str, **streams) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with the given stdin/stdout (open files)."""
    return subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, timeout=120,
                          **streams)


def test_stdout_on_an_input_file_is_refused(tmp_path):
    """`translate --input a >> a` (or `< a >> a`) read its own output and grew a without end."""
    data = tmp_path / "in.txt"
    data.write_bytes(b"input\n")
    code = ("import sys\nfrom seq2seq.paths import check_distinct, OutputError\n"
            "try:\n    check_distinct(['-'], sys.argv[1:] or ['-'])\n"
            "except OutputError as error:\n    sys.exit(str(error))\n")
    with open(data, "ab") as out:
        named = _in_child(code.replace("sys.argv[1:]", repr([str(data)])), stdout=out)
    with open(data, "rb") as inp, open(data, "ab") as out:
        piped = _in_child(code, stdin=inp, stdout=out)
    with open(tmp_path / "other.txt", "ab") as out, open(data, "rb") as inp:
        apart = _in_child(code, stdin=inp, stdout=out)
    assert named.stderr.decode() == f"<stdout>: is the same file as the input {data}; " \
        "writing it would destroy the input\n"
    assert piped.stderr.decode().startswith("<stdout>: is the same file as the input <stdin>")
    assert apart.returncode == 0, apart.stderr.decode()
    assert data.read_bytes() == b"input\n"


def test_a_write_error_names_the_path_and_leaves_nothing(tmp_path):
    """A full disk said only "No space left on device": closing the temporary file flushed
    its buffer again, and that error, naming no file, replaced the one naming the path."""
    code = ("import resource, signal, sys\nfrom seq2seq.files import open_output\n"
            "from seq2seq.paths import OutputError\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n    with open_output(sys.argv[1]) as out:\n"
            "        for _ in range(1000):\n            out.write(b'x' * 1000)\n"
            "except OutputError as error:\n    sys.exit(str(error))\n")
    path = tmp_path / "out.txt"
    path.write_bytes(b"old\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE,
                            timeout=120)
    assert result.stderr.decode() == f"{path}: cannot write (File too large)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert path.read_bytes() == b"old\n"


def test_a_name_as_long_as_the_filesystem_allows_is_written_and_a_longer_refused(tmp_path):
    """The temporary name (.NAME.XXXXXXXX.tmp) made names of 242-255 bytes fail at the end."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = tmp_path / ("é" * ((limit - 4) // 2) + "y" * ((limit - 4) % 2) + ".txt")
    assert len(os.fsencode(longest.name)) == limit
    write_bytes(longest, b"new\n")
    assert longest.read_bytes() == b"new\n"
    write_bytes(longest, b"again\n")  # replacing it too
    assert longest.read_bytes() == b"again\n"
    too_long = tmp_path / ("y" * (limit + 1))
    with pytest.raises(OutputError, match=f"file name too long \\({limit + 1} bytes; at most"):
        check_output(too_long)
    with pytest.raises(OutputError, match="file name too long"):
        check_output(tmp_path / "new-dir" / too_long.name, missing_dir_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [longest.name]


@pytest.mark.skipif(os.getuid() != 0, reason="only root may give a file to another user")
def test_a_replaced_file_keeps_its_owner(tmp_path):
    """Replacing a file of another user (as root) gave it to root, where `>` keeps it."""
    path = tmp_path / "owned.txt"
    path.write_bytes(b"old\n")
    os.chown(path, 65534, 65534)
    write_bytes(path, b"new\n")
    info = path.stat()
    assert (info.st_uid, info.st_gid, path.read_bytes()) == (65534, 65534, b"new\n")


def test_an_output_path_ending_in_a_slash_is_refused(tmp_path):
    """`translate --output out/` wrote a file named out; `average --output x/` one named x."""
    for path in (tmp_path / "new", tmp_path / "new" / "sub"):
        with pytest.raises(OutputError, match="names a directory .ends in /., not an output"):
            check_output(f"{path}/")
    assert list(tmp_path.iterdir()) == []

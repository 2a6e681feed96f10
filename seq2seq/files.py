"""Output files: whatever a path names, an output never destroys it, and a failed write leaves
nothing behind.

Every command writes its outputs (translations, attention, reports, checkpoints, generated
data) through :func:`open_output` or :func:`write_bytes`. What happens depends on the path:

- **A regular file, or a new name in an existing directory**: the output goes to a temporary
  file beside it, is fsynced, then renamed over it, so a crash (even SIGKILL) leaves the old
  file or the new one, never a torn one. A symlink is followed first: the link stays and its
  target gets the output. An existing file keeps its permission bits; a new one gets the mode
  ``open()`` would give it (``0o666`` less the umask), not mkstemp's owner-only ``0o600``, so
  other users of a shared filesystem can read it. A file with other hard links is rewritten in
  place once the output is complete, so that every name sees it (a rename would leave the other
  names on the old content). A read-only file is an error, not replaced.
- **Anything else that exists** (a character device, a FIFO), and **an open descriptor**
  (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``, whatever it is open on: a pipe, a
  terminal or a file, appended to as the shell opened it): written directly, streaming.
- **A directory, a socket, a path in a missing directory**: an error before any work.

:func:`check_output` makes those checks before a command does any work, and
:func:`check_distinct` refuses an output that is one of the command's inputs (same device and
inode, however the path is spelled). A write error (a full disk, a closed pipe) is one
:class:`OutputError` line naming the path, and the temporary file is removed whatever stopped the
command: an exception, SIGINT, or SIGTERM (which the CLI turns into an exception).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from seq2seq.errors import Seq2SeqError
from seq2seq.signals import signals_held


class OutputError(Seq2SeqError):
    """An output path that cannot be written, or a write that failed.

    ``strerror`` is the operating system's reason when a write failed (else None).
    """

    def __init__(self, message: str, strerror: str | None = None):
        super().__init__(message)
        self.strerror = strerror


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask."""
    umask = os.umask(0)  # the umask can only be read by setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def is_stdout(path: str | Path | None) -> bool:
    return path is None or str(path) == "-"


def check_output(path: str | Path | None) -> None:
    """Refuse, before any work, an output path that cannot be written as this module writes.

    ``None`` and ``"-"`` (stdout) pass where this process has a stdout.

    Raises:
        OutputError: one line naming the path and the reason.
    """
    if is_stdout(path):
        if sys.stdout is None:  # started with descriptor 1 closed (`>&-`)
            raise OutputError("<stdout>: is closed; name an output file")
        return
    path = Path(path)
    if is_descriptor(path):
        try:
            info = os.stat(path)
        except OSError as error:
            raise OutputError(f"{path}: cannot use as output ({error.strerror or error})") \
                from None
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{path}: is a directory, not an output file")
        return
    real = Path(os.path.realpath(path))  # a symlink's target is what gets written
    try:
        info = real.stat()
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise OutputError(f"{path}: cannot use as output ({error.strerror or error})") from None
    if info is None:
        parent = real.parent
        if not parent.exists():
            raise OutputError(f"{path}: directory {parent} does not exist")
        if not parent.is_dir():
            raise OutputError(f"{path}: {parent} is not a directory")
        _check_writable_dir(path, parent)
    elif stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{path}: is a directory, not an output file")
    elif stat.S_ISSOCK(info.st_mode):
        raise OutputError(f"{path}: is a socket, not an output file")
    elif stat.S_ISREG(info.st_mode):
        # root passes os.access whatever the mode: a file nobody may write is read-only too.
        if not os.access(real, os.W_OK) or not info.st_mode & 0o222:
            raise OutputError(f"{path}: is read-only; not replaced (make it writable or choose "
                              "another output)")
        if info.st_nlink == 1:
            _check_writable_dir(path, real.parent)


def is_descriptor(path: str | Path) -> bool:
    """Whether ``path`` names one of a process's open descriptors (``/dev/stdout``,
    ``/dev/fd/1``, ``/proc/self/fd/1``, through any symlinks): written where the descriptor
    points, never replaced. Its link's target is no path to write beside (``pipe:[1234]``)."""
    return _descriptor_name(path) is not None


def _descriptor_name(path: str | Path) -> str | None:
    name = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on symlinks followed
        if re.fullmatch(r"/proc/(self|thread-self|\d+)/fd/\d+|/dev/fd/\d+", name):
            return name
        if not os.path.islink(name):
            return None
        name = os.path.normpath(os.path.join(os.path.dirname(name), os.readlink(name)))
    return None


def _open_descriptor(path: Path) -> BinaryIO:
    """A stream on a copy of this process's descriptor that ``path`` names, writing at its
    offset as the shell opened it (``>`` or ``>>``); another process's is opened to append."""
    name = _descriptor_name(path) or str(path)
    own = re.fullmatch(rf"/proc/(self|thread-self|{os.getpid()})/fd/(\d+)|/dev/fd/(\d+)", name)
    if own:
        return os.fdopen(os.dup(int(own.group(2) or own.group(3))), "wb")
    return open(path, "ab")  # noqa: SIM115 (closed by the caller)


def _check_writable_dir(path: Path, directory: Path) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {directory} is not writable")


def check_distinct(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None],
                   ) -> None:
    """Refuse an output that is the same file or directory as one of the inputs, or as
    another output.

    Files are compared by device and inode, so any spelling of a path (``./a``, a symlink, a
    hard link) is caught; outputs that do not exist yet by their real path. Devices and FIFOs
    are not compared: ``--input /dev/stdin --output /dev/stdout`` on one terminal is fine. An
    input's ``<input>.sha256`` (a checkpoint's checksum file) counts as an input.
    """
    seen = {}
    inputs = [*inputs]
    for name in [*inputs, *(f"{name}.sha256" for name in inputs if name is not None)]:
        key = _identity(name)
        if key is not None:
            seen[key] = name
    for name in outputs:
        key = _identity(name)
        if key is not None and key in seen:
            raise OutputError(f"{name}: is the same file as the input {seen[key]}; writing it "
                              "would destroy the input")
    written: dict[Any, str | Path] = {}
    for name in outputs:
        key = _identity(name) or _new_file(name)
        if key is None:
            continue
        if key in written:
            raise OutputError(f"{name}: is the same file as the output {written[key]}; one "
                              "would overwrite the other")
        written[key] = name


def _new_file(path: str | Path | None) -> str | None:
    """Where an output that is no existing file or directory would be written (its real path,
    through symlinks); None for stdout and for devices, FIFOs and the like."""
    if is_stdout(path) or os.path.exists(path):
        return None
    return os.path.realpath(path)


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether ``a`` and ``b`` name one existing regular file or directory."""
    return _identity(a) is not None and _identity(a) == _identity(b)


def writes_to_stdout(path: str | None) -> bool:
    """Whether output ``path`` ends up on this process's stdout: none, ``-``, or a name of
    the same open file (``/dev/stdout``, ``/dev/fd/1``)."""
    if path is None or path == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such path; stdout closed or replaced
        return False


def first_repeat(paths: Iterable[str | Path]) -> tuple[str | Path, str | Path] | None:
    """The first file of ``paths`` named again, as ``(earlier name, later name)``, compared
    as :func:`check_distinct` compares (any spelling of a path); None when all differ."""
    seen: dict[Any, str | Path] = {}
    for name in paths:
        key = _identity(name)
        if key is not None and key in seen:
            return seen[key], name
        if key is not None:
            seen[key] = name
    return None


def _identity(path: str | Path | None) -> tuple[int, int] | None:
    if is_stdout(path):
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def open_output(path: str | Path | None) -> Iterator[BinaryIO]:
    """A binary stream for ``path``: stdout for ``None`` or ``"-"``, else as the module says.

    The output is complete only when the ``with`` block ends without an exception; otherwise a
    file is left as it was.
    """
    if is_stdout(path):
        check_output(path)
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    check_output(path)
    path = Path(path)
    if is_descriptor(path):
        with _direct(path, path, _open_descriptor) as stream:
            yield stream
        return
    real = Path(os.path.realpath(path))
    info = real.stat() if real.exists() else None
    if info is not None and not stat.S_ISREG(info.st_mode):
        with _direct(path, real) as stream:
            yield stream
        return
    with _replacing(path, real, info) as stream:
        yield stream


Output = Callable[[Path], BinaryIO]


@contextlib.contextmanager
def output_set() -> Iterator[Output]:
    """Several outputs written as one: ``output(path)`` is a stream as :func:`open_output`
    gives, and the files are put in place only when the block ends without an error, all of
    them with the stop signals held back (one that comes meanwhile is raised after). So an
    error or a signal leaves every file as it was or all of them new, never a mix."""
    with contextlib.ExitStack() as stack:
        yield lambda path: stack.enter_context(open_output(path))
        with signals_held():
            stack.close()


@contextlib.contextmanager
def _direct(path: Path, real: Path, opener: Any = None) -> Iterator[BinaryIO]:
    """Write a device or FIFO directly (a FIFO's open waits for a reader), or a descriptor
    (``opener``: :func:`_open_descriptor`)."""
    try:
        raw = opener(real) if opener else open(real, "wb")  # noqa: SIM115 (closed below)
    except OSError as error:
        raise OutputError(f"{path}: cannot open for writing ({error.strerror or error})") from None
    stream = _Checked(raw, path)
    try:
        yield stream
        stream.flush()
    finally:
        with contextlib.suppress(OSError):
            raw.close()


@contextlib.contextmanager
def _replacing(path: Path, real: Path, info: os.stat_result | None) -> Iterator[BinaryIO]:
    """Write a temporary file beside ``real``, then rename it over (or copy it into) ``real``
    (signals held back until the file is in the ``try`` that removes it: :func:`signals_held`).
    """
    with signals_held() as release:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp",
                                            dir=real.parent)
        except OSError as error:
            raise write_error(path, error) from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as raw:
                release()
                stream = _Checked(raw, path)
                yield stream
                stream.flush()
                _sync(raw, path)
            if info is not None and info.st_nlink > 1:
                _copy_into(tmp, real, path)  # every hard link sees the new content
                tmp.unlink()
            else:
                mode = stat.S_IMODE(info.st_mode) if info is not None else new_file_mode()
                os.chmod(tmp, mode)  # mkstemp's 0600 would hide a new file from other users
                os.replace(tmp, real)
                fsync_dir(real.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_error(path: Path, error: OSError) -> OutputError:
    reason = error.strerror or str(error)
    return OutputError(f"{path}: cannot write ({reason})", reason)


def _sync(raw: BinaryIO, path: Path) -> None:
    try:
        os.fsync(raw.fileno())
    except OSError as error:
        raise write_error(path, error) from None


def _copy_into(tmp: Path, real: Path, path: Path) -> None:
    try:
        shutil.copyfile(tmp, real)  # opens real for writing: same inode, same links and mode
    except OSError as error:
        raise write_error(path, error) from None


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as :func:`open_output` does (atomically for a file)."""
    with open_output(path) as stream:
        stream.write(data)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (where the filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process left in ``directory``.

    Only call this where no other process is writing into ``directory``.
    """
    stale = [p for p in Path(directory).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class _Checked(io.BufferedIOBase):
    """A binary stream whose write errors are one :class:`OutputError` line naming the path."""

    def __init__(self, raw: BinaryIO, path: Path):
        super().__init__()
        self.raw_stream, self.path = raw, path

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        try:
            self.raw_stream.write(data)  # a buffered stream writes all of it, or raises
            return len(data)
        except OSError as error:
            raise self._error(error) from None

    def flush(self) -> None:
        if self.raw_stream.closed:  # a text wrapper flushing after the output was finished
            return
        try:
            self.raw_stream.flush()
        except OSError as error:
            raise self._error(error) from None

    def _error(self, error: OSError) -> OutputError:
        return write_error(self.path, error)

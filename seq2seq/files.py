"""Output files: whatever a path names, an output never destroys it, and a failed write leaves
nothing behind.

Every command writes its outputs (translations, attention, reports, checkpoints, generated
data) through :func:`open_output` or :func:`write_bytes`. What happens depends on the path:

- **A regular file, or a new name in an existing directory**: the output goes to a temporary
  file beside it, is fsynced, then renamed over it, so a crash (even SIGKILL) leaves the old
  file or the new one, never a torn one. A symlink is followed first: the link stays and its
  target gets the output. An existing file keeps its permission bits (and owner, where
  this process may give it); a new one gets the mode
  ``open()`` would give it (``0o666`` less the umask), not mkstemp's owner-only ``0o600``, so
  other users of a shared filesystem can read it. A file with other hard links is rewritten in
  place once the output is complete, so that every name sees it (a rename would leave the other
  names on the old content). A read-only file is an error, not replaced.
- **Anything else that exists** (a character device, a FIFO), and **an open descriptor**
  (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``, whatever it is open on: a pipe, a
  terminal or a file, appended to as the shell opened it): written directly, streaming.
- **A directory, a socket, a path in a missing directory**: an error before any work.

:func:`seq2seq.paths.check_output` makes those checks before a command does any work, and
:func:`seq2seq.paths.check_distinct` refuses an output that is one of the command's inputs. A
write error (a full disk, a closed pipe) is one
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from seq2seq.locks import directory_held
from seq2seq.paths import OutputError, check_output, descriptor_name, is_descriptor, is_stdout
from seq2seq.signals import signals_held


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask."""
    umask = os.umask(0)  # the umask can only be read by setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _open_descriptor(path: Path) -> BinaryIO:
    """A stream on a copy of this process's descriptor that ``path`` names, writing at its
    offset as the shell opened it (``>`` or ``>>``); another process's is opened to append."""
    name = descriptor_name(path) or str(path)
    own = re.fullmatch(rf"/proc/(self|thread-self|{os.getpid()})/fd/(\d+)|/dev/fd/(\d+)", name)
    if own:
        return os.fdopen(os.dup(int(own.group(2) or own.group(3))), "wb")
    return open(path, "ab")  # noqa: SIM115 (closed by the caller)


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
        # The temporary name stays within NAME_MAX for any name that is within it.
        prefix = "." + os.fsdecode(os.fsencode(real.name)[:200]) + "."
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=real.parent)
        except OSError as error:
            raise write_error(path, error) from None
        tmp = Path(tmp_name)
        raw = os.fdopen(fd, "wb")
        try:
            release()
            stream = _Checked(raw, path)
            yield stream
            stream.flush()
            _sync(raw, path)
            raw.close()
            if info is not None and info.st_nlink > 1:
                _copy_into(tmp, real, path)  # every hard link sees the new content
                tmp.unlink()
            else:
                _keep_mode_and_owner(tmp, info)
                os.replace(tmp, real)
                fsync_dir(real.parent)
        except BaseException:
            with contextlib.suppress(OSError):  # (a full disk fails the close's flush again)
                raw.close()
            tmp.unlink(missing_ok=True)
            raise


def _keep_mode_and_owner(tmp: Path, info: os.stat_result | None) -> None:
    """Give the temporary file the mode and owner of the file it replaces, or the mode
    ``open()`` would give a new one (mkstemp's 0600 would hide it from other users)."""
    if info is not None and (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
        with contextlib.suppress(OSError):  # (only root may give a file away)
            os.chown(tmp, info.st_uid, info.st_gid)
    os.chmod(tmp, stat.S_IMODE(info.st_mode) if info is not None else new_file_mode())


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


def remove_partial_writes(directory: Path, ours: Callable[[str], bool]) -> list[Path]:
    """Delete the temporary files that a killed process left in ``directory`` while writing a
    file whose name ``ours`` accepts: only files no other process writes there, such as a
    run's own (another command's output there, in progress, is left alone). The directory is
    held meanwhile (:func:`seq2seq.locks.directory_held`), as checkpoint saves hold it."""
    with directory_held(Path(directory)):
        stale = [path for path in Path(directory).glob(".*.tmp") if path.is_file()
                 and ours(path.name[1:].removesuffix(".tmp").rpartition(".")[0])]
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

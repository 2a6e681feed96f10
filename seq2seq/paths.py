"""What a path names, checked before a command does any work.

:func:`check_output` refuses an output path that cannot be written as :mod:`seq2seq.files`
writes (a directory, a socket, a path in a missing directory, a read-only file, a name too long
for its directory), and :func:`check_distinct` an output that is one of the command's inputs or
another output (same device and inode, however the path is spelled; stdin and stdout by the
files they are open on).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from seq2seq.errors import Seq2SeqError


class OutputError(Seq2SeqError):
    """An output path that cannot be written, or a write that failed.

    ``strerror`` is the operating system's reason when a write failed (else None).
    """

    def __init__(self, message: str, strerror: str | None = None):
        super().__init__(message)
        self.strerror = strerror


def is_stdout(path: str | Path | None) -> bool:
    return path is None or str(path) == "-"


def check_output(path: str | Path | None, missing_dir_ok: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written as
    :mod:`seq2seq.files` writes. ``None`` and ``"-"`` (stdout) pass where this process has a
    stdout; ``missing_dir_ok``: a path in a directory the command will create passes too.

    Raises:
        OutputError: one line naming the path and the reason.
    """
    if is_stdout(path):
        if sys.stdout is None:  # started with descriptor 1 closed (`>&-`)
            raise OutputError("<stdout>: is closed; name an output file")
        return
    if str(path).endswith(os.sep):  # (Path() would drop the slash and write a file)
        raise OutputError(f"{path}: names a directory (ends in {os.sep}), not an output file")
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
    _check_name_length(path, real)
    try:
        info = real.stat()
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise OutputError(f"{path}: cannot use as output ({error.strerror or error})") from None
    if info is None:
        parent = real.parent
        if missing_dir_ok and not parent.exists():
            return
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


def _check_name_length(path: Path, real: Path) -> None:
    """Refuse a new file's name longer than its filesystem allows (so that the command
    does not fail at its end)."""
    directory = real.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(real.name)) > limit:
        raise OutputError(f"{path}: file name too long ({len(os.fsencode(real.name))} bytes; "
                          f"at most {limit} there)")


def is_descriptor(path: str | Path) -> bool:
    """Whether ``path`` names one of a process's open descriptors (``/dev/stdout``,
    ``/dev/fd/1``, ``/proc/self/fd/1``, through any symlinks): written where the descriptor
    points, never replaced. Its link's target is no path to write beside (``pipe:[1234]``)."""
    return descriptor_name(path) is not None


def descriptor_name(path: str | Path) -> str | None:
    name = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on symlinks followed
        if re.fullmatch(r"/proc/(self|thread-self|\d+)/fd/\d+|/dev/fd/\d+", name):
            return name
        if not os.path.islink(name):
            return None
        name = os.path.normpath(os.path.join(os.path.dirname(name), os.readlink(name)))
    return None


def _check_writable_dir(path: Path, directory: Path) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {directory} is not writable")


def check_distinct(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None],
                   ) -> None:
    """Refuse an output that is the same file or directory as one of the inputs, or as
    another output.

    Files are compared by device and inode, so any spelling of a path (``./a``, a symlink, a
    hard link) is caught; outputs that do not exist yet by their real path. ``-`` is stdin
    among the inputs and stdout among the outputs, compared by the file the shell opened on it
    (``translate < a >> a``, ``translate --input a >> a``). Devices, FIFOs and terminals are
    not compared: ``--input /dev/stdin --output /dev/stdout`` on one terminal is fine. An
    input's ``<input>.sha256`` (a checkpoint's checksum file) counts as an input. None (an
    output or input not given) is left out.
    """
    inputs = [name for name in inputs if name is not None]
    outputs = [name for name in outputs if name is not None]
    seen = {}
    for name in [*inputs, *(f"{name}.sha256" for name in inputs if name != "-")]:
        key = _identity(name, sys.stdin)
        if key is not None:
            seen[key] = "<stdin>" if name == "-" else name
    for name in outputs:
        key = _identity(name, sys.stdout)
        if key is not None and key in seen:
            raise OutputError(f"{_said(name)}: is the same file as the input {seen[key]}; "
                              "writing it would destroy the input")
    written: dict[Any, str | Path] = {}
    for name in outputs:
        key = _identity(name, sys.stdout) or _new_file(name)
        if key is None:
            continue
        if key in written:
            raise OutputError(f"{_said(name)}: is the same file as the output "
                              f"{_said(written[key])}; one would overwrite the other")
        written[key] = name


def _said(output: str | Path) -> str | Path:
    return "<stdout>" if output == "-" else output


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


def _identity(path: str | Path | None, stream: Any = None) -> tuple[int, int] | None:
    """The device and inode of the regular file or directory ``path`` names; for ``-``, of
    the regular file ``stream`` (stdin or stdout) is open on, if given; else None."""
    if is_stdout(path):
        try:
            info = os.fstat(stream.fileno()) if path == "-" and stream is not None else None
        except (OSError, ValueError, AttributeError):  # closed, or not a file's stream
            info = None
        return (info.st_dev, info.st_ino) if info and stat.S_ISREG(info.st_mode) else None
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        return None
    return info.st_dev, info.st_ino

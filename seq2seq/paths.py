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

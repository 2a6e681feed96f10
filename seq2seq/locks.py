"""A lock on a directory while several files in it are replaced together.

:func:`directory_held` takes an exclusive ``flock`` on the directory itself, so no lock file is
left behind: two processes that write the same set of files (a checkpoint and its checksum
file, an evaluation report) one after the other each leave their whole set, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def directory_held(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` while the block runs; none where the directory
    cannot be opened (the writes that follow say what is wrong with it) or the file system
    has no such locks."""
    try:
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        handle = None
    try:
        if handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            os.close(handle)  # (releases the lock)

"""Locks: on a directory while several files in it are replaced together, and kept from
forked children.

:func:`directory_held` takes an exclusive ``flock`` on the directory itself, so no lock file is
left behind: two processes that write the same set of files (a checkpoint and its checksum
file, an evaluation report) one after the other each leave their whole set, never a mix.
:func:`own` keeps a held lock file this process's own: a ``flock`` belongs to the open file,
which a forked child (a worker of the corpus encoding's process pool) shares, so a child that
outlived a killed parent held the run's lock for good. :func:`held_for_children` and
:func:`held_by_parent` let ``seq2seq train`` hold a run's lock for the torchrun workers it
starts, and :func:`take_when_free` has their main rank take it over if the launcher dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# Lock files this process holds, closed in its forked children. Weak: a lock file dropped
# unclosed (a Trainer let go without close()) is still closed, and its lock released, by GC.
_OWN: weakref.WeakSet[IO] = weakref.WeakSet()


def own(handle: IO) -> IO:
    """``handle`` (a file this process holds a ``flock`` on), closed in every child forked
    from now on, so that only this process holds the lock."""
    _OWN.add(handle)
    return handle


def _close_in_child() -> None:
    for handle in list(_OWN):
        with contextlib.suppress(OSError):
            handle.close()  # (the parent's copy keeps the lock)
    _OWN.clear()


os.register_at_fork(after_in_child=_close_in_child)

# Set by a process that holds a run's lock for the processes it starts: "<its pid>:<the path>".
HELD_FOR_CHILDREN = "SEQ2SEQ_LOCK_HELD"


@contextlib.contextmanager
def held_for_children(path: Path) -> Iterator[None]:
    """Tell the processes started in the block (``seq2seq train``'s torchrun workers) that this
    process holds the lock of ``path`` for them (:func:`held_by_parent`)."""
    os.environ[HELD_FOR_CHILDREN] = f"{os.getpid()}:{path.resolve()}"
    try:
        yield
    finally:
        os.environ.pop(HELD_FOR_CHILDREN, None)


def take_when_free(path: Path) -> None:
    """Take an exclusive ``flock`` on ``path`` as soon as its holder lets go, in a thread of its
    own, and keep it while this process lives: a torchrun worker whose launcher holds the run's
    lock for it (:func:`held_by_parent`) keeps the run held if the launcher dies first
    (``kill -9``), as workers train on."""
    handle = own(open(path, "a"))  # noqa: SIM115 (held while this process lives)
    _KEPT.append(handle)

    def wait() -> None:
        with contextlib.suppress(OSError):  # (a filesystem without locks: the launcher's said)
            fcntl.flock(handle, fcntl.LOCK_EX)

    threading.Thread(target=wait, name="run lock", daemon=True).start()


_KEPT: list[IO] = []  # the lock files of take_when_free (own() holds them weakly)


def held_by_parent(path: Path) -> bool:
    """Whether this process's parent holds the lock of ``path`` for it
    (:func:`held_for_children`)."""
    pid, _, held = os.environ.get(HELD_FOR_CHILDREN, "").partition(":")
    return pid == str(os.getppid()) and held == str(path.resolve())


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

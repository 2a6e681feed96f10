"""The signals every command stops on, and holding them back for an instant.

The CLI turns SIGTERM and SIGHUP into an exception and SIGINT is Python's KeyboardInterrupt, so
``finally`` blocks remove temporary files whatever stopped a command; ``train`` stops after
the current update and saves. :func:`signals_held` closes the one gap left: between making a
temporary file or directory and entering the ``try`` that removes it. :func:`children_tied`
leaves the stop signals to this process in the children it forks for a pool (the corpus
encoding's), and has them die with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

# The signals every command stops on, cleaning up: Ctrl-C, `kill`, and the hang-up of a
# closed terminal or a dropped SSH session (the CLI turns SIGTERM and SIGHUP into exceptions).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


@contextlib.contextmanager
def signals_held() -> Iterator[Callable[[], None]]:
    """The stop signals (:data:`STOP_SIGNALS`) held back from this thread until the function
    it gives is called, or the block ends: for the instant between making a temporary file or
    directory and entering the ``try`` that removes it, where a Ctrl-C would leave it behind.
    A signal that came meanwhile is delivered at the release, its handler's exception raised
    there::

        with signals_held() as release:
            work = tempfile.mkdtemp(...)
            try:
                release()
                ...
            finally:
                shutil.rmtree(work)
    """
    held = [block_stop_signals() if hasattr(signal, "pthread_sigmask") else None]  # (POSIX)

    def release() -> None:
        # Once only: the block's end, after an early release, must not set the mask of its
        # start again, which would undo a later hold still in force (output_set's, which
        # holds the signals while the outputs made earlier are put in place).
        mask, held[0] = held[0], None
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    try:
        yield release
    finally:
        release()


def block_stop_signals() -> set:
    """Block the stop signals in this thread; returns the mask before. CPython runs the
    handlers of signals pending as ``pthread_sigmask`` returns: one that raises there leaves
    nothing blocked (a mask changed with no caller to restore it would keep them out of this
    thread for good)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # (a raise here: nothing changed)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        raise
    return before


@contextlib.contextmanager
def stops_kept() -> Iterator[None]:
    """Raise a stop signal's exception at the end of the block, whatever the block made of
    it: for a library that can lose it (one raised in a fork hook while ``datasets`` forks
    its workers is discarded) or replace it (its pool's clean-up raises a TimeoutError;
    SentencePiece reports it as a failed training). A no-op outside the main thread."""
    seen: list[int] = []

    def keeping(handlers: dict[int, Any]) -> Callable[[int, object], None]:
        def keep(signum: int, frame: object) -> None:
            seen.append(signum)
            handlers[signum](signum, frame)
        return keep

    with _handlers_replaced(keeping) as handlers:
        try:
            yield
        except BaseException:
            if not seen:
                raise
    if seen:  # the block's error (or none) was the signal's doing: raise the signal's own
        handlers[seen[-1]](seen[-1], None)


@contextlib.contextmanager
def _handlers_replaced(make: Callable[[dict[int, Any]], Callable[[int, object], None]]
                       ) -> Iterator[dict[int, Any]]:
    """The stop signals' Python handlers replaced, for the block, by ``make(previous)``, a
    handler given the previous ones (in the main thread; elsewhere, where no handler runs,
    none is replaced); yields the previous handlers."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    handler, replaced = make(previous), []
    with contextlib.suppress(ValueError):  # (not the main thread)
        for sig in (sig for sig, old in previous.items() if callable(old)):
            signal.signal(sig, handler)
            replaced.append(sig)
    try:
        yield previous
    finally:
        for sig in replaced:
            signal.signal(sig, previous[sig])


# While a children_tied() block runs: this process's pid, libc's prctl on Linux (looked up
# before the fork: a forked child of a threaded process should not load libraries), and the
# thread that entered the block.
_TYING: list[tuple[int, Callable | None, int]] = []
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_IN_MAIN_HOOK = [False]  # whether the main thread is inside the fork's hooks (in the parent)
_HOOKED = [False]  # whether the fork hooks are registered (at the first block: see below)


@contextlib.contextmanager
def children_tied() -> Iterator[None]:
    """Tie the children forked during the block (a process pool's workers) to this process.

    They ignore SIGINT and SIGHUP, and a SIGTERM that this process did not send: a Ctrl-C,
    a closed terminal or a ``kill`` of the process group (systemd, Slurm) reaches every
    process of the group, and a worker that died of it printed a traceback, or left a lock of
    the pool held, so that this process hung in the pool's clean-up. This process gets the
    signal too, and stops the pool: its SIGTERMs (``Pool.terminate``) stop the workers. They
    also end when this process dies (``kill -9``), where they lived on idle: at once on Linux
    for the children of the thread in the block, within a second for the others. Children
    forked outside the block (DataLoader workers, torchrun's, ``serve``'s) are left alone;
    the block is process-wide, so a fork by another thread meanwhile is tied too.

    A stop signal whose handler would run inside the fork's hooks (the main thread forking),
    where CPython drops the handler's exception, is sent again to this process an instant
    later, once the fork's caller runs, or at the end of the block if that comes first.
    """
    if not _HOOKED[0] and hasattr(os, "register_at_fork"):
        # Registered at the first block, after the libraries' own (logging's, filelock's), so
        # that ours run first before a fork and last after it: the window spans all of them.
        os.register_at_fork(before=_block_for_fork, after_in_parent=_unblock_after_fork,
                            after_in_child=_tie_child)
        _HOOKED[0] = True
    prctl = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
    later: list[int] = []  # stop signals deferred and not yet sent again
    lock = threading.Lock()

    def send_again(signum: int) -> None:
        with lock:
            if signum not in later:  # (the block's end took it)
                return
            later.remove(signum)
        os.kill(os.getpid(), signum)

    def deferring(handlers: dict[int, Any]) -> Callable[[int, object], None]:
        def outside_hooks(signum: int, frame: object) -> None:
            if _IN_MAIN_HOOK[0]:
                with lock:
                    later.append(signum)
                timer = threading.Timer(0.01, send_again, (signum,))
                timer.daemon = True
                timer.start()
            else:
                handlers[signum](signum, frame)
        return outside_hooks

    try:
        with _handlers_replaced(deferring) as handlers:
            _TYING.append((os.getpid(), prctl, threading.get_ident()))
            try:
                yield
            finally:
                _TYING.pop()
    finally:
        with lock:
            taken, later[:] = list(later), []
        if taken:  # a stop deferred as the block ends: its handler runs here
            handlers[taken[0]](taken[0], None)


class _Masks(threading.local):
    """Each forking thread's signal masks before a tied fork, put back after it."""

    def __init__(self) -> None:
        self.stack: list[set] = []


_MASKS = _Masks()


def _block_for_fork() -> None:
    """Before a tied fork, hold the stop signals back: one that reached the child before it
    dropped this process's handlers ran them there (a traceback in the child). The parent
    takes any held back as soon as the fork is done. From here to the end of
    :func:`_unblock_after_fork` (the first and the last of the fork's hooks in the parent) a
    handler in the main thread is deferred (:func:`children_tied`)."""
    if _TYING and hasattr(signal, "pthread_sigmask"):
        main = threading.current_thread() is threading.main_thread()
        if main:
            _IN_MAIN_HOOK[0] = True
        try:
            _MASKS.stack.append(block_stop_signals())
        except BaseException:  # (no after-fork hook will clear it)
            if main:
                _IN_MAIN_HOOK[0] = False
            raise


def _unblock_after_fork() -> None:
    try:
        if _MASKS.stack:
            signal.pthread_sigmask(signal.SIG_SETMASK, _MASKS.stack.pop())
    finally:
        if threading.current_thread() is threading.main_thread():
            _IN_MAIN_HOOK[0] = False


def _tie_child() -> None:
    if not _TYING:
        return
    parent, prctl, tying_thread = _TYING[-1]
    _TYING.clear()  # (not the children this child forks)
    _IN_MAIN_HOOK[0] = False
    mask = _MASKS.stack.pop() if _MASKS.stack else None  # (held back until then)
    # Killed when the parent's thread that forked this child ends: so only a child of the
    # thread in the block (a pool's worker-handler thread, which replaces a dead worker,
    # ends at the pool's terminate() while its idle replacement holds the pool's queue lock:
    # killed then, it hung the clean-up). Every tied child also polls its parent (_obey).
    if prctl is not None and threading.get_ident() == tying_thread \
            and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 \
            and os.getppid() != parent:
        os._exit(1)  # the parent died before the prctl: no signal will come
    with contextlib.suppress(ValueError):  # (never seen: the forking thread is the main one)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.SIG_IGN)
    if hasattr(signal, "sigtimedwait"):  # (not on macOS: there any SIGTERM stops the child)
        signal.pthread_sigmask(signal.SIG_SETMASK, (mask or set()) | {signal.SIGTERM})
        threading.Thread(target=_obey, args=(parent,), name="sigterm", daemon=True).start()
    elif mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _obey(parent: int) -> None:
    """Wait for the SIGTERMs (blocked in every thread); exit on one from ``parent``, or when
    ``parent`` is gone (this child then belongs to another process)."""
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if info is not None and info.si_pid == parent:
            os._exit(128 + signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

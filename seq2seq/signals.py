"""The signals every command stops on, and holding them back for an instant.

The CLI turns SIGTERM and SIGHUP into an exception and SIGINT is Python's KeyboardInterrupt, so
``finally`` blocks remove temporary files whatever stopped a command; ``train`` stops after
the current update and saves. :func:`signals_held` closes the one gap left: between making a
temporary file or directory and entering the ``try`` that removes it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

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
    held = [None]
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        held[0] = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))

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


@contextlib.contextmanager
def stops_kept() -> Iterator[None]:
    """Raise a stop signal's exception at the end of the block, whatever the block made of
    it: for a library that can lose it (one raised in a fork hook while ``datasets`` forks
    its workers is discarded) or replace it (its pool's clean-up raises a TimeoutError;
    SentencePiece reports it as a failed training). A no-op outside the main thread."""
    seen: list[int] = []
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def keep(signum: int, frame: object) -> None:
        seen.append(signum)
        handlers[signum](signum, frame)

    try:
        for sig, handler in handlers.items():
            if callable(handler):
                signal.signal(sig, keep)
    except ValueError:  # not the main thread
        handlers = {}
    try:
        yield
    except BaseException:
        if not seen:
            raise
    finally:
        with contextlib.suppress(ValueError):
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if seen:  # the block's error (or none) was the signal's doing: raise the signal's own
        handlers[seen[-1]](seen[-1], None)

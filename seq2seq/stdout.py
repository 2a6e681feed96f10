"""Standard output whose write failures say that they are its own.

An ``OSError`` from writing a stream names no file, so a full disk under ``seq2seq translate >
out.txt`` was a bare "No space left on device", and the same words came from writing a
checkpoint. :class:`Named` wraps ``sys.stdout`` (and its ``buffer``) for the length of a
command, so that the message reads ``<stdout>: No space left on device``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

NAME = "<stdout>"


class Named:
    """``stream`` with the ``OSError`` of each write and flush given ``name`` as its file."""

    def __init__(self, stream: Any, name: str = NAME) -> None:
        self._stream = stream
        self._name = name

    def write(self, data: Any) -> int:
        with self._naming():
            return self._stream.write(data)

    def writelines(self, lines: Any) -> None:
        with self._naming():
            self._stream.writelines(lines)

    def flush(self) -> None:
        with self._naming():
            self._stream.flush()

    @property
    def buffer(self) -> Named:
        return Named(self._stream.buffer, self._name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._stream, attribute)

    @contextlib.contextmanager
    def _naming(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if error.filename is None:
                error.filename = self._name
            raise


@contextlib.contextmanager
def named_stdout() -> Iterator[None]:
    """``sys.stdout`` wrapped in :class:`Named` within the block (where there is one: Python
    sets None for a descriptor closed at start, and ``print`` then writes nothing)."""
    stdout = sys.stdout
    if stdout is None or isinstance(stdout, Named):  # none, or wrapped by a call in progress
        yield
        return
    sys.stdout = wrapper = Named(stdout)
    try:
        yield
    finally:
        if sys.stdout is wrapper:  # (another thread's call may have replaced it meanwhile)
            sys.stdout = stdout


def drop_unwritten(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that what its buffer still holds goes
    there at exit instead of failing a second time with a traceback."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's capture)
        pass

"""The project's error for user mistakes: the CLI prints it on one line and exits 2; and its
one-line warnings."""

import sys


class Seq2SeqError(Exception):
    """A problem the user can fix (bad file, bad input, bad argument); printed without traceback."""


def warn(message: str) -> None:
    """``warning: message`` as one line on stderr (not Python's warnings, which add the
    source file and line)."""
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def one_line(message: object) -> str:
    """``message`` kept on one line: a newline or carriage return in it (a path may hold
    them) is written ``\\n`` or ``\\r``."""
    return str(message).replace("\r", "\\r").replace("\n", "\\n")

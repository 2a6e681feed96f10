"""What every corpus reader (:mod:`.corpus`, :mod:`.hub`) shares: its error type, where a
corpus path points, and what a record's sentence field may hold."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from seq2seq.config import DataConfig, data_root
from seq2seq.errors import Seq2SeqError


class DataError(Seq2SeqError):
    """A corpus that cannot be read: missing file, misaligned lines, bad encoding or record."""


# str.strip() without arguments would also strip the ASCII separators \x1c-\x1f, which are
# control characters we promise to keep; so the whitespace set is spelled out.
SPACES = (
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def resolve_path(path: str, data: DataConfig) -> Path:
    """Expand ``~`` and ``$VARS``; resolve a relative path against the data root."""
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    if expanded.is_absolute():
        return expanded
    return data_root(data) / expanded


def field_text(value: Any, where: str, field: str) -> str:
    """A record field's sentence: a string without NUL, whitespace stripped."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got "
                        f"{type(value).__name__}")
    if "\0" in value:
        raise DataError(f"{where}: field {field!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON's "\ud800": as invalid UTF-8 in a text file
        raise DataError(f"{where}: field {field!r} holds a lone surrogate at character "
                        f"{error.start + 1}, not text") from None
    return value.strip(SPACES)

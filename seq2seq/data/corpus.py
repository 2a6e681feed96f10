"""Corpus readers: every supported format streamed as (source, target) sentence pairs.

``read_pairs(corpus, data)`` yields one ``(source, target)`` pair of strings per aligned line or
record and never holds a whole corpus in memory. Formats (``Corpus.format``):

- ``text``: two line-aligned files ``Corpus.src`` and ``Corpus.trg``, plain or gzip (recognised by
  the gzip magic bytes, whatever the suffix).
- ``tsv``: one file ``Corpus.path``, ``source<TAB>target`` per line.
- ``jsonl``: one file ``Corpus.path``, one JSON object per line; the sentences are the fields
  ``src_field`` / ``trg_field`` (default ``data.src_lang`` / ``data.trg_lang``, falling back to
  ``translation.<lang>``). A dotted field name walks into nested objects.
- ``hf`` (:mod:`.hub`): a Hugging Face ``datasets`` dataset, either a ``save_to_disk``
  directory ``Corpus.path`` (a DatasetDict picks ``Corpus.split``) or the hub dataset
  ``Corpus.hf_name`` / ``hf_config`` / ``split``; sentences come from a ``translation`` column
  of ``{lang: sentence}`` dicts or from plain columns named by the languages (or by
  ``src_field`` / ``trg_field``).
- ``generated``: ``Corpus.size`` pairs of the built-in synthetic task (:mod:`.synthetic`).

Relative paths are resolved against :func:`seq2seq.config.data_root`.

Text rules, the same for every format:

- Files are UTF-8. Invalid UTF-8 is an error naming the file and the 1-based line.
- A byte-order mark at the start of a file is dropped, and so is one at the start of any line
  (files joined with ``cat``, multi-member gzip: each part may start with one).
- Lines end at ``\\n``; a ``\\r\\n`` line end reads as ``\\n``. A lone ``\\r`` inside a line is
  content, never a line break (nor are U+2028, U+0085 and the other Unicode line separators).
- Leading and trailing whitespace (ASCII and Unicode spaces, tabs, line ends) is stripped from
  each sentence; other control characters are kept as they are.
- A NUL byte in a line is an error naming the file and line: it marks a binary or corrupt file.
- Empty lines are returned as empty strings; nothing is dropped here (the training-data filter
  drops empty pairs later; validation and test sets are never filtered).
- The two files of a ``text`` corpus must have the same number of lines; otherwise the error
  names both files and both counts.

Every user mistake raises :class:`DataError` with a one-line message naming the file, the line
and, where it applies, the field.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from seq2seq.config import Corpus, DataConfig
from seq2seq.data.fields import SPACES as _SPACES
from seq2seq.data.fields import DataError, field_text, resolve_path
from seq2seq.translate_io import BOM as _BOM
from seq2seq.translate_io import GZIP_MAGIC as _GZIP_MAGIC
from seq2seq.translate_io import gunzip


def read_pairs(corpus: Corpus, data: DataConfig) -> Iterator[tuple[str, str]]:
    """Stream the (source, target) sentence pairs of one corpus.

    Args:
        corpus: where the pairs come from (format and paths).
        data: the data section: languages and the data root.

    Yields:
        ``(source, target)`` strings, stripped, one per aligned line or record, in file order.

    Raises:
        DataError: a missing or unreadable file, misaligned files, invalid UTF-8, a bad record.
    """
    if corpus.format == "text":
        src = resolve_path(_required(corpus.src, "src", "text"), data)
        trg = resolve_path(_required(corpus.trg, "trg", "text"), data)
        yield from _read_text(src, trg)
    elif corpus.format == "tsv":
        yield from _read_tsv(resolve_path(_required(corpus.path, "path", "tsv"), data))
    elif corpus.format == "jsonl":
        path = resolve_path(_required(corpus.path, "path", "jsonl"), data)
        yield from _read_jsonl(path, _field_names(corpus.src_field, data.src_lang),
                               _field_names(corpus.trg_field, data.trg_lang))
    elif corpus.format == "hf":
        from seq2seq.data.hub import read_hf

        yield from read_hf(corpus, data)
    elif corpus.format == "generated":
        from seq2seq.data.synthetic import generate_pairs

        if corpus.size < 1:
            raise DataError(f"generated corpus (split {corpus.split!r}): size must be >= 1, "
                            f"got {corpus.size}")
        if corpus.split not in ("train", "valid", "test"):
            raise DataError(f"generated corpus: split must be train, valid or test, "
                            f"got {corpus.split!r}")
        yield from generate_pairs(corpus.split, corpus.size, corpus.seed)
    else:  # config.py's Literal makes this unreachable from a recipe
        raise DataError(f"unknown corpus format {corpus.format!r}")


def check_corpus(corpus: Corpus, data: DataConfig) -> None:
    """Check, without reading it, that a corpus can be opened: its keys and files are there.

    ``prepare`` calls this for every corpus before it writes anything, so a missing file is
    reported at once rather than after the tokenizer has been trained.

    Raises:
        DataError: a missing key, a missing or unreadable file, a bad generated corpus.
    """
    if corpus.format == "hf":
        if corpus.path and not resolve_path(corpus.path, data).is_dir():
            raise DataError(f"{resolve_path(corpus.path, data)}: no such directory (an hf "
                            "corpus path is a save_to_disk directory)")
        if not corpus.path and not corpus.hf_name:
            raise DataError("an hf corpus needs 'path' (a save_to_disk directory) or 'hf_name'")
    elif corpus.format == "generated":  # the reader's own checks cost nothing
        next(read_pairs(corpus, data), None)
    for path in corpus_files(corpus, data):
        _open_binary(path).close()


def corpus_files(corpus: Corpus, data: DataConfig) -> list[Path]:
    """The files a text, TSV or JSONL corpus reads (none for the others).

    Raises:
        DataError: a file key the format needs is missing.
    """
    if corpus.format == "text":
        return [resolve_path(_required(corpus.src, "src", "text"), data),
                resolve_path(_required(corpus.trg, "trg", "text"), data)]
    if corpus.format in ("tsv", "jsonl"):
        return [resolve_path(_required(corpus.path, "path", corpus.format), data)]
    return []


def _required(value: str | None, name: str, fmt: str) -> str:
    if not value:
        raise DataError(f"a {fmt} corpus needs '{name}' (a file relative to data.root)")
    return value


# --------------------------------------------------------------------------------------------
# Lines of a file: open (plain or gzip), then decode one line at a time
# --------------------------------------------------------------------------------------------


def _open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, through gzip when it starts with the gzip magic.
    A pipe or device is refused: a corpus is read more than once (and opening a FIFO blocks)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
            raise DataError(f"{path}: not a regular file (a pipe or a device); a corpus is "
                            "read more than once, so write it to a file first")
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller's ``with``
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot open ({error.strerror or error})") from None
    if raw.peek(2)[:2] == _GZIP_MAGIC:
        return gunzip(raw, close_stream=True)
    return raw


def _lines(path: Path, strip: bool = True) -> Iterator[str]:
    """Decoded lines of ``path`` (plain or gzip), following the module's text rules.

    With ``strip=False`` only the line end (``\\n`` or ``\\r\\n``) is removed, so that a TSV
    line keeps the tab of an empty source or target.
    """
    with _open_binary(path) as stream:
        number = 0
        try:
            for number, raw in enumerate(stream, start=1):
                if raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                if b"\0" in raw:
                    raise DataError(f"{path}: line {number} contains a NUL byte "
                                    "(a binary or corrupt file?)")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad = raw[error.start:error.start + 1]
                    raise DataError(f"{path}: line {number} is not valid UTF-8 "
                                    f"(byte {error.start + 1}: {bad!r})") from None
                if strip:
                    yield text.strip(_SPACES)
                else:
                    yield text.removesuffix("\n").removesuffix("\r")
        except (EOFError, OSError, zlib.error) as error:
            # Truncated or corrupt gzip data surfaces here, mid-iteration.
            raise DataError(f"{path}: cannot read after line {number} "
                            f"({error.__class__.__name__}: {error})") from None


def _count_rest(lines: Iterator[str]) -> int:
    return sum(1 for _ in lines)


def _read_text(src: Path, trg: Path) -> Iterator[tuple[str, str]]:
    src_lines, trg_lines = _lines(src), _lines(trg)
    count = 0
    for count, src_line in enumerate(src_lines, start=1):
        trg_line = next(trg_lines, None)
        if trg_line is None:
            # Count the rest of the longer file so the message can give both totals.
            src_total = count + _count_rest(src_lines)
            raise DataError(_misaligned(src, src_total, trg, count - 1))
        yield src_line, trg_line
    extra = _count_rest(trg_lines)
    if extra:
        raise DataError(_misaligned(src, count, trg, count + extra))


def _misaligned(src: Path, src_count: int, trg: Path, trg_count: int) -> str:
    return (f"{src} has {src_count:,} lines but {trg} has {trg_count:,}; "
            "the files must be aligned line by line")


# --------------------------------------------------------------------------------------------
# One-file formats: tsv and jsonl
# --------------------------------------------------------------------------------------------


def _read_tsv(path: Path) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(_lines(path, strip=False), start=1):
        tabs = line.count("\t")
        if tabs != 1:
            raise DataError(f"{path}: line {number} has {tabs} tabs; expected exactly one "
                            "(source<TAB>target)")
        src, trg = line.split("\t")
        yield src.strip(_SPACES), trg.strip(_SPACES)


def _field_names(field: str | None, lang: str) -> tuple[str, ...]:
    """Candidate field paths: the one given, else the language, else translation.<lang>."""
    return (field,) if field else (lang, f"translation.{lang}")


def _lookup(record: Any, names: tuple[str, ...]) -> Any:
    """The value at the first of ``names`` present in ``record`` (dotted names walk nested
    dicts); ``_MISSING`` if none is."""
    for name in names:
        if isinstance(record, dict) and name in record:
            return record[name]
        node = record
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return _MISSING


_MISSING = object()


def _sentence(value: Any, where: str, names: tuple[str, ...]) -> str:
    if value is _MISSING:
        raise DataError(f"{where}: missing field {names[0]!r}")
    return field_text(value, where, names[0])


def _read_jsonl(path: Path, src_names: tuple[str, ...], trg_names: tuple[str, ...]
                ) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(_lines(path), start=1):
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})"
                            ) from None
        except (ValueError, RecursionError) as error:  # a 5,000-digit number, deep nesting
            raise DataError(f"{where}: unreadable JSON ({str(error)[:80]})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield (_sentence(_lookup(record, src_names), where, src_names),
               _sentence(_lookup(record, trg_names), where, trg_names))

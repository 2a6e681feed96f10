"""What identifies a training corpus, and whether a resumed run still has the same one.

A corpus of files is identified by the sha256 of each file's bytes (not by where the files lie
or when they were written, so a copy of the data under another ``data.root``, as a cluster job
makes on its node's disk, resumes a run); a hub dataset or the generated task by a hash of its
pairs. A checkpoint records that fingerprint with the tokenizer's, and a resume on other data,
or with another tokenizer, is refused before anything is written. Runs whose checkpoints came
before this (2026-12-07) keep their fingerprint of the files' paths, sizes and times.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

from seq2seq.config import Corpus, DataConfig, Recipe
from seq2seq.data.corpus import DataError, read_pairs, resolve_path
from seq2seq.data.encoding import ENCODE_BATCH
from seq2seq.tokenizer import Tokenizer, load_if_current


def keyed_pairs(where: str, corpus: Corpus, data: DataConfig, fingerprint: str | None = None
                ) -> Iterator[tuple[str, str]]:
    """``read_pairs`` with errors prefixed by the recipe key of the corpus; with the corpus's
    ``fingerprint``, the read ends by checking that its files are still what was fingerprinted
    (a file being appended to gave a cache of other pairs than its name said)."""
    try:
        yield from read_pairs(corpus, data)
        if fingerprint is not None:
            check_unchanged(fingerprint, corpus, data)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


def check_unchanged(fingerprint: str, corpus: Corpus, data: DataConfig) -> None:
    """Refuse a corpus of files that changed since ``fingerprint`` was taken of them (by
    what ``fstat`` says of them: one stat each where nothing changed)."""
    if fingerprint.startswith("stat:"):
        now = _stat_fingerprint(corpus, data)[0]
    elif fingerprint.startswith("files:"):
        now = corpus_fingerprint(corpus, data, show_progress=False)
    else:
        return  # a hub dataset or the generated task: hashed by its pairs
    if now != fingerprint:
        names = ", ".join(str(path) for path in _files(corpus, data))
        raise DataError(f"{names}: changed while they were read; start again once they are "
                        "written")


def corpus_fingerprint(corpus: Corpus, data: DataConfig, show_progress: bool) -> str:
    """A fingerprint of the corpus: the sha256 of each of its files, else a hash of its pairs.

    By the files' bytes for corpora of files (text, tsv, jsonl, hf save_to_disk directories):
    one pass at the speed of the disk or of sha256, whichever is slower, where hashing the
    pairs would decode and parse them; by the pairs for hub datasets and the generated task.

    Raises:
        DataError: a file is missing, not a regular file, or cannot be read.
    """
    paths = _files(corpus, data)
    if not paths:
        return "content:" + content_hash(keyed_pairs("data.train", corpus, data),
                                         show_progress)
    from tqdm import tqdm

    with tqdm(desc="hashing train", unit="B", unit_scale=True, disable=not show_progress,
              leave=False, delay=2) as bar:
        try:
            described = corpus_files(corpus, data, bar.update)
        except DataError as error:
            raise DataError(f"data.train: {error}") from None
    if None in described:
        next(keyed_pairs("data.train", corpus, data), None)  # the reader says what is wrong
        raise DataError(f"data.train: {paths[described.index(None)]}: cannot be read")
    names = _names(corpus, data, paths)
    return "files:" + _key_hash(corpus, data, [[name, f[2]] for name, f in zip(names, described)])


def file_corpus(corpus: Corpus, data: DataConfig) -> bool:
    """Whether the corpus is one of files that are all there and regular (by stat alone)."""
    paths = _files(corpus, data)
    try:
        return bool(paths) and all(stat.S_ISREG(path.stat().st_mode) for path in paths)
    except OSError:
        return False


def corpus_files(corpus: Corpus, data: DataConfig,
                 progress: Callable[[int], object] | None = None) -> list:
    """``[path, size, sha256]`` of each file of a file-based corpus (None for one that is
    missing or not a regular file); empty for hub datasets and the generated task.
    ``progress`` is called with the bytes hashed as they are.

    Raises:
        DataError: a regular file cannot be read, or changed while it was read.
    """
    described = []
    for path in _files(corpus, data):
        try:
            # (A pipe or a device is never opened here: the corpus reader refuses it.)
            regular = stat.S_ISREG(path.stat().st_mode)
        except OSError:
            regular = False
        described.append([str(path.resolve()), *file_digest(path, progress)] if regular
                         else None)
    return described


# A file's size and digest by what fstat says of it, for this process: `check` and a run's
# start look at the same files more than once.
_DIGESTS: dict[tuple, tuple[int, str]] = {}


def file_digest(path: Path, progress: Callable[[int], object] | None = None
                ) -> tuple[int, str]:
    """The size and sha256 of the regular file at ``path``.

    Raises:
        DataError: it cannot be read, or it changed while it was read (being written).
    """
    def identity(handle: Any) -> tuple:
        info = os.fstat(handle.fileno())  # (a write sets the ctime, which utime cannot undo)
        return (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                info.st_ctime_ns)

    try:
        with open(path, "rb") as handle:
            key = identity(handle)
            if key not in _DIGESTS:
                digest, buffer, total = hashlib.sha256(), bytearray(1 << 20), 0
                while size := handle.readinto(buffer):
                    digest.update(memoryview(buffer)[:size])
                    total += size
                    if progress is not None:
                        progress(size)
                if identity(handle) != key:
                    raise DataError(f"{path}: changed while it was read; start again once it "
                                    "is written")
                _DIGESTS[key] = total, digest.hexdigest()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    return _DIGESTS[key]


def _files(corpus: Corpus, data: DataConfig) -> list[Path]:
    if corpus.format == "text" and corpus.src and corpus.trg:
        return [resolve_path(corpus.src, data), resolve_path(corpus.trg, data)]
    if corpus.format in ("tsv", "jsonl") and corpus.path:
        return [resolve_path(corpus.path, data)]
    if corpus.format == "hf" and corpus.path:
        root = resolve_path(corpus.path, data)
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return []


def _names(corpus: Corpus, data: DataConfig, paths: list[Path]) -> list[str]:
    """The files of an hf directory by their place in it (as listed, links not followed);
    the other formats' files by their position."""
    if corpus.format != "hf":
        return [""] * len(paths)
    root = resolve_path(corpus.path, data)
    return [path.relative_to(root).as_posix() if path != root else "" for path in paths]


def _key_hash(corpus: Corpus, data: DataConfig, files: list) -> str:
    key = {"format": corpus.format, "split": corpus.split, "files": files,
           "src_field": corpus.src_field, "trg_field": corpus.trg_field,
           "languages": [data.src_lang, data.trg_lang]}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _stat_fingerprint(corpus: Corpus, data: DataConfig) -> tuple[str | None, list]:
    """The fingerprint of checkpoints written before 2026-12-07 (paths, sizes and times of
    the files) and those files, so that their runs resume as they did."""
    described = []
    for path in _files(corpus, data):
        try:
            info = path.stat()
            described.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
        except OSError:
            described.append(None)
    if not described or None in described:
        return None, described
    return "stat:" + _key_hash(corpus, data, described), described


def current_inputs(recipe: Recipe, show_progress: bool, expect: dict | None = None,
                   fingerprint: str | None = None) -> tuple[str, Tokenizer | None]:
    """The training corpus's fingerprint, and the run's tokenizer (``<output_dir>/tokenizer``)
    if it was trained on that corpus with the recipe's settings, else None. Writes nothing.

    Args:
        expect: a resumed checkpoint's ``fingerprints``, whose kind of fingerprint is used.
        fingerprint: the fingerprint, where another process has just computed it.
    """
    data = recipe.data
    if fingerprint is None and str((expect or {}).get("train_corpus")).startswith("stat:"):
        fingerprint = _stat_fingerprint(data.train, data)[0]
    if fingerprint is None:
        fingerprint = corpus_fingerprint(data.train, data, show_progress)
    tokenizer = load_if_current(recipe.tokenizer, fingerprint, data.src_lang, data.trg_lang,
                                Path(recipe.output_dir) / "tokenizer")
    return fingerprint, tokenizer


def recorded_files(fingerprint: str, corpus: Corpus, data: DataConfig) -> list:
    """What a checkpoint records of the corpus's files beside ``fingerprint``:
    :func:`corpus_files`, or their paths, sizes and times for a stat fingerprint."""
    if fingerprint.startswith("stat:"):
        return _stat_fingerprint(corpus, data)[1]
    return corpus_files(corpus, data)


def check_same_inputs(expect: dict, recipe: Recipe, fingerprint: str,
                      tokenizer: Tokenizer | None) -> None:
    """Refuse to resume on a training corpus or tokenizer other than the checkpoint's.

    Args:
        expect: the checkpoint's ``fingerprints``.
        fingerprint, tokenizer: :func:`current_inputs` of the resumed run (given ``expect``).

    Raises:
        DataError: naming what changed and what to do, before anything is written.
    """
    out_dir = Path(recipe.output_dir)
    if expect.get("train_corpus") not in (None, fingerprint):
        was = [f for f in expect.get("train_files") or [] if f]
        if fingerprint.startswith("stat:"):  # by path, size and time
            now = [f for f in _stat_fingerprint(recipe.data.train, recipe.data)[1] if f]
            changed = [w[0] for w in was if w not in now]
            raise DataError(
                f"cannot resume {out_dir}: its checkpoints know their training corpus by the "
                "paths, sizes and modification times of its files, and "
                f"{', '.join(changed) or 'one of them'} changed or moved; restore them (and "
                "data.root), or use a new output_dir")
        # By size and digest (paths may differ); the files of an hf directory in any order.
        now = [f for f in corpus_files(recipe.data.train, recipe.data) if f]
        if recipe.data.train.format == "hf":
            changed = [n[0] for n in now if n[1:] not in [w[1:] for w in was]]
        else:
            changed = [n[0] for w, n in zip_longest(was, now) if n and (w is None or
                                                                       w[1:] != n[1:])]
        what = f"changed: {', '.join(changed)}" if changed else "its files differ"
        raise DataError(
            f"cannot resume {out_dir}: the training corpus is not the one its checkpoint was "
            f"trained on ({what}); the tokenizer and the encoded corpus would differ from what "
            "the weights learned. Use a new output_dir, or restore the data")
    if expect.get("tokenizer") and (tokenizer is None
                                    or tokenizer.fingerprint != expect["tokenizer"]):
        raise DataError(
            f"cannot resume {out_dir}: its tokenizer ({out_dir / 'tokenizer'}) is missing or "
            "differs from the one its checkpoint was trained with, and a tokenizer is never "
            "retrained under trained weights; use a new output_dir")


def content_hash(pairs: Iterator[tuple[str, str]], show_progress: bool) -> str:
    """Hash of the pairs, streamed in chunks."""
    from tqdm import tqdm

    digest, chunk = hashlib.sha256(), []
    with tqdm(desc="fingerprinting train", unit=" pairs", disable=not show_progress,
              unit_scale=True) as bar:
        for src, trg in pairs:
            # Sentences never contain NUL (the readers reject it), so NUL separates fields.
            chunk.append(f"{src}\0{trg}\0")
            if len(chunk) == ENCODE_BATCH:
                digest.update("".join(chunk).encode("utf-8"))
                bar.update(len(chunk))
                chunk = []
        digest.update("".join(chunk).encode("utf-8"))
        bar.update(len(chunk))
    return digest.hexdigest()

"""What identifies a training corpus, and whether a resumed run still has the same one.

A corpus of files is identified by the sha256 of each file's bytes (not by where the files lie
or when they were written, so a copy of the data under another ``data.root``, as a cluster job
makes on its node's disk, resumes a run); a hub dataset or the generated task by a hash of its
pairs. A checkpoint records that fingerprint with the tokenizer's, and a resume on other data,
or with another tokenizer, is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

from seq2seq.config import Corpus, DataConfig, Recipe
from seq2seq.data.corpus import DataError, read_pairs, resolve_path
from seq2seq.data.encoding import ENCODE_BATCH
from seq2seq.tokenizer import Tokenizer, load_if_current


def keyed_pairs(where: str, corpus: Corpus, data: DataConfig) -> Iterator[tuple[str, str]]:
    """``read_pairs`` with errors prefixed by the recipe key of the corpus."""
    try:
        yield from read_pairs(corpus, data)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


def corpus_fingerprint(corpus: Corpus, data: DataConfig, show_progress: bool) -> str:
    """A fingerprint of the corpus: the sha256 of each of its files, else a hash of its pairs.

    By the files' bytes for corpora of files (text, tsv, jsonl, hf save_to_disk directories):
    one pass at hashing speed (about a second a GB), where hashing the pairs would decode and
    parse them; by the pairs for hub datasets and the generated task.
    """
    described = corpus_files(corpus, data)
    if described and None not in described:
        root = resolve_path(corpus.path, data) if corpus.format == "hf" else None
        files = [[_relative(path, root), digest] for path, _, digest in described]
        return "files:" + _key_hash(corpus, data, files)
    return "content:" + content_hash(keyed_pairs("data.train", corpus, data), show_progress)


def corpus_files(corpus: Corpus, data: DataConfig) -> list:
    """``[path, size, sha256]`` of each file of a file-based corpus (None for one that cannot
    be read); empty for hub datasets and the generated task."""
    described = []
    for path in _files(corpus, data):
        try:
            info = path.stat()
            # (A pipe or a device is never read here: the corpus reader refuses it.)
            described.append([str(path.resolve()), info.st_size, file_digest(path, info)]
                             if stat.S_ISREG(info.st_mode) else None)
        except OSError:
            described.append(None)
    return described


# A file's digest by what stat says of it, for this process: `check` and a run's start look at
# the same files more than once.
_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path, info: os.stat_result) -> str:
    """The sha256 of the file at ``path`` (``info``: its stat)."""
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
           info.st_ctime_ns)  # (a write sets the ctime, which utime cannot set back)
    if key not in _DIGESTS:
        digest, buffer = hashlib.sha256(), bytearray(1 << 20)
        with open(path, "rb") as handle:
            while size := handle.readinto(buffer):
                digest.update(memoryview(buffer)[:size])
        _DIGESTS[key] = digest.hexdigest()
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


def _relative(path: str, root: Path | None) -> str:
    """A file of an hf directory by its place in it; the other formats' files by position."""
    try:
        return Path(path).relative_to(root.resolve()).as_posix() if root else ""
    except ValueError:  # the directory itself is a file
        return ""


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


def current_inputs(recipe: Recipe, show_progress: bool, expect: dict | None = None
                   ) -> tuple[str, Tokenizer | None]:
    """The training corpus's fingerprint, and the run's tokenizer (``<output_dir>/tokenizer``)
    if it was trained on that corpus with the recipe's settings, else None. Writes nothing.
    ``expect``: a resumed checkpoint's ``fingerprints``, whose kind of fingerprint is used."""
    data = recipe.data
    fingerprint = None
    if str((expect or {}).get("train_corpus")).startswith("stat:"):
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
        was = expect.get("train_files") or []
        now = recorded_files(fingerprint, recipe.data.train, recipe.data)
        # File by file, in order: by size and digest (a path may change), or by all three
        # fields for a stat fingerprint.
        first = 0 if fingerprint.startswith("stat:") else 1
        changed = [(n or w)[0] for w, n in zip_longest(was, now)
                   if (w or n) and (w is None or n is None or w[first:] != n[first:])]
        what = f"changed: {', '.join(changed)}" if changed else "its content differs"
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

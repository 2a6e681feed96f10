"""``prepare``: tokenizer, then the encoded, filtered, memory-mapped Arrow cache of the corpus.

:func:`prepare_data` runs in four steps:

1. Fingerprint the training corpus: the sha256 of its files (a hash of its pairs for hub
   datasets and the generated task).
2. Reuse the tokenizer in ``<output_dir>/tokenizer`` and the training cache when both were built
   from the same inputs; then a corpus of files is hashed, not parsed.
3. Otherwise stream the corpus once into an Arrow file, train the SentencePiece tokenizer on a
   uniform sample of ``tokenizer.input_sentence_size`` sentences of it (if it must be retrained),
   encode it with a batched multi-process ``datasets.map``, and drop the pairs that are empty,
   too long or too unbalanced (training only), counted per reason. The result is saved under
   ``data.cache_dir`` (default ``<output_dir>/cache``) in a directory named after the hash of
   its inputs, built in a temporary directory and renamed into place when complete. Older
   caches in the run's own cache directory are then deleted (a shared ``data.cache_dir`` is
   never pruned).
4. Encode the validation and test sets, unfiltered, keeping their raw text as references.

Cached training rows have ``src_ids`` and ``trg_ids`` (int32 subword ids without BOS/EOS) and
``src_len`` / ``trg_len``. Memory stays flat whatever the corpus size: pairs are streamed in
batches and the cache is memory-mapped. Reading, encoding and the training filter are in
:mod:`seq2seq.data.encoding`, the statistics in :mod:`seq2seq.data.stats`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from seq2seq.config import Corpus, DataConfig, Recipe
from seq2seq.data.corpus import DataError
from seq2seq.data.encoding import (
    ENCODE_BATCH,
    ENCODED_FEATURES,
    FILTER_KEYS,
    KEEP,
    EncodingProcessDied,
    check_some_text,
    encode_rows,
    encoding_pool,
    read_into_arrow,
    sample_pairs,
)
from seq2seq.data.fingerprint import (
    check_same_inputs,
    current_inputs,
    keyed_pairs,
    recorded_files,
)
from seq2seq.data.preflight import cache_root as _cache_root
from seq2seq.data.preflight import input_problems, remove_stale_caches
from seq2seq.data.stats import describe_eval_set, describe_train
from seq2seq.errors import warn
from seq2seq.search.shortlist import MAX_PAIRS, Lexicon, build_lexicon
from seq2seq.signals import signals_held, stops_kept
from seq2seq.tokenizer import UNK, Tokenizer, tokenizer_hash, train_tokenizer

CACHE_VERSION = 2  # bump when the cached columns, the filter or the reading rules change
# (2: a byte order mark starting any line is dropped, 2026-12-07)


@dataclass
class EvalSet:
    """A validation or test set: raw text (the references) and its ids, never filtered."""

    name: str
    src_text: list[str]
    trg_text: list[str]
    src_ids: list[list[int]]
    trg_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.src_text)


@dataclass
class PreparedData:
    """Everything training and evaluation read: tokenizer, encoded corpora, statistics.

    Attributes:
        tokenizer: the SentencePiece tokenizer.
        train: the filtered training pairs, a memory-mapped ``datasets.Dataset`` with columns
            ``src_ids``, ``trg_ids``, ``src_len``, ``trg_len``.
        valid: the validation set.
        tests: the test sets by name, in recipe order.
        stats: counts and length statistics (see :func:`seq2seq.data.stats.format_stats`).
        cache_dir: the directory holding the training cache.
        fingerprints: what the weights trained on this data depend on: ``train_corpus`` (the
            corpus fingerprint), ``train_files`` (its files: path, size, sha256 or mtime) and
            ``tokenizer`` (the SentencePiece models' hash). Checkpoints record them; a resume
            passes them back as ``expect`` to :func:`prepare_data`.
    """

    tokenizer: Tokenizer
    train: datasets.Dataset
    valid: EvalSet
    tests: dict[str, EvalSet]
    stats: dict
    cache_dir: Path
    fingerprints: dict
    _lexicon: Lexicon | None = field(default=None, repr=False)

    def lexicon(self) -> Lexicon:
        """The IBM Model 1 lexicon of the training pairs (``decode.shortlist`` reads it from
        checkpoints), estimated on the first call from at most ``MAX_PAIRS`` evenly spaced
        pairs."""
        if self._lexicon is None:
            table = self.train.data.table
            rows = table.take(list(range(0, table.num_rows,
                                         max(1, -(-table.num_rows // MAX_PAIRS)))))
            self._lexicon = build_lexicon(
                rows.column("src_ids").to_pylist(), rows.column("trg_ids").to_pylist(),
                self.tokenizer.src_vocab_size, self.tokenizer.trg_vocab_size)
        return self._lexicon

    def train_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) source and (N,) target lengths of the training pairs (without EOS)."""
        table = self.train.data.table
        return (table.column("src_len").to_numpy().astype(np.int64),
                table.column("trg_len").to_numpy().astype(np.int64))


def prepare_data(recipe: Recipe, show_progress: bool = True, expect: dict | None = None,
                 known: dict | None = None) -> PreparedData:
    """Train or reuse the tokenizer and build or reuse the encoded training cache.

    Args:
        recipe: the whole recipe (data, tokenizer and output_dir are read).
        show_progress: tqdm bars on stderr.
        expect: a resumed checkpoint's ``fingerprints``: the corpus and tokenizer must be the
            ones its weights were trained on, and the tokenizer is never retrained under them.
        known: the ``fingerprints`` another process has just prepared (the corpus is not read).

    Returns:
        The prepared data; ``stats`` tells what was read, kept and dropped.

    Raises:
        DataError: a corpus cannot be read.
        Seq2SeqError: the tokenizer cannot be trained (e.g. vocabulary too large).
    """
    _check_before_writing(recipe, say=known is None)  # (known: another rank has said it)
    with _removed_if_left_empty([Path(recipe.output_dir), _cache_root(
            recipe.data, Path(recipe.output_dir))]):
        return _prepare(recipe, show_progress, expect, known)


def _prepare(recipe: Recipe, show_progress: bool, expect: dict | None, known: dict | None
             ) -> PreparedData:
    data = recipe.data
    out_dir = Path(recipe.output_dir)
    with _progress_bars(show_progress):
        # Validation and test sets are small: read them first, so that a bad line there is
        # reported before the (long) tokenizer training and cache build, not after.
        eval_texts = {"valid": _read_eval_set("valid", data.valid, data)}
        eval_texts.update({name: _read_eval_set(name, corpus, data)
                           for name, corpus in data.test.items()})
        fingerprint, tokenizer = current_inputs(recipe, show_progress, expect,
                                                (known or {}).get("train_corpus"))
        if expect:
            check_same_inputs(expect, recipe, fingerprint, tokenizer)
        tokenizer_reused = tokenizer is not None
        cache_dir = None
        if tokenizer is not None:
            cache_dir = _cache_root(data, out_dir) / _cache_name(fingerprint, tokenizer, data)
        loaded = _load_cache(cache_dir) if cache_dir is not None else None
        cache_reused = loaded is not None
        if loaded is None:
            tokenizer, cache_dir = _build(recipe, fingerprint, tokenizer, show_progress)
            loaded = _load_cache(cache_dir)
            if loaded is None:
                raise DataError(f"{cache_dir}: the training cache just built cannot be read")
        if known is None:  # (not on the other ranks: the main rank has prepared the data)
            remove_stale_caches(cache_dir, out_dir, bool(data.cache_dir), show_progress)
        train, train_stats = loaded
        valid = _eval_set("valid", *eval_texts.pop("valid"), tokenizer)
        tests = {name: _eval_set(name, *texts, tokenizer) for name, texts in eval_texts.items()}
    stats = {
        "tokenizer": {"joint": tokenizer.joint, "src_vocab": tokenizer.src_vocab_size,
                      "trg_vocab": tokenizer.trg_vocab_size, "reused": tokenizer_reused,
                      "path": str(out_dir / "tokenizer")},
        "cache": {"reused": cache_reused, "path": str(cache_dir)},
        "train": train_stats,
        "valid": describe_eval_set(valid.src_ids, valid.trg_ids),
        "tests": {name: describe_eval_set(test.src_ids, test.trg_ids)
                  for name, test in tests.items()},
    }
    fingerprints = known or {"train_corpus": fingerprint,
                             "train_files": recorded_files(fingerprint, data.train, data),
                             "tokenizer": tokenizer.fingerprint}
    return PreparedData(tokenizer, train, valid, tests, stats, cache_dir, fingerprints)


def _load_cache(cache_dir: Path) -> tuple[Any, dict] | None:
    """The training cache's Arrow table and statistics; None where it is missing or cannot be
    read (a damaged file: ``load_from_disk`` reads each Arrow file's record batches): it is
    rebuilt then, the same inputs giving the same cache."""
    if not cache_dir.is_dir():
        return None
    try:
        train = datasets.load_from_disk(str(cache_dir / "train"))
        train_stats = json.loads((cache_dir / "stats.json").read_text())
        if not isinstance(train_stats, dict):
            raise ValueError("stats.json holds no object")
    except Exception as error:  # noqa: BLE001 - datasets, pyarrow and json raise many types
        warn(f"{cache_dir}: the training cache cannot be read ({type(error).__name__}); "
             "building it again")
        shutil.rmtree(cache_dir, ignore_errors=True)
        return None
    return train, train_stats


@contextmanager
def _removed_if_left_empty(directories: list[Path]) -> Iterator[None]:
    """On failure, remove the directories among ``directories`` that this call created and
    left empty (so a prepare that fails leaves no empty run or cache directory)."""
    missing = []
    for directory in directories:
        for path in (directory, *directory.parents):
            if path.exists():
                break
            missing.append(path)
    try:
        yield
    except BaseException:
        for path in sorted(set(missing), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty directory goes
        raise


def _check_before_writing(recipe: Recipe, say: bool) -> None:
    """Report a missing or empty corpus or an unusable output directory before anything is
    written (the first problem; ``seq2seq check`` lists them all)."""
    problems = input_problems(recipe, say=say)
    if problems:
        raise DataError(problems[0])


# --------------------------------------------------------------------------------------------
# Reading and fingerprinting
# --------------------------------------------------------------------------------------------


def _cache_name(fingerprint: str, tokenizer: Tokenizer, data: DataConfig) -> str:
    """The training cache's directory name: a hash of everything its content depends on."""
    key = {"version": CACHE_VERSION, "corpus": fingerprint, "tokenizer": tokenizer.fingerprint,
           "max_src_tokens": data.max_src_tokens, "max_trg_tokens": data.max_trg_tokens,
           "max_length_ratio": data.max_length_ratio}
    return "train-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# Building: one read into Arrow, tokenizer from a sample of it, encode, filter, save
# --------------------------------------------------------------------------------------------


def _build(recipe: Recipe, fingerprint: str, tokenizer: Tokenizer | None,
           show_progress: bool) -> tuple[Tokenizer, Path]:
    """Build the training cache (training the tokenizer first when ``tokenizer`` is None).

    Everything is written under a temporary directory that is renamed into place when
    complete, so an interrupted build leaves nothing that looks finished.
    """
    cache_root = _cache_root(recipe.data, Path(recipe.output_dir))
    cache_root.mkdir(parents=True, exist_ok=True)
    with signals_held() as release:
        tmp = Path(tempfile.mkdtemp(prefix=f".train-{os.getpid()}-", dir=cache_root))
        try:
            release()
            return _build_in(tmp, cache_root, recipe, fingerprint, tokenizer, show_progress)
        except OSError as error:
            if error.filename or isinstance(error, EncodingProcessDied):
                raise
            # pyarrow's and SentencePiece's errors (a full disk) name no file: name the place
            raise OSError(error.errno, error.strerror or str(error), str(cache_root)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_in(tmp: Path, cache_root: Path, recipe: Recipe, fingerprint: str,
              tokenizer: Tokenizer | None, show_progress: bool) -> tuple[Tokenizer, Path]:
    """:func:`_build`'s work in the temporary directory ``tmp``."""
    data = recipe.data
    out_dir = Path(recipe.output_dir)
    work = tmp / "work"  # intermediate Arrow files; deleted at the end
    # The corpus is read once, into Arrow; the tokenizer sample and the encoder read that. A
    # file changed since it was fingerprinted is refused: the cache would not be what it's named.
    pairs = keyed_pairs("data.train", data.train, data, fingerprint)
    raw = read_into_arrow(pairs, work, show_progress)
    check_some_text(raw, data)
    if tokenizer is None:
        cfg = recipe.tokenizer
        # Sampled here, from a seed, to at most input_sentence_size sentences: SentencePiece's
        # own sampling (of the two sides of a joint model) differed from process to process.
        size = cfg.input_sentence_size // 2 if cfg.joint else cfg.input_sentence_size
        if show_progress:  # SentencePiece reports no progress; say what the wait is
            print(f"training the {cfg.type} tokenizer (vocabulary {cfg.vocab_size:,}) on "
                  f"{min(len(raw), size or len(raw)):,} sampled pairs", file=sys.stderr,
                  flush=True)
        wanted = tokenizer_hash(cfg, fingerprint, data.src_lang, data.trg_lang)
        tokenizer = train_tokenizer(cfg, sample_pairs(raw, size), out_dir / "tokenizer",
                                    data_hash=wanted)
    cache_dir = cache_root / _cache_name(fingerprint, tokenizer, data)
    if not cache_dir.is_dir():  # a retrained tokenizer may equal the old one
        _encode_and_filter(raw, tokenizer, data, tmp / "cache")
        del raw  # release the memory maps before deleting their files
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.replace(tmp / "cache", cache_dir)
        except OSError:
            if not cache_dir.is_dir():  # else another process built the same cache first
                raise
    return tokenizer, cache_dir


def _encode_and_filter(raw: datasets.Dataset, tokenizer: Tokenizer, data: DataConfig,
                       out: Path) -> None:
    """Encode every pair, drop what the training filter rejects, save to ``out``."""
    # Worker processes only pay off beyond a batch or two (each costs ~1 s to start).
    num_proc = data.num_proc if data.num_proc > 1 and len(raw) > ENCODE_BATCH else None
    with stops_kept(), encoding_pool(num_proc):  # (a Ctrl-C while the pool forks was lost)
        encoded = raw.map(
            encode_rows, batched=True, batch_size=ENCODE_BATCH, num_proc=num_proc,
            remove_columns=["src", "trg"], features=ENCODED_FEATURES, desc="encoding train",
            fn_kwargs={"tokenizer": tokenizer, "max_src_tokens": data.max_src_tokens,
                       "max_trg_tokens": data.max_trg_tokens,
                       "max_length_ratio": data.max_length_ratio})
    columns = encoded.data.table
    drop = columns.column("drop").to_numpy()
    kept = np.flatnonzero(drop == KEEP)
    src_unk, trg_unk = (
        pc.sum(pc.equal(pc.list_flatten(columns.column(side).take(kept)), UNK)).as_py() or 0
        for side in ("src_ids", "trg_ids"))
    stats = describe_train(drop, columns.column("src_len").to_numpy()[kept],
                           columns.column("trg_len").to_numpy()[kept], (src_unk, trg_unk))
    if len(kept) == 0:
        dropped = {name: count for name, count in stats["dropped"].items() if count}
        reasons = ", ".join(f"{count:,} {name}" for name, count in dropped.items())
        limits = " or ".join(FILTER_KEYS[name] for name in dropped if name in FILTER_KEYS)
        raise DataError(f"data.train: the training filter dropped all {len(drop):,} pairs "
                        f"({reasons})" + (f"; raise {limits}" if limits else ""))
    train = encoded if len(kept) == len(encoded) else encoded.select(kept)
    train.remove_columns(["drop"]).save_to_disk(str(out / "train"))
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Validation and test sets
# --------------------------------------------------------------------------------------------


def _read_eval_set(name: str, corpus: Corpus, data: DataConfig) -> tuple[list[str], list[str]]:
    """The source and target sentences of a validation or test corpus."""
    where = "data.valid" if name == "valid" else f"data.test.{name}"
    src_text, trg_text = [], []
    for src, trg in keyed_pairs(where, corpus, data):
        src_text.append(src)
        trg_text.append(trg)
    return src_text, trg_text


def _eval_set(name: str, src_text: list[str], trg_text: list[str],
              tokenizer: Tokenizer) -> EvalSet:
    return EvalSet(name, src_text, trg_text, tokenizer.encode_src(src_text),
                   tokenizer.encode_trg(trg_text))


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Turn ``datasets``' own progress bars on or off for a block, then restore them."""
    was_enabled = datasets.is_progress_bar_enabled()
    _set_progress_bars(show)
    try:
        yield
    finally:
        _set_progress_bars(was_enabled)


def _set_progress_bars(enabled: bool) -> None:
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()

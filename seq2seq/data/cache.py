"""``prepare``: tokenizer, then the encoded, filtered, memory-mapped Arrow cache of the corpus.

:func:`prepare_data` runs in four steps:

1. Fingerprint the training corpus: sizes and mtimes of its files (a hash of its content for
   hub datasets and the generated task).
2. Reuse the tokenizer in ``<output_dir>/tokenizer`` and the training cache when both were built
   from the same inputs; then nothing is read.
3. Otherwise stream the corpus once into an Arrow file, train the SentencePiece tokenizer on a
   uniform sample of ``tokenizer.input_sentence_size`` pairs of it (if it must be retrained),
   encode it with a batched multi-process ``datasets.map``, and drop the pairs that are empty,
   too long or too unbalanced (training only), counted per reason. The result is saved under
   ``data.cache_dir`` (default ``<output_dir>/cache``) in a directory named after the hash of
   its inputs, built in a temporary directory and renamed into place when complete. Older
   caches in the run's own cache directory are then deleted (a shared ``data.cache_dir`` is
   never pruned).
4. Encode the validation and test sets, unfiltered, keeping their raw text as references.

Cached training rows have ``src_ids`` and ``trg_ids`` (int32 subword ids without BOS/EOS) and
``src_len`` / ``trg_len``. Memory stays flat whatever the corpus size: pairs are streamed in
batches and the cache is memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from seq2seq.config import Corpus, DataConfig, Recipe
from seq2seq.data.corpus import DataError, check_corpus, read_pairs, resolve_path
from seq2seq.tokenizer import Tokenizer, load_if_current, tokenizer_hash, train_tokenizer

CACHE_VERSION = 1  # bump when the cached columns or the filter rules change
ENCODE_BATCH = 10_000  # pairs per ``map`` call: large enough that SentencePiece dominates
SAMPLE_SEED = 0  # the tokenizer's training sample depends on the data only, not on the run

# Why a training pair was dropped; 0 keeps it. Earlier reasons win when several apply.
KEEP, EMPTY, SRC_TOO_LONG, TRG_TOO_LONG, RATIO = range(5)
DROP_REASONS = {EMPTY: "empty", SRC_TOO_LONG: "src_too_long", TRG_TOO_LONG: "trg_too_long",
                RATIO: "ratio"}
FILTER_KEYS = {"src_too_long": "data.max_src_tokens", "trg_too_long": "data.max_trg_tokens",
               "ratio": "data.max_length_ratio"}  # the recipe key behind each reason

ENCODED_FEATURES = datasets.Features({
    "src_ids": datasets.List(datasets.Value("int32")),
    "trg_ids": datasets.List(datasets.Value("int32")),
    "src_len": datasets.Value("int32"),
    "trg_len": datasets.Value("int32"),
    "drop": datasets.Value("int8"),
})


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
        stats: counts and length statistics (see :func:`format_stats`).
        cache_dir: the directory holding the training cache.
    """

    tokenizer: Tokenizer
    train: datasets.Dataset
    valid: EvalSet
    tests: dict[str, EvalSet]
    stats: dict
    cache_dir: Path

    def train_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) source and (N,) target lengths of the training pairs (without EOS)."""
        table = self.train.data.table
        return (table.column("src_len").to_numpy().astype(np.int64),
                table.column("trg_len").to_numpy().astype(np.int64))


def prepare_data(recipe: Recipe, show_progress: bool = True) -> PreparedData:
    """Train or reuse the tokenizer and build or reuse the encoded training cache.

    Args:
        recipe: the whole recipe (data, tokenizer and output_dir are read).
        show_progress: tqdm bars on stderr.

    Returns:
        The prepared data; ``stats`` tells what was read, kept and dropped.

    Raises:
        DataError: a corpus cannot be read.
        Seq2SeqError: the tokenizer cannot be trained (e.g. vocabulary too large).
    """
    data = recipe.data
    out_dir = Path(recipe.output_dir)
    _check_before_writing(recipe)
    with _progress_bars(show_progress):
        # Validation and test sets are small: read them first, so that a bad line there is
        # reported before the (long) tokenizer training and cache build, not after.
        eval_texts = {"valid": _read_eval_set("valid", data.valid, data)}
        eval_texts.update({name: _read_eval_set(name, corpus, data)
                           for name, corpus in data.test.items()})
        fingerprint = _corpus_fingerprint(data.train, data, show_progress)
        tokenizer_dir = out_dir / "tokenizer"
        tokenizer = load_if_current(recipe.tokenizer, fingerprint, data.src_lang,
                                    data.trg_lang, tokenizer_dir)
        tokenizer_reused = tokenizer is not None
        cache_dir = None
        if tokenizer is not None:
            cache_dir = _cache_root(data, out_dir) / _cache_name(fingerprint, tokenizer, data)
        cache_reused = cache_dir is not None and cache_dir.is_dir()
        if not cache_reused:
            tokenizer, cache_dir = _build(recipe, fingerprint, tokenizer, show_progress)
            if not data.cache_dir:
                _remove_stale_caches(cache_dir, show_progress)
        train = datasets.load_from_disk(str(cache_dir / "train"))
        train_stats = json.loads((cache_dir / "stats.json").read_text())
        valid = _eval_set("valid", *eval_texts.pop("valid"), tokenizer)
        tests = {name: _eval_set(name, *texts, tokenizer) for name, texts in eval_texts.items()}
    stats = {
        "tokenizer": {"joint": tokenizer.joint, "src_vocab": tokenizer.src_vocab_size,
                      "trg_vocab": tokenizer.trg_vocab_size, "reused": tokenizer_reused,
                      "path": str(tokenizer_dir)},
        "cache": {"reused": cache_reused, "path": str(cache_dir)},
        "train": train_stats,
        "valid": _eval_stats(valid),
        "tests": {name: _eval_stats(test) for name, test in tests.items()},
    }
    return PreparedData(tokenizer, train, valid, tests, stats, cache_dir)


def _check_before_writing(recipe: Recipe) -> None:
    """Report a missing corpus file or an unusable output directory before anything is written."""
    data = recipe.data
    _check_directory(Path(recipe.output_dir), "output_dir")
    if data.cache_dir:
        _check_directory(_cache_root(data, Path(recipe.output_dir)), "data.cache_dir")
    corpora = [("data.train", data.train), ("data.valid", data.valid)]
    corpora += [(f"data.test.{name}", corpus) for name, corpus in data.test.items()]
    for where, corpus in corpora:
        try:
            check_corpus(corpus, data)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None


def _check_directory(path: Path, key: str) -> None:
    """``path`` is a directory or can be created as one: no file stands on its way."""
    for ancestor in [path, *path.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise DataError(f"{key} {path}: {ancestor} exists and is not a directory")
            return


# --------------------------------------------------------------------------------------------
# Reading and fingerprinting
# --------------------------------------------------------------------------------------------


def _pairs(where: str, corpus: Corpus, data: DataConfig) -> Iterator[tuple[str, str]]:
    """``read_pairs`` with errors prefixed by the recipe key of the corpus."""
    try:
        yield from read_pairs(corpus, data)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


def _corpus_fingerprint(corpus: Corpus, data: DataConfig, show_progress: bool) -> str:
    """A fingerprint of the corpus: sizes and mtimes of its files, else a hash of its pairs.

    Stat-based for files (text, tsv, jsonl, hf save_to_disk directories) so an unchanged
    corpus of tens of millions of pairs is not read at all; content-based for hub datasets
    and the generated task.
    """
    files = []
    if corpus.format == "text" and corpus.src and corpus.trg:
        files = [resolve_path(corpus.src, data), resolve_path(corpus.trg, data)]
    elif corpus.format in ("tsv", "jsonl") and corpus.path:
        files = [resolve_path(corpus.path, data)]
    elif corpus.format == "hf" and corpus.path:
        root = resolve_path(corpus.path, data)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    if files:
        described = []
        for path in files:
            try:
                info = path.stat()
            except OSError:
                break  # let the reader report the missing file in its own words
            described.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
        else:
            key = {"format": corpus.format, "split": corpus.split, "files": described,
                   "src_field": corpus.src_field, "trg_field": corpus.trg_field,
                   "languages": [data.src_lang, data.trg_lang]}
            return "stat:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return "content:" + _content_hash(_pairs("data.train", corpus, data), show_progress)


def _content_hash(pairs: Iterator[tuple[str, str]], show_progress: bool) -> str:
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


def _cache_name(fingerprint: str, tokenizer: Tokenizer, data: DataConfig) -> str:
    """The training cache's directory name: a hash of everything its content depends on."""
    key = {"version": CACHE_VERSION, "corpus": fingerprint, "tokenizer": tokenizer.fingerprint,
           "max_src_tokens": data.max_src_tokens, "max_trg_tokens": data.max_trg_tokens,
           "max_length_ratio": data.max_length_ratio}
    return "train-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _cache_root(data: DataConfig, out_dir: Path) -> Path:
    if data.cache_dir:
        return Path(os.path.expandvars(os.path.expanduser(data.cache_dir)))
    return out_dir / "cache"


def _remove_stale_caches(current: Path, show_progress: bool) -> None:
    """Delete the other training caches in the run's own cache directory.

    Only this run reads ``<output_dir>/cache``, and a cache there that is not the current one
    was built from inputs the run no longer has (an older corpus, other filter settings), so
    it is dead weight: for a large corpus, gigabytes per change. A shared ``data.cache_dir``
    is never pruned, since other runs may use its caches. Temporary ``.train-*`` directories
    are left alone: one may be another process's build in progress.
    """
    for stale in sorted(current.parent.glob("train-*")):
        if stale != current and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            if show_progress:
                print(f"removed the stale training cache {stale}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Building: one read into Arrow, tokenizer from a sample of it, encode, filter, save
# --------------------------------------------------------------------------------------------


def _build(recipe: Recipe, fingerprint: str, tokenizer: Tokenizer | None,
           show_progress: bool) -> tuple[Tokenizer, Path]:
    """Build the training cache (training the tokenizer first when ``tokenizer`` is None).

    Everything is written under a temporary directory that is renamed into place when
    complete, so an interrupted build leaves nothing that looks finished.
    """
    data = recipe.data
    out_dir = Path(recipe.output_dir)
    cache_root = _cache_root(data, out_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=cache_root))
    try:
        work = tmp / "work"  # intermediate Arrow files; deleted at the end
        # The corpus is read once, into Arrow; the tokenizer sample and the encoder read that.
        raw = _read_into_arrow(data, work, show_progress)
        _check_some_text(raw, data)
        if tokenizer is None:
            cfg = recipe.tokenizer
            if show_progress:  # SentencePiece reports no progress; say what the wait is
                sample = min(len(raw), cfg.input_sentence_size or len(raw))
                print(f"training the {cfg.type} tokenizer (vocabulary {cfg.vocab_size:,}) on "
                      f"{sample:,} sampled pairs", file=sys.stderr, flush=True)
            wanted = tokenizer_hash(cfg, fingerprint, data.src_lang, data.trg_lang)
            tokenizer = train_tokenizer(cfg, _sample_pairs(raw, cfg.input_sentence_size),
                                        out_dir / "tokenizer", data_hash=wanted)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_into_arrow(data: DataConfig, work: Path, show_progress: bool) -> datasets.Dataset:
    """Stream the training pairs into an Arrow file; return it as a ``src``/``trg`` dataset.

    Record batches of ``ENCODE_BATCH`` pairs are written as they are read (constant memory);
    the file is then memory-mapped by ``Dataset.from_file``. This is ~5x cheaper than
    ``Dataset.from_generator``, which encodes every example through Python.
    """
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    path = work / "raw.arrow"
    schema = pa.schema([("src", pa.string()), ("trg", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(desc="reading train", unit=" pairs", unit_scale=True,
                 disable=not show_progress) as bar:
        src, trg = [], []

        def flush() -> None:
            writer.write_batch(pa.record_batch([pa.array(src, pa.string()),
                                                pa.array(trg, pa.string())], schema=schema))
            bar.update(len(src))
            src.clear()
            trg.clear()

        for src_line, trg_line in _pairs("data.train", data.train, data):
            src.append(src_line)
            trg.append(trg_line)
            if len(src) == ENCODE_BATCH:
                flush()
        flush()
    return datasets.Dataset.from_file(str(path))


def _check_some_text(raw: datasets.Dataset, data: DataConfig) -> None:
    """Refuse a training corpus without one pair holding text on both sides (else the tokenizer
    fails with a SentencePiece message that names nothing)."""
    import pyarrow.compute as pc

    table = raw.data.table
    both = pc.and_(pc.greater(pc.utf8_length(table.column("src")), 0),
                   pc.greater(pc.utf8_length(table.column("trg")), 0))
    if not pc.any(both).as_py():
        corpus = data.train
        files = [f for f in (corpus.src, corpus.trg, corpus.path, corpus.hf_name) if f]
        where = ", ".join(str(resolve_path(f, data)) if f != corpus.hf_name else f
                          for f in files) or corpus.format
        raise DataError(f"data.train: {where}: no sentence pair has text on both sides "
                        f"({len(raw):,} pairs read)")


def _sample_pairs(raw: datasets.Dataset, size: int) -> Iterator[tuple[str, str]]:
    """A uniform random sample of ``size`` pairs (all of them when size is 0 or larger)."""
    if 0 < size < len(raw):
        rows = np.random.default_rng(SAMPLE_SEED).choice(len(raw), size, replace=False)
        raw = raw.select(np.sort(rows))  # sorted: sequential reads of the memory map
    for batch in raw.iter(batch_size=ENCODE_BATCH):
        yield from zip(batch["src"], batch["trg"])


def _encode_and_filter(raw: datasets.Dataset, tokenizer: Tokenizer, data: DataConfig,
                       out: Path) -> None:
    """Encode every pair, drop what the training filter rejects, save to ``out``."""
    # Worker processes only pay off beyond a batch or two (each costs ~1 s to start).
    num_proc = data.num_proc if data.num_proc > 1 and len(raw) > ENCODE_BATCH else None
    encoded = raw.map(
        _encode_rows, batched=True, batch_size=ENCODE_BATCH, num_proc=num_proc,
        remove_columns=["src", "trg"], features=ENCODED_FEATURES, desc="encoding train",
        fn_kwargs={"tokenizer": tokenizer, "max_src_tokens": data.max_src_tokens,
                   "max_trg_tokens": data.max_trg_tokens,
                   "max_length_ratio": data.max_length_ratio})
    columns = encoded.data.table
    drop = columns.column("drop").to_numpy()
    kept = np.flatnonzero(drop == KEEP)
    stats = _train_stats(drop, columns.column("src_len").to_numpy()[kept],
                         columns.column("trg_len").to_numpy()[kept])
    if len(kept) == 0:
        dropped = {name: count for name, count in stats["dropped"].items() if count}
        reasons = ", ".join(f"{count:,} {name}" for name, count in dropped.items())
        limits = " or ".join(FILTER_KEYS[name] for name in dropped if name in FILTER_KEYS)
        raise DataError(f"data.train: the training filter dropped all {len(drop):,} pairs "
                        f"({reasons})" + (f"; raise {limits}" if limits else ""))
    train = encoded if len(kept) == len(encoded) else encoded.select(kept)
    train.remove_columns(["drop"]).save_to_disk(str(out / "train"))
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def _encode_rows(batch: dict[str, list], tokenizer: Tokenizer, max_src_tokens: int,
                 max_trg_tokens: int, max_length_ratio: float) -> dict[str, list]:
    """Encode a batch of pairs and mark the ones the training filter drops."""
    src_ids = tokenizer.encode_src(batch["src"])
    trg_ids = tokenizer.encode_trg(batch["trg"])
    src_len = np.array([len(ids) for ids in src_ids], dtype=np.int32)
    trg_len = np.array([len(ids) for ids in trg_ids], dtype=np.int32)
    drop = np.zeros(len(src_ids), dtype=np.int8)
    # Assigned from the weakest reason to the strongest, so the strongest one is recorded.
    if max_length_ratio > 0:
        longer, shorter = np.maximum(src_len, trg_len), np.maximum(np.minimum(src_len, trg_len), 1)
        drop[longer > max_length_ratio * shorter] = RATIO
    drop[trg_len > max_trg_tokens] = TRG_TOO_LONG
    drop[src_len > max_src_tokens] = SRC_TOO_LONG
    drop[(src_len == 0) | (trg_len == 0)] = EMPTY
    return {"src_ids": src_ids, "trg_ids": trg_ids, "src_len": src_len, "trg_len": trg_len,
            "drop": drop}


def _train_stats(drop: np.ndarray, src_len: np.ndarray, trg_len: np.ndarray) -> dict:
    """Counts per drop reason and length statistics of the kept pairs."""
    counts = np.bincount(drop, minlength=len(DROP_REASONS) + 1)
    return {"read": len(drop), "kept": int(counts[KEEP]),
            "dropped": {name: int(counts[code]) for code, name in DROP_REASONS.items()},
            **_length_stats(src_len, trg_len)}


# --------------------------------------------------------------------------------------------
# Validation and test sets
# --------------------------------------------------------------------------------------------


def _read_eval_set(name: str, corpus: Corpus, data: DataConfig) -> tuple[list[str], list[str]]:
    """The source and target sentences of a validation or test corpus."""
    where = "data.valid" if name == "valid" else f"data.test.{name}"
    src_text, trg_text = [], []
    for src, trg in _pairs(where, corpus, data):
        src_text.append(src)
        trg_text.append(trg)
    return src_text, trg_text


def _eval_set(name: str, src_text: list[str], trg_text: list[str],
              tokenizer: Tokenizer) -> EvalSet:
    return EvalSet(name, src_text, trg_text, tokenizer.encode_src(src_text),
                   tokenizer.encode_trg(trg_text))


def _eval_stats(eval_set: EvalSet) -> dict:
    src_len = np.array([len(ids) for ids in eval_set.src_ids], dtype=np.int64)
    trg_len = np.array([len(ids) for ids in eval_set.trg_ids], dtype=np.int64)
    return {"pairs": len(eval_set), **_length_stats(src_len, trg_len)}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _length_stats(src_len: np.ndarray, trg_len: np.ndarray) -> dict:
    def percentiles(lens: np.ndarray) -> dict:
        if len(lens) == 0:
            return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
        p50, p90, p99 = np.percentile(lens, [50, 90, 99], method="nearest")
        return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lens.max())}

    return {"src_tokens": int(src_len.sum()), "trg_tokens": int(trg_len.sum()),
            "src_len": percentiles(src_len), "trg_len": percentiles(trg_len)}


def format_stats(stats: dict) -> str:
    """A human-readable summary of :func:`prepare_data`'s ``stats``."""
    tok, train = stats["tokenizer"], stats["train"]
    vocab = (f"joint vocabulary {tok['src_vocab']:,}" if tok["joint"] else
             f"vocabularies {tok['src_vocab']:,} (source) / {tok['trg_vocab']:,} (target)")
    lines = [
        f"tokenizer: {vocab}, {'reused' if tok['reused'] else 'trained'} ({tok['path']})",
        f"cache: {'reused' if stats['cache']['reused'] else 'built'} ({stats['cache']['path']})",
        (f"train: {train['read']:,} pairs read, {train['kept']:,} kept, "
         f"{train['read'] - train['kept']:,} dropped"),
    ]
    labels = {"empty": "empty", "src_too_long": "too long source",
              "trg_too_long": "too long target", "ratio": "length ratio"}
    lines.append("  dropped: " + ", ".join(f"{labels[k]} {v:,}"
                                           for k, v in train["dropped"].items()))
    rows = [("train", train)] + [("valid", stats["valid"])] + [
        (f"test {name}", test) for name, test in stats["tests"].items()]
    width = max(len(name) for name, _ in rows)
    lines.append(f"{'':{width}}  {'pairs':>11}  {'src tokens':>12}  {'trg tokens':>12}  "
                 f"src len p50/p90/p99/max  trg len p50/p90/p99/max")
    for name, row in rows:
        pairs = row.get("kept", row.get("pairs", 0))
        lines.append(f"{name:{width}}  {pairs:>11,}  {row['src_tokens']:>12,}  "
                     f"{row['trg_tokens']:>12,}  {_quartet(row['src_len']):>23}  "
                     f"{_quartet(row['trg_len']):>23}")
    return "\n".join(lines)


def _quartet(p: dict) -> str:
    return f"{p['p50']}/{p['p90']}/{p['p99']}/{p['max']}"


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

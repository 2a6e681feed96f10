"""What identifies a training corpus, and whether a resumed run still has the same one.

A corpus of files is identified by the paths, sizes and modification times of its files (so an
unchanged corpus of tens of millions of pairs is not read again); a hub dataset or the generated
task by a hash of its pairs. A checkpoint records that fingerprint with the tokenizer's, and a
resume on other data, or with another tokenizer, is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
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
    """A fingerprint of the corpus: sizes and mtimes of its files, else a hash of its pairs.

    Stat-based for files (text, tsv, jsonl, hf save_to_disk directories) so an unchanged
    corpus of tens of millions of pairs is not read at all; content-based for hub datasets
    and the generated task.
    """
    described = corpus_files(corpus, data)
    if described and None not in described:  # else the reader reports the missing file
        key = {"format": corpus.format, "split": corpus.split, "files": described,
               "src_field": corpus.src_field, "trg_field": corpus.trg_field,
               "languages": [data.src_lang, data.trg_lang]}
        return "stat:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return "content:" + content_hash(keyed_pairs("data.train", corpus, data), show_progress)


def corpus_files(corpus: Corpus, data: DataConfig) -> list:
    """``[path, size, mtime_ns]`` of each file of a file-based corpus (None for one that
    cannot be read); empty for hub datasets and the generated task."""
    files = []
    if corpus.format == "text" and corpus.src and corpus.trg:
        files = [resolve_path(corpus.src, data), resolve_path(corpus.trg, data)]
    elif corpus.format in ("tsv", "jsonl") and corpus.path:
        files = [resolve_path(corpus.path, data)]
    elif corpus.format == "hf" and corpus.path:
        root = resolve_path(corpus.path, data)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    described = []
    for path in files:
        try:
            info = path.stat()
        except OSError:
            described.append(None)
            continue
        described.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    return described


def current_inputs(recipe: Recipe, show_progress: bool) -> tuple[str, Tokenizer | None]:
    """The training corpus's fingerprint, and the run's tokenizer (``<output_dir>/tokenizer``)
    if it was trained on that corpus with the recipe's settings, else None. Writes nothing."""
    data = recipe.data
    fingerprint = corpus_fingerprint(data.train, data, show_progress)
    tokenizer = load_if_current(recipe.tokenizer, fingerprint, data.src_lang, data.trg_lang,
                                Path(recipe.output_dir) / "tokenizer")
    return fingerprint, tokenizer


def check_same_inputs(expect: dict, recipe: Recipe, fingerprint: str,
                      tokenizer: Tokenizer | None) -> None:
    """Refuse to resume on a training corpus or tokenizer other than the checkpoint's.

    Args:
        expect: the checkpoint's ``fingerprints``.
        fingerprint, tokenizer: :func:`current_inputs` of the resumed run.

    Raises:
        DataError: naming what changed and what to do, before anything is written.
    """
    out_dir = Path(recipe.output_dir)
    if expect.get("train_corpus") not in (None, fingerprint):
        was = {f[0]: f[1:] for f in expect.get("train_files") or [] if f}
        now = {f[0]: f[1:] for f in corpus_files(recipe.data.train, recipe.data) if f}
        changed = sorted(set(was) ^ set(now)) + sorted(p for p in set(was) & set(now)
                                                       if was[p] != now[p])
        what = (f"changed or moved: {', '.join(changed)}" if changed
                else "its content differs")
        raise DataError(
            f"cannot resume {out_dir}: the training corpus is not the one its checkpoint was "
            f"trained on ({what}); the tokenizer and the encoded corpus would differ from what "
            "the weights learned. Use a new output_dir, or restore the data (and data.root)")
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

"""Subword regularisation: the training pairs re-tokenised by sampling, once per epoch.

Kudo (2018) trains on a different segmentation of each sentence every time it is seen, drawn
from the unigram model's lattice (``alpha`` smooths the distribution, ``nbest`` limits the
candidates; for a BPE model ``alpha`` is BPE-dropout's merge dropout, Provilkov et al. 2020).
The encoded cache keeps the deterministic segmentation, which decides which pairs the length
filters keep; each epoch decodes those pairs back to text and encodes them again with
sampling. Validation, test sets and ``translate`` keep the deterministic segmentation.

The draw is seeded by (run seed, epoch) and made on one thread, which repeats it within one
process; but sentencepiece 0.2 draws other segmentations for the same seed in another process.
So :func:`shared_epoch` has the main rank draw each epoch once, keep it in the run
directory and send it to the other ranks: the ranks of a process group train on one partition
of one draw, and a run resumed in the same directory on the segmentations it had. Runs in two
directories draw differently (sentencepiece offers no seed that holds across processes), and so
does a resume from a checkpoint copied elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from seq2seq import distributed as dist
from seq2seq.errors import warn
from seq2seq.files import write_bytes
from seq2seq.tokenizer import Tokenizer

ENCODE_CHUNK = 10_000


def sampled_epoch(train: Any, tokenizer: Tokenizer, alpha: float, nbest: int, seed: int,
                  epoch: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The training pairs of ``epoch``, each side segmented by sampling.

    Args:
        train: the encoded training pairs (a ``datasets.Dataset`` with ``src_ids`` and
            ``trg_ids``), in their deterministic segmentation.
        alpha: smoothing of the sampling distribution (unigram) or merge dropout (BPE).
        nbest: sample from the best ``nbest`` segmentations (-1: all of them).

    Returns:
        A table with ``src_ids`` and ``trg_ids`` (what :func:`seq2seq.data.batching.collate`
        reads) and the (N,) source and target lengths without EOS.
    """
    table = train.data.table
    columns = {}
    for side, encode, decode in (("src", tokenizer.encode_src_sampled, tokenizer.decode_src),
                                 ("trg", tokenizer.encode_trg_sampled, tokenizer.decode_trg)):
        # One seed per (run, epoch, side); the C++ generator is global, so draw on one thread.
        spm.set_random_generator_seed(_seed(seed, epoch, side))
        ids = table.column(f"{side}_ids").to_pylist()
        rows = []
        for start in range(0, len(ids), ENCODE_CHUNK):
            texts = decode(ids[start:start + ENCODE_CHUNK])
            rows += encode(texts, alpha, nbest)
        columns[f"{side}_ids"] = pa.array(rows, type=pa.list_(pa.int32()))
    lengths = [np.asarray(columns[f"{side}_ids"].value_lengths(), dtype=np.int64)
               for side in ("src", "trg")]
    return pa.table(columns), lengths[0], lengths[1]


def shared_epoch(directory: Path, data: Any, alpha: float, nbest: int, seed: int,
                 epoch: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """:func:`sampled_epoch` of ``data`` (:class:`~seq2seq.data.cache.PreparedData`), drawn
    by the main rank and sent to every rank (a rank on another node need not see the run
    directory).

    The main rank keeps each draw in ``directory`` as ``epoch-<e>.arrow``, with a key of what
    it was drawn from (corpus, tokenizer, cache, pair count and the sampling settings): a run
    resumed from a checkpoint of this epoch or the one before reads its draw back; a file of
    other data or settings, or one that cannot be read, is drawn again. Older epochs' files
    are removed once the next epoch's is written.
    """
    key = _draw_key(data, alpha, nbest, seed, epoch)
    path = directory / f"epoch-{epoch}.arrow"
    payload = None
    if dist.is_main():
        payload = _stored(path, key)
        if payload is None:
            table = sampled_epoch(data.train, data.tokenizer, alpha, nbest, seed, epoch)[0]
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, table.schema.with_metadata({KEY: key})) as out:
                out.write_table(table)
            payload = sink.getvalue().to_pybytes()
            directory.mkdir(exist_ok=True)
            write_bytes(path, payload)  # atomically, synced
        for old in directory.glob("epoch-*.arrow"):
            if old.stem.removeprefix("epoch-").isdigit() and int(old.stem[6:]) < epoch - 1:
                old.unlink()
    payload = dist.broadcast_object(payload)
    table = pa.ipc.open_file(pa.BufferReader(payload)).read_all()
    lengths = [np.asarray(table.column(f"{side}_ids").combine_chunks().value_lengths(),
                          dtype=np.int64) for side in ("src", "trg")]
    return table, lengths[0], lengths[1]


KEY = b"seq2seq.draw"  # the schema metadata of a stored draw: :func:`_draw_key`


def _draw_key(data: Any, alpha: float, nbest: int, seed: int, epoch: int) -> bytes:
    what = {"corpus": data.fingerprints.get("train_corpus"),
            "tokenizer": data.fingerprints.get("tokenizer"), "cache": Path(data.cache_dir).name,
            "pairs": len(data.train), "alpha": alpha, "nbest": nbest, "seed": seed,
            "epoch": epoch}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest(
        ).encode()


def _stored(path: Path, key: bytes) -> bytes | None:
    """The bytes of the draw at ``path`` if it was drawn with ``key``, else None."""
    if not path.is_file():
        return None
    try:
        payload = path.read_bytes()
        stored = pa.ipc.open_file(pa.BufferReader(payload)).schema.metadata or {}
    except (OSError, pa.ArrowException) as error:
        warn(f"{path}: cannot be read ({error}); drawing its epoch again")
        return None
    return payload if stored.get(KEY) == key else None


def _seed(seed: int, epoch: int, side: str) -> int:
    """A 32-bit seed for one (run seed, epoch, side): different epochs draw differently."""
    return (seed * 1_000_003 + epoch * 2 + (side == "trg")) % 2**32

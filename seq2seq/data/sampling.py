"""Subword regularisation: the training pairs re-tokenised by sampling, once per epoch.

Kudo (2018) trains on a different segmentation of each sentence every time it is seen, drawn
from the unigram model's lattice (``alpha`` smooths the distribution, ``nbest`` limits the
candidates; for a BPE model ``alpha`` is BPE-dropout's merge dropout, Provilkov et al. 2020).
The encoded cache keeps the deterministic segmentation, which decides which pairs the length
filters keep; each epoch decodes those pairs back to text and encodes them again with
sampling. Validation, test sets and ``translate`` keep the deterministic segmentation.

The draw is seeded by (run seed, epoch, rank) and made on one thread, which repeats it within
one process; but sentencepiece 0.2 draws other segmentations for the same seed in another
process. So :func:`shared_epoch` has each rank draw an equal share of the pairs, every rank
receive all shares, and the main rank keep the epoch in the run directory: the ranks of a
process group train on one partition of one draw, and a run resumed in the same directory on
the segmentations it had. Runs in two directories draw differently (sentencepiece offers no
seed that holds across processes), and so does a resume from a checkpoint copied elsewhere.
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
                  epoch: int, share: tuple[int, int] = (0, 1)
                  ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The training pairs of ``epoch``, each side segmented by sampling.

    Args:
        train: the encoded training pairs (a ``datasets.Dataset`` with ``src_ids`` and
            ``trg_ids``), in their deterministic segmentation.
        alpha: smoothing of the sampling distribution (unigram) or merge dropout (BPE).
        nbest: sample from the best ``nbest`` segmentations (-1: all of them).
        share: ``(k, n)``: only the ``k``-th of ``n`` consecutive equal shares of the pairs
            (:func:`share_bounds`), drawn with a seed of its own.

    Returns:
        A table with ``src_ids`` and ``trg_ids`` (what :func:`seq2seq.data.batching.collate`
        reads) and the (N,) source and target lengths without EOS.
    """
    table = train.data.table
    start, stop = share_bounds(table.num_rows, *share)
    table = table.slice(start, stop - start)
    columns = {}
    for side, encode, decode in (("src", tokenizer.encode_src_sampled, tokenizer.decode_src),
                                 ("trg", tokenizer.encode_trg_sampled, tokenizer.decode_trg)):
        # One seed per (run, epoch, side, share); the C++ generator is global: one thread.
        spm.set_random_generator_seed(_seed(seed, epoch, side, share[0]))
        ids = table.column(f"{side}_ids").to_pylist()
        rows = []
        for first in range(0, len(ids), ENCODE_CHUNK):
            texts = decode(ids[first:first + ENCODE_CHUNK])
            rows += encode(texts, alpha, nbest)
        columns[f"{side}_ids"] = pa.array(rows, type=pa.list_(pa.int32()))
    table = pa.table(columns)
    return (table, *_lengths(table))


def share_bounds(n: int, k: int, shares: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the ``k``-th of ``shares`` consecutive shares of ``n``."""
    return k * n // shares, (k + 1) * n // shares


def shared_epoch(directory: Path, data: Any, alpha: float, nbest: int, seed: int,
                 epoch: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """:func:`sampled_epoch` of ``data`` (:class:`~seq2seq.data.cache.PreparedData`), the
    same on every rank (a rank on another node need not see the run directory).

    Each rank draws an equal share of the pairs and every rank receives all shares, so the
    ranks wait for each other about as long as one share takes. The main rank keeps each draw
    in ``directory`` as ``epoch-<e>.arrow``, with a key of what it was drawn from (corpus,
    tokenizer, cache, pair count and the sampling settings): a run resumed from a checkpoint
    of this epoch or the one before reads its draw back, whatever its number of ranks; a file
    of other data or settings, or one that cannot be read, is drawn again. Older epochs' files
    are removed once the next epoch's is written.
    """
    key = _draw_key(data, alpha, nbest, seed, epoch)
    path = directory / f"epoch-{epoch}.arrow"
    payload = dist.broadcast_object(_stored(path, key) if dist.is_main() else None)
    if payload is not None:
        table = pa.ipc.open_file(pa.BufferReader(payload)).read_all()
        return (table, *_lengths(table))
    share = sampled_epoch(data.train, data.tokenizer, alpha, nbest, seed, epoch,
                          (dist.rank(), dist.world_size()))[0]
    shares = dist.all_gather_objects(_bytes(share))
    table = pa.concat_tables([_read(part) for part in shares]).combine_chunks()
    if dist.is_main():
        directory.mkdir(exist_ok=True)
        write_bytes(path, _bytes(table, {KEY: key}))  # atomically, synced
        for old in directory.glob("epoch-*.arrow"):
            if old.stem.removeprefix("epoch-").isdigit() and int(old.stem[6:]) < epoch - 1:
                old.unlink()
    return (table, *_lengths(table))


def _bytes(table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    """``table`` in Arrow's IPC file format, with ``metadata`` in its schema."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema.with_metadata(metadata or {})) as out:
        out.write_table(table)
    return sink.getvalue().to_pybytes()


def _read(payload: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(payload)).read_all()


def _lengths(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The (N,) source and target lengths of a table of ``src_ids`` and ``trg_ids``."""
    return tuple(np.asarray(table.column(f"{side}_ids").combine_chunks().value_lengths(),
                            dtype=np.int64) for side in ("src", "trg"))


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


def _seed(seed: int, epoch: int, side: str, share: int = 0) -> int:
    """A 32-bit seed for one (run seed, epoch, side, share): different epochs draw
    differently."""
    return (seed * 1_000_003 + epoch * 2 + (side == "trg") + share * 7_919) % 2**32

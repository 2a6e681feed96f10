"""Subword regularisation: the training pairs re-tokenised by sampling, once per epoch.

Kudo (2018) trains on a different segmentation of each sentence every time it is seen, drawn
from the unigram model's lattice (``alpha`` smooths the distribution, ``nbest`` limits the
candidates; for a BPE model ``alpha`` is BPE-dropout's merge dropout, Provilkov et al. 2020).
The encoded cache keeps the deterministic segmentation, which decides which pairs the length
filters keep; each epoch decodes those pairs back to text and encodes them again with
sampling. Validation, test sets and ``translate`` keep the deterministic segmentation.

The draw is seeded by (run seed, epoch) and made on one thread, which repeats it within one
process; but sentencepiece 0.2 draws other segmentations for the same seed in another process.
So :func:`shared_epoch` has the main rank draw each epoch once, write it into the run
directory and send it to the other ranks: the ranks of a process group train on one partition
of one draw, and a run resumed mid-epoch in the same directory on the segmentations it had.
Two fresh runs with the same seed draw differently (sentencepiece offers no seed that holds
across processes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from seq2seq import distributed as dist
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


def shared_epoch(directory: Path, train: Any, tokenizer: Tokenizer, alpha: float, nbest: int,
                 seed: int, epoch: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """:func:`sampled_epoch`, drawn by the main rank into ``directory`` (unless there already)
    and sent from there to every rank (a rank on another node need not see the run
    directory). The main rank keeps only this epoch's draw there."""
    path = directory / f"epoch-{epoch}-seed-{seed}-alpha-{alpha}-nbest-{nbest}.arrow"
    payload = None
    if dist.is_main():
        if not path.is_file():
            table = sampled_epoch(train, tokenizer, alpha, nbest, seed, epoch)[0]
            directory.mkdir(exist_ok=True)
            for old in directory.glob("epoch-*"):  # earlier epochs, an interrupted write
                old.unlink()
            partial = path.with_name(path.name + ".partial")
            with pa.OSFile(str(partial), "wb") as sink, \
                    pa.ipc.new_file(sink, table.schema) as out:
                out.write_table(table)
            os.replace(partial, path)
        payload = path.read_bytes()
    payload = dist.broadcast_object(payload)
    table = pa.ipc.open_file(pa.BufferReader(payload)).read_all()
    lengths = [np.asarray(table.column(f"{side}_ids").combine_chunks().value_lengths(),
                          dtype=np.int64) for side in ("src", "trg")]
    return table, lengths[0], lengths[1]


def _seed(seed: int, epoch: int, side: str) -> int:
    """A 32-bit seed for one (run seed, epoch, side): different epochs draw differently."""
    return (seed * 1_000_003 + epoch * 2 + (side == "trg")) % 2**32

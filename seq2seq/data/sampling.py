"""Subword regularisation: the training pairs re-tokenised by sampling, once per epoch.

Kudo (2018) trains on a different segmentation of each sentence every time it is seen, drawn
from the unigram model's lattice (``alpha`` smooths the distribution, ``nbest`` limits the
candidates; for a BPE model ``alpha`` is BPE-dropout's merge dropout, Provilkov et al. 2020).
The encoded cache keeps the deterministic segmentation, which decides which pairs the length
filters keep; each epoch decodes those pairs back to text and encodes them again with
sampling. The draw is seeded by (run seed, epoch) and made on one thread, so every rank, and a
run resumed mid-epoch, sees exactly the segmentations an uninterrupted run sees. Validation,
test sets and ``translate`` keep the deterministic segmentation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import sentencepiece as spm

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


def _seed(seed: int, epoch: int, side: str) -> int:
    """A 32-bit seed for one (run seed, epoch, side): different epochs draw differently."""
    return (seed * 1_000_003 + epoch * 2 + (side == "trg")) % 2**32

"""Length-bucketed token batches, deterministic for (seed, epoch), sharded by rank.

Training batches are bounded by *padded target tokens*: a batch of B pairs whose longest target
has T subwords costs ``B * (T + 1)`` (one EOS each) and must cost at most ``batch_tokens``. To
keep padding low, :func:`epoch_batches` shuffles the pairs, sorts large chunks of them by
length, cuts each chunk into batches and shuffles the batch order. Everything is drawn from a
generator seeded with (seed, epoch), so every rank computes the same epoch without talking to
the others, and a resumed run sees exactly the batches an uninterrupted run would.

An update consumes a *group* of ``world_size * accumulate`` batches. The number of batches is
made a multiple of that group size by halving the largest batches (a half respects the bound),
so every rank gets the same number of batches and no pair is dropped or repeated.
:func:`rank_steps` then gives each rank its micro-batches per update, from any resume step.

:func:`collate` turns a batch of rows of the encoded Arrow dataset into padded tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from seq2seq.errors import Seq2SeqError
from seq2seq.tokenizer import BOS, EOS, PAD

if TYPE_CHECKING:
    import datasets

SORT_CHUNK = 100_000  # pairs sorted together: large enough for little padding, still random


def epoch_batches(trg_lens: np.ndarray, src_lens: np.ndarray, batch_tokens: int,
                  batch_sentences: int, seed: int, epoch: int, group_size: int = 1,
                  sort_chunk: int = SORT_CHUNK) -> list[np.ndarray]:
    """The batches of one epoch, as arrays of row indices.

    Args:
        trg_lens: (N,) target lengths in subwords, without EOS.
        src_lens: (N,) source lengths in subwords (a secondary sort key: less source padding).
        batch_tokens: bound on ``batch size * (longest target + 1)``. A single pair longer
            than the bound forms a batch of its own.
        batch_sentences: bound on the batch size (0: none).
        seed, epoch: the batches are a pure function of these (and the lengths).
        group_size: ``world_size * accumulate``; the number of batches is a multiple of it.
        sort_chunk: pairs sorted by length together after the shuffle.

    Returns:
        Batches of int64 row indices; every index in ``range(N)`` occurs exactly once.

    Raises:
        Seq2SeqError: fewer pairs than the batch-count multiple needs (a tiny corpus, or
            batches of one sentence, with many ranks).
    """
    trg_lens = np.asarray(trg_lens, dtype=np.int64)
    src_lens = np.asarray(src_lens, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(trg_lens))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), sort_chunk):
        chunk = order[start:start + sort_chunk]
        # Sort by target length (the bound), then source length; ties keep the shuffled order.
        chunk = chunk[np.lexsort((src_lens[chunk], trg_lens[chunk]))]
        batches.extend(_cut(chunk, trg_lens[chunk] + 1, batch_tokens, batch_sentences))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return _split_to_multiple(batches, group_size, len(trg_lens))


def _cut(indices: np.ndarray, costs: np.ndarray, batch_tokens: int,
         batch_sentences: int) -> list[np.ndarray]:
    """Cut length-sorted ``indices`` (ascending ``costs`` = padded width) into bounded batches."""
    batches, start, n = [], 0, len(indices)
    max_size = batch_sentences if batch_sentences > 0 else n
    while start < n:
        # With ascending widths, taking k pairs costs k * costs[start + k - 1], which grows
        # with k: the largest k under the bound is one binary search away.
        window = costs[start:start + min(max_size, batch_tokens)]
        padded = np.arange(1, len(window) + 1) * window
        size = max(1, int(np.searchsorted(padded, batch_tokens, side="right")))
        batches.append(indices[start:start + size])
        start += size
    return batches


def _split_to_multiple(batches: list[np.ndarray], group_size: int,
                       n_pairs: int) -> list[np.ndarray]:
    """Halve the largest batches until the batch count is a multiple of ``group_size``."""
    target = -(-len(batches) // group_size) * group_size
    if target > n_pairs:
        raise Seq2SeqError(
            f"cannot cut {n_pairs} training pairs into a multiple of {group_size} batches "
            f"(world size x train.accumulate): the batch bounds need {len(batches)} and no "
            "batch may be empty; " + ("lower train.accumulate or use fewer ranks"
                                      if group_size > n_pairs else
                                      "raise train.batch_sentences or use fewer ranks"))
    while len(batches) < target:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        # Halves of a length-sorted batch: each is no wider and no larger than the whole.
        half = len(batches[i]) // 2
        batches[i:i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def rank_steps(batches: list[np.ndarray], rank: int, world_size: int, accumulate: int,
               start_step: int = 0) -> list[list[np.ndarray]]:
    """This rank's micro-batches for each update of the epoch.

    Update ``s`` uses the group ``batches[s*G:(s+1)*G]`` with ``G = world_size * accumulate``;
    rank ``r`` takes the slice ``[r*accumulate:(r+1)*accumulate]`` of it.

    Args:
        batches: the epoch from :func:`epoch_batches` (a multiple of G long).
        rank, world_size, accumulate: this process's place in the global batch.
        start_step: the first update to return (resuming mid-epoch).

    Returns:
        For each update from ``start_step`` on, a list of ``accumulate`` index arrays.
    """
    group = world_size * accumulate
    if len(batches) % group:
        raise ValueError(f"{len(batches)} batches is not a multiple of the group size {group}")
    first = rank * accumulate
    return [batches[s * group + first:s * group + first + accumulate]
            for s in range(start_step, len(batches) // group)]


def sentence_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Batches for decoding: longest first, ``size * longest <= batch_tokens`` (at least one).

    Args:
        lengths: a length per sentence (e.g. source subwords + 1).
        batch_tokens: bound on ``batch size * longest length``.

    Returns:
        Lists of sentence positions; together they cover every position exactly once, so
        outputs can be put back in input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first, so the first sentence of a batch sets its width.
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Padded tensors of one batch (all int64; PAD fills the padding).

    Attributes:
        src: (B, S) source ids followed by EOS.
        src_lens: (B,) source lengths including EOS.
        trg_in: (B, T) BOS followed by the target ids (decoder input).
        trg_out: (B, T) target ids followed by EOS (what the decoder predicts).
        n_trg_tokens: target tokens to predict, EOS included (the loss normaliser).
    """

    src: torch.Tensor
    src_lens: torch.Tensor
    trg_in: torch.Tensor
    trg_out: torch.Tensor
    n_trg_tokens: int

    def to(self, device: torch.device | None) -> Batch:
        if device is None:
            return self
        # Pinned-memory copies would help on GPU, but batches are small next to the step.
        return Batch(self.src.to(device, non_blocking=True),
                     self.src_lens.to(device, non_blocking=True),
                     self.trg_in.to(device, non_blocking=True),
                     self.trg_out.to(device, non_blocking=True), self.n_trg_tokens)


def collate(rows: datasets.Dataset | pa.Table, indices: np.ndarray,
            device: torch.device | None = None) -> Batch:
    """Gather rows ``indices`` of the encoded data and pad them into a :class:`Batch`.

    Args:
        rows: a ``datasets.Dataset`` or ``pyarrow.Table`` with ``src_ids`` and ``trg_ids``
            list columns (ids without BOS/EOS), as built by ``prepare_data``.
        indices: (B,) row numbers.
        device: where the tensors go (None: stay on CPU).
    """
    table = _gather(rows, np.asarray(indices, dtype=np.int64))
    src_ids, src_lens = _flat(table.column("src_ids"))
    trg_ids, trg_lens = _flat(table.column("trg_ids"))
    src = _pad(src_ids, src_lens, before=None, after=EOS)
    trg_in = _pad(trg_ids, trg_lens, before=BOS, after=None)
    trg_out = _pad(trg_ids, trg_lens, before=None, after=EOS)
    batch = Batch(src=torch.from_numpy(src), src_lens=torch.from_numpy(src_lens + 1),
                  trg_in=torch.from_numpy(trg_in), trg_out=torch.from_numpy(trg_out),
                  n_trg_tokens=int(trg_lens.sum()) + len(trg_lens))
    return batch.to(device)


def _gather(rows: datasets.Dataset | pa.Table, indices: np.ndarray) -> pa.Table:
    """The selected rows as an Arrow table, read from the memory-mapped record batches."""
    if isinstance(rows, pa.Table):
        return rows.take(indices)
    # Arrow-formatted indexing slices each row out of its record batch (~1 ms for a batch);
    # ``pa.Table.take`` on the thousands of chunks of a large cache is ~15x slower.
    return rows.with_format("arrow", columns=["src_ids", "trg_ids"])[indices.tolist()]


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated, (B,) lengths) of a list column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lens = array.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, lens


def _pad(values: np.ndarray, lens: np.ndarray, before: int | None,
         after: int | None) -> np.ndarray:
    """(B, max_len + 1) rows ``[before] + ids`` or ``ids + [after]``, padded with PAD."""
    offset = 1 if before is not None else 0
    width = int(lens.max(initial=0)) + 1
    out = np.full((len(lens), width), PAD, dtype=np.int64)
    # Row-major boolean assignment fills each row's first len positions with its ids in order.
    mask = np.arange(width - 1)[None, :] < lens[:, None]
    out[:, offset:offset + width - 1][mask] = values
    if before is not None:
        out[:, 0] = before
    if after is not None:
        out[np.arange(len(lens)), lens] = after
    return out

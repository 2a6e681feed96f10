"""A lexical shortlist for beam search: score only target tokens that could translate the source.

The output layer (hidden -> V) is about half of a decoder step's arithmetic, and the softmax and
the candidate ``topk`` over ``V`` cost as much again. Marian's shortlist (Junczys-Dowmunt et al.
2018, "Marian: Cost-effective high-quality neural machine translation in C++") restricts them
to the tokens a lexicon aligns to the source, plus the most frequent target tokens.

The lexicon here is IBM Model 1 (Brown et al. 1993): translation probabilities ``p(t | s)``
between subword ids, with a NULL source word, estimated by a few EM iterations on the training
pairs. Every source token keeps its :data:`TOP_STORED` most probable target tokens; the
:data:`FREQUENT_STORED` most frequent target tokens are kept too. Checkpoints carry it.

In search (:func:`sentence_shortlists`), a sentence's shortlist is the union of the ``top_k``
best targets of each of its source tokens, the ``frequent`` most frequent targets, and UNK and
EOS. A batch computes logits for the union of its sentences' shortlists only; each sentence is
then normalised over *its own* shortlist, so its output does not depend on what it is batched
with. Greedy search never uses a shortlist.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seq2seq.search.common import EOS, PAD, UNK

TOP_STORED = 100
"""Target tokens stored per source token (the most ``top_k`` can be)."""
FREQUENT_STORED = 2000
"""Most frequent target tokens stored (the most ``frequent`` can be)."""
MAX_PAIRS = 50_000
"""Training pairs the EM is given at most (evenly spaced)."""
CHUNK_TOKEN_PAIRS = 1 << 21
"""(Source token, target token) pairs of sentence pairs the EM's E-step takes at once: its
temporary arrays, about 100 bytes per token pair, stay near 200 MB whatever the corpus."""


@dataclass
class Lexicon:
    """Per source token, its likeliest target tokens; and the most frequent target tokens.

    Attributes:
        table: ``(V_src, TOP_STORED)`` long target ids, best first, -1 where a source token
            has fewer aligned targets.
        frequent: ``(F,)`` long target ids, most frequent first.
    """

    table: torch.Tensor
    frequent: torch.Tensor

    @functools.cached_property
    def bound(self) -> int:
        """One more than the largest target id it lists."""
        return max((int(ids.max()) for ids in (self.table, self.frequent) if ids.numel()),
                   default=-1) + 1

    def to_state(self) -> dict[str, torch.Tensor]:
        return {"table": self.table.to(torch.int32), "frequent": self.frequent.to(torch.int32)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Lexicon:
        return cls(table=state["table"].long(), frequent=state["frequent"].long())


def build_lexicon(src_ids: Sequence[Sequence[int]], trg_ids: Sequence[Sequence[int]],
                  src_vocab: int, trg_vocab: int, iterations: int = 5,
                  chunk_pairs: int = CHUNK_TOKEN_PAIRS) -> Lexicon:
    """Estimate IBM Model 1 ``p(t | s)`` on training pairs of subword ids (without BOS/EOS).

    Every target token of a pair is explained by one of its source tokens or by NULL; the
    E-step spreads each target token over them in proportion to ``p(t | s)``, the M-step
    renormalises the expected counts per source token. Every pair given is read (callers
    pass at most :data:`MAX_PAIRS`, as ``PreparedData.lexicon`` does). Each (source token,
    target token) pair of a sentence pair is kept in 8 bytes, and the E-step works on
    ``chunk_pairs`` of them at a time: 0.19 GB for multi30k's 7.6 million, where all of them
    at once took 0.73 GB (the same table).
    """
    null = src_vocab  # NULL is one more source id
    trg_counts = np.zeros(trg_vocab, dtype=np.int64)
    # per chunk: its distinct keys, each token pair's index among them, its target position
    chunks = [(*np.unique(key, return_inverse=True), group) for key, group
              in _token_pairs(src_ids, trg_ids, null, trg_vocab, trg_counts, chunk_pairs)]
    if not chunks:
        empty = torch.full((src_vocab, TOP_STORED), -1, dtype=torch.long)
        return Lexicon(empty, torch.zeros(0, dtype=torch.long))
    keys = np.unique(np.concatenate([distinct for distinct, _, _ in chunks]))
    for i, (distinct, inverse, group) in enumerate(chunks):  # the chunk's keys in ``keys``
        chunks[i] = (np.searchsorted(keys, distinct), inverse.astype(np.int32), group)
    key_src, key_trg = keys // trg_vocab, keys % trg_vocab
    prob = np.full(keys.size, 1.0 / trg_vocab)
    for _ in range(iterations):
        counts = np.zeros(keys.size)
        for where, inverse, group in chunks:
            p = prob[where][inverse]
            posterior = p / np.bincount(group, weights=p)[group]
            counts[where] += np.bincount(inverse, weights=posterior, minlength=where.size)
        prob = counts / np.bincount(key_src, weights=counts, minlength=src_vocab + 1)[key_src]
    # best first within each source id: sort by (source, -prob), then rank inside the source
    order = np.lexsort((-prob, key_src))
    sorted_src = key_src[order]
    first = np.searchsorted(sorted_src, sorted_src, side="left")
    rank = np.arange(order.size) - first
    keep = (rank < TOP_STORED) & (sorted_src < src_vocab)
    table = np.full((src_vocab, TOP_STORED), -1, dtype=np.int64)
    table[sorted_src[keep], rank[keep]] = key_trg[order][keep]
    seen = np.flatnonzero(trg_counts)
    frequent = seen[np.argsort(-trg_counts[seen], kind="stable")][:FREQUENT_STORED]
    return Lexicon(torch.from_numpy(table), torch.from_numpy(frequent))


def _token_pairs(src_ids: Sequence[Sequence[int]], trg_ids: Sequence[Sequence[int]],
                 null: int, trg_vocab: int, trg_counts: np.ndarray, chunk_pairs: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (source token or NULL, target token) pair of each sentence pair, in chunks of
    about ``chunk_pairs``: ``(key, group)``, ``key = source * trg_vocab + target`` (int64) and
    ``group`` the target position it explains, numbered within the chunk (int32). Counts the
    target tokens into ``trg_counts``."""
    keys, groups, size, group = [], [], 0, 0
    for src, trg in zip(src_ids, trg_ids):
        trg = np.asarray(trg, dtype=np.int64)
        if trg.size == 0:
            continue
        src = np.append(np.asarray(src, dtype=np.int64), null)
        np.add.at(trg_counts, trg, 1)
        keys.append((np.tile(src, trg.size) * trg_vocab) + np.repeat(trg, src.size))
        groups.append(np.repeat(np.arange(group, group + trg.size, dtype=np.int32), src.size))
        size, group = size + keys[-1].size, group + trg.size
        if size >= chunk_pairs:
            yield np.concatenate(keys), np.concatenate(groups)
            keys, groups, size, group = [], [], 0, 0
    if keys:
        yield np.concatenate(keys), np.concatenate(groups)


def sentence_shortlists(lexicon: Lexicon, src: torch.Tensor, top_k: int, frequent: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's target ids to score and which of them each sentence may produce.

    Args:
        lexicon: from :func:`build_lexicon`.
        src: ``(B, S)`` source ids, padded with PAD.
        top_k: best targets taken per source token (at most :data:`TOP_STORED`).
        frequent: most frequent targets added to every shortlist.

    Returns:
        ``ids`` ``(U,)`` sorted target ids (the batch's union) and ``allowed`` ``(B, U)`` bool,
        True where the id is in that sentence's own shortlist.
    """
    device = src.device
    table = lexicon.table[:, :top_k].to(device)
    per_token = table[src.clamp(max=table.size(0) - 1)]  # (B, S, k)
    per_token = per_token.masked_fill((src == PAD).unsqueeze(2), -1).flatten(1)  # (B, S * k)
    common = torch.cat([lexicon.frequent[:frequent].to(device),
                        torch.tensor([UNK, EOS], device=device)])
    # The union as a mask over the target ids, with one more slot that the -1 entries mark
    # (a sort, torch.unique, cost three times as much for 32 sentences).
    bound = max(lexicon.bound, UNK + 1, EOS + 1)
    listed = torch.zeros(bound + 1, dtype=torch.bool, device=device)
    listed[per_token] = True
    listed[-1] = False
    listed[common] = True
    ids = listed[:-1].nonzero().squeeze(1)
    # position of every target id in ids; -1 entries point to one past the end
    position = torch.full((bound + 1,), ids.numel(), dtype=torch.long, device=device)
    position[ids] = torch.arange(ids.numel(), device=device)
    allowed = torch.zeros((src.size(0), ids.numel() + 1), dtype=torch.bool, device=device)
    allowed.scatter_(1, position[per_token], True)
    allowed = allowed[:, :-1]
    allowed[:, position[common]] = True
    return ids, allowed


@dataclass
class Shortlist:
    """What beam search needs to restrict the output layer: a lexicon and how much of it.

    Attributes:
        lexicon: the run's :class:`Lexicon`.
        top_k: best targets per source token (1 to :data:`TOP_STORED`).
        frequent: most frequent targets in every shortlist (0 to :data:`FREQUENT_STORED`).
    """

    lexicon: Lexicon
    top_k: int
    frequent: int

    def for_batch(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, allowed)`` of :func:`sentence_shortlists` for a padded source batch."""
        return sentence_shortlists(self.lexicon, src, self.top_k, self.frequent)

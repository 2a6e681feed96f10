"""Greedy search: the most probable next token at every step, for a whole batch at once."""

from __future__ import annotations

from typing import Any

import torch

from seq2seq.search.common import (
    BOS,
    EOS,
    Hypothesis,
    bucket,
    forbid_tokens,
    make_hypothesis,
    max_output_lengths,
    own_copy,
    reorder,
)


@torch.no_grad()
def greedy_search(
    model: Any,
    src: torch.Tensor,
    src_lens: torch.Tensor,
    max_len_ratio: float,
    max_len_add: int,
    min_len: int = 0,
    no_repeat_ngram: int = 0,
    return_attention: bool = False,
    buckets: bool = False,
) -> list[Hypothesis]:
    """Decode every sentence of a batch greedily; the same as ``beam_search`` with beam 1 and
    alpha 0, cheaper.

    Sentences that end (EOS, or their maximum length) are dropped from the batch between steps,
    so a batch costs what its unfinished sentences cost. The model should be in eval mode.

    Args:
        model: anything with ``encode``, ``init_state`` and ``step`` (see ``seq2seq.search``).
        src: ``(B, S)`` source token ids, padded with PAD.
        src_lens: ``(B,)`` source lengths.
        max_len_ratio: maximum output length is ``floor(max_len_ratio * src_len +
            max_len_add)`` scored tokens (EOS included); longer outputs are cut, without EOS.
        max_len_add: see ``max_len_ratio``.
        min_len: EOS is forbidden before this many tokens (PAD and BOS are always forbidden).
        no_repeat_ngram: forbid any token that would repeat an n-gram of this size already in
            the output (0: off).
        return_attention: keep the ``(T, S)`` attention of every hypothesis.
        buckets: run at the sentence counts of :func:`~seq2seq.search.common.bucket` only,
            keeping ended sentences as fillers (their rows computed, their tokens ignored)
            until the live ones fit a smaller count.

    Returns:
        One hypothesis per sentence, in input order; ``score`` equals ``log_prob``.
    """
    batch_size = src.size(0)
    max_lens = max_output_lengths(src_lens, max_len_ratio, max_len_add)
    src_lens_list = src_lens.tolist()
    enc = model.encode(src, src_lens)
    state = model.init_state(enc)

    # Rows of the shrinking batch: which sentence each row is (-1: a filler, see bucket) and
    # how far it may go.
    alive = torch.arange(batch_size, device=src.device)
    alive_max_lens = torch.tensor(max_lens, device=src.device)
    prev = torch.full((batch_size,), BOS, dtype=torch.long, device=src.device)
    tokens = torch.zeros((batch_size, 0), dtype=torch.long, device=src.device)
    log_prob_sums = torch.zeros(batch_size, device=src.device)
    attn_hist: torch.Tensor | None = (
        torch.zeros((batch_size, 0, src.size(1)), device=src.device) if return_attention else None)
    results: list[Hypothesis | None] = [None] * batch_size

    for t in range(max(max_lens, default=0)):
        log_probs, state, attn = model.step(prev, state, enc)
        log_probs = forbid_tokens(log_probs, tokens, min_len, no_repeat_ngram)
        best, prev = log_probs.max(dim=-1)
        log_prob_sums = log_prob_sums + best
        tokens = torch.cat([tokens, prev.unsqueeze(1)], dim=1)
        if attn_hist is not None:
            attn_hist = torch.cat([attn_hist, attn.unsqueeze(1).to(attn_hist.dtype)], dim=1)

        ended = ((prev == EOS) | (alive_max_lens <= t + 1)) & (alive >= 0)
        if not bool(ended.any()):
            continue
        for row in ended.nonzero().squeeze(1).tolist():
            b = int(alive[row])
            attention = (None if attn_hist is None
                         else own_copy(attn_hist[row, :, :src_lens_list[b]]))
            results[b] = make_hypothesis(tokens[row].tolist(), float(log_prob_sums[row]),
                                         alpha=0.0, attention=attention)
        alive = alive.masked_fill(ended, -1)  # fillers from now on
        if not bool((alive >= 0).any()):
            break
        keep = rows_to_keep(alive, buckets)
        if keep is not None:  # drop ended rows from everything the next step reads
            alive, alive_max_lens, prev, tokens, log_prob_sums, attn_hist, state, enc = reorder(
                (alive, alive_max_lens, prev, tokens, log_prob_sums, attn_hist, state, enc), keep)

    return results  # type: ignore[return-value]  # every row ends by its maximum length


def rows_to_keep(alive: torch.Tensor, buckets: bool) -> torch.Tensor | None:
    """The rows that the next step computes, in order, or None to keep them all: the live rows
    (``alive >= 0``) and, with ``buckets``, enough ended ones as fillers to make a batch of one
    of :func:`~seq2seq.search.common.bucket`'s sizes."""
    live = (alive >= 0).nonzero().squeeze(1)
    size = bucket(live.numel()) if buckets else live.numel()
    if size >= alive.size(0):
        return None
    fillers = (alive < 0).nonzero().squeeze(1)[:size - live.numel()]
    return torch.cat([live, fillers]).sort().values

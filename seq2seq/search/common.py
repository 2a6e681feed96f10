"""Pieces shared by greedy and beam search: token ids, hypotheses, reordering, lengths.

Search knows the model only through ``encode(src, src_lens) -> enc``, ``init_state(enc) ->
state`` and ``step(prev_tokens, state, enc) -> (log_probs, state, attn)``, where ``enc`` and
``state`` are (possibly nested) tuples of batch-first tensors. That is all :func:`reorder` needs
to follow beams and to drop finished sentences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from seq2seq.models.gemm import bucket_size

# The tokenizer's fixed ids (seq2seq.tokenizer trains SentencePiece with exactly these). They are
# repeated here because search depends only on torch and the model interface.
PAD, UNK, BOS, EOS = 0, 1, 2, 3


@dataclass
class Hypothesis:
    """One output sentence.

    Attributes:
        tokens: token ids without BOS and EOS.
        score: the score hypotheses are ranked by: ``log_prob / lp(|Y|)`` with the GNMT length
            penalty (Wu et al. 2016 §7); equal to ``log_prob`` for greedy search and alpha 0.
        log_prob: sum of the log-probabilities of every scored token, including the final EOS
            when the hypothesis has one (a hypothesis cut at the maximum length has none).
        attention: ``(T, S)`` attention weights, one row per scored token (the EOS included),
            one column per real source position (padding dropped); None unless requested.
    """

    tokens: list[int]
    score: float
    log_prob: float
    attention: torch.Tensor | None = None


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ``((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016 §7); 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha


def reorder(x: Any, idx: torch.Tensor) -> Any:
    """Select rows ``idx`` of every tensor in a nest of tuples (named tuples keep their type).

    Args:
        x: a tensor ``(N, ...)``, a tuple or named tuple of such nests, or None.
        idx: ``(M,)`` long row indices.

    Returns:
        The same nest with every tensor ``(M, ...)``.
    """
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.index_select(0, idx)
    if isinstance(x, tuple):
        items = [reorder(item, idx) for item in x]
        # Named tuples are built from positional fields, plain tuples from one iterable.
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    raise TypeError(f"cannot reorder a {type(x).__name__}: expected tensors in (named) tuples")


def concat(a: Any, b: Any) -> Any:
    """Stack the rows of two nests of the same structure (see :func:`reorder`): ``(N, ...)``
    and ``(M, ...)`` tensors become ``(N + M, ...)``."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, tuple):
        items = [concat(x, y) for x, y in zip(a, b)]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    raise TypeError(f"cannot concatenate a {type(a).__name__}: expected tensors in (named) "
                    "tuples")


def max_output_lengths(src_lens: torch.Tensor, max_len_ratio: float, max_len_add: int) -> list[int]:
    """Per sentence ``floor(max_len_ratio * src_len + max_len_add)`` scored tokens, at least 1.

    The source length is taken as given (it counts the EOS the data pipeline appends). Computed
    in Python floats so that the bound does not depend on the device's float precision.
    """
    return [max(1, math.floor(max_len_ratio * n + max_len_add)) for n in src_lens.tolist()]


def own_copy(attention: torch.Tensor) -> torch.Tensor:
    """A hypothesis's own copy of its ``(T, S)`` attention, on the CPU. ``.cpu()`` of a CPU
    tensor is the tensor itself, so a slice of the search's ``(N, W, S)`` history would keep
    the whole history alive for as long as the hypothesis is (all of a file's, in
    ``translate --attention``)."""
    return attention.to("cpu", copy=True)


def make_hypothesis(token_ids: list[int], log_prob: float, alpha: float,
                    attention: torch.Tensor | None = None) -> Hypothesis:
    """Build a :class:`Hypothesis` from every scored token (a final EOS included, if any).

    ``|Y|`` of the length penalty counts every scored token, so an EOS counts as one.
    """
    score = log_prob / length_penalty(len(token_ids), alpha)
    if token_ids and token_ids[-1] == EOS:
        token_ids = token_ids[:-1]
    return Hypothesis(tokens=token_ids, score=score, log_prob=log_prob, attention=attention)


def forbid_tokens(log_probs: torch.Tensor, tokens: torch.Tensor, min_len: int,
                  no_repeat_ngram: int, targets: torch.Tensor | None = None,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Set to -inf the next tokens no output may contain.

    PAD and BOS are always forbidden: they are never targets in training, so their scores are
    untrained, and a hypothesis containing them could not be re-scored by teacher forcing.

    Args:
        log_probs: ``(N, V)`` next-token log-probabilities (``(N, U)`` with ``targets``).
        tokens: ``(N, t)`` tokens generated so far.
        min_len: EOS is forbidden while ``t < min_len``.
        no_repeat_ngram: forbid tokens completing an n-gram of this size already present
            (0: off).
        targets: ``(U,)`` sorted target ids that the columns of ``log_probs`` stand for (a
            shortlist), or None when column ``i`` is id ``i``.
        lengths: ``(N,)`` tokens generated by each row when rows differ (sentences that
            joined a search at different steps): ``tokens`` then holds each row's tokens
            right-aligned after PAD, and ``t`` is the row's own length. None: every row has
            ``t = tokens.size(1)``.

    Returns:
        ``(N, V)`` log-probabilities: ``log_probs`` itself, changed in place (the searches own
        what ``model.step`` returns, a tensor made for them at each step), except where the
        n-gram rule applies, which makes a new one.
    """
    t = tokens.size(1)
    uniform = lengths is None
    banned = torch.tensor([PAD, BOS, EOS] if uniform and t < min_len else [PAD, BOS],
                          device=log_probs.device)
    if targets is not None:
        banned = (targets.unsqueeze(1) == banned).any(dim=1).nonzero().squeeze(1)
    # In place: a copy of the (N, V) tensor per step cost as much as its log_softmax.
    log_probs.index_fill_(1, banned, float("-inf"))
    if not uniform and min_len > 0:
        eos = (torch.tensor([EOS], device=log_probs.device) if targets is None
               else (targets == EOS).nonzero().squeeze(1))
        log_probs[(lengths < min_len).nonzero(), eos] = float("-inf")
    if 0 < no_repeat_ngram <= t:
        if targets is None:
            repeats = repeated_ngram_mask(tokens, no_repeat_ngram, log_probs.size(1))
        else:
            repeats = repeated_ngram_mask(tokens, no_repeat_ngram, int(targets[-1]) + 1)
            repeats = repeats.index_select(1, targets)
        if not uniform:
            # A row shorter than n has PAD in its suffix, which PAD windows would match.
            repeats &= (lengths >= no_repeat_ngram).unsqueeze(1)
        log_probs = log_probs.masked_fill(repeats, float("-inf"))
    return log_probs


def repeated_ngram_mask(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """Which next tokens would repeat an n-gram of ``tokens``.

    Args:
        tokens: ``(N, t)`` tokens so far, ``t >= n``.
        n: n-gram size.
        vocab_size: ``V``.

    Returns:
        ``(N, V)`` bool, True where the token would complete an n-gram seen before.
    """
    windows = tokens.unfold(1, n, 1)  # (N, t - n + 1, n): every n-gram so far
    suffix = tokens[:, tokens.size(1) - n + 1:]  # (N, n - 1): what the next n-gram starts with
    matches = (windows[:, :, :-1] == suffix.unsqueeze(1)).all(dim=2)  # (N, t - n + 1)
    # scatter_add, not scatter: the same token may end several n-grams, matching or not.
    hits = torch.zeros((tokens.size(0), vocab_size), device=tokens.device)
    hits.scatter_add_(1, windows[:, :, -1], matches.to(hits.dtype))
    return hits > 0


def bucket(count: int) -> int:
    """The sentence count that a search of ``count`` live sentences runs at with
    ``buckets=True``: ``count`` up to 8, else ``count`` rounded up to a multiple of a quarter of
    the power of two below it (9-16: even numbers, 16-32: multiples of 4, ...), so at most a
    quarter of the rows are fillers.

    oneDNN makes its kernels for each number of rows, and a new kernel costs more than the
    step it serves; dropping done sentences at every step gave a new number at almost every
    step (a first bf16 pass over 1,000 test sentences ran at 150 sentences/s, a second one in
    the same process at 250). With buckets, sentences that are done stay in the batch as
    fillers until the live ones fit a smaller count; where that pays is
    :func:`seq2seq.decoding.bucketed_batches`'s choice."""
    return bucket_size(count, 4)

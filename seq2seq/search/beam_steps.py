"""The state of a beam search and the operations of one step on it (see :mod:`seq2seq.search.beam`).

All beams of all live sentences are rows of flat tensors; each function here returns a new
:class:`Beams` or records finished hypotheses, and :class:`~seq2seq.search.beam.BeamSearch`
strings them together.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch

from seq2seq import native
from seq2seq.search.common import (
    BOS,
    EOS,
    PAD,
    Hypothesis,
    bucket,
    concat,
    length_penalty,
    make_hypothesis,
    max_output_lengths,
    own_copy,
    reorder,
)


@dataclass
class Beams:
    """The unfinished sentences of a search: ``n`` sentences of ``K`` beams each, ``N = n * K``
    rows.

    Attributes:
        keys: ``n`` names of the sentences, as the caller gave them.
        max_lens: ``n`` maximum output lengths (scored tokens).
        src_lens: ``n`` source lengths.
        steps: ``n`` tokens generated so far by each sentence (they differ once sentences have
            joined at different steps).
        scores: ``(n, K)`` log-probability of each beam (-inf: no beam there).
        tokens: ``(N, W)`` tokens of each beam so far, without BOS, right-aligned: a sentence
            with ``t < W`` steps has PAD in its first ``W - t`` columns.
        attn_hist: ``(N, W, S)`` attention so far, aligned as ``tokens``, or None when not
            requested.
        prev: ``(N,)`` last token of each beam.
        state: the decoder state, a nest of ``(N, ...)`` tensors.
        enc: the encoder output, a nest of ``(n, ...)`` tensors: one row per sentence, which
            attention shares among its ``K`` beams.
        src: ``(n, S)`` the sources, padded with PAD (a shortlist is computed from them).
        blocked: ``(N, U)`` which shortlisted targets each beam may not produce (those
            outside its sentence's own shortlist), or None without a shortlist.
    """

    keys: list[Hashable]
    max_lens: list[int]
    src_lens: list[int]
    steps: list[int]
    scores: torch.Tensor
    tokens: torch.Tensor
    attn_hist: torch.Tensor | None
    prev: torch.Tensor
    state: Any
    enc: Any
    src: torch.Tensor
    blocked: torch.Tensor | None = None

    def aligned(self) -> bool:
        """Whether every sentence has taken every step so far (no PAD in ``tokens``)."""
        return min(self.steps) == max(self.steps) == self.tokens.size(1)


def start(model: Any, src: torch.Tensor, src_lens: torch.Tensor, keys: list[Hashable],
           beam_size: int, max_len_ratio: float, max_len_add: int,
           return_attention: bool) -> Beams:
    """Encode the batch once and copy the initial state to ``K`` beams each."""
    batch_size = src.size(0)
    enc = model.encode(src, src_lens)
    state = model.init_state(enc)
    rows = torch.arange(batch_size, device=src.device).repeat_interleave(beam_size)
    # Only beam 0 is real at first: the others start at -inf so the first step does not pick the
    # same token K times.
    scores = torch.full((batch_size, beam_size), float("-inf"), device=src.device)
    scores[:, 0] = 0.0
    num_rows = batch_size * beam_size
    return Beams(
        keys=keys,
        max_lens=max_output_lengths(src_lens, max_len_ratio, max_len_add),
        src_lens=src_lens.tolist(),
        steps=[0] * batch_size,
        scores=scores,
        tokens=torch.zeros((num_rows, 0), dtype=torch.long, device=src.device),
        attn_hist=(torch.zeros((num_rows, 0, src.size(1)), device=src.device)
                   if return_attention else None),
        prev=torch.full((num_rows,), BOS, dtype=torch.long, device=src.device),
        state=reorder(state, rows),
        enc=enc,  # one row per sentence: attention reads it for the K beams (Attention.forward)
        src=src,
    )


def merge(model: Any, old: Beams, new: Beams) -> Beams:
    """The sentences of ``old`` followed by those of ``new`` (just started), in one set of
    tensors: sources padded to the longer of the two, ``new``'s tokens to ``old``'s width."""
    length = max(old.src.size(1), new.src.size(1))
    width = old.tokens.size(1)

    def to_length(beams: Beams) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        short = length - beams.src.size(1)
        if not short:
            return beams.enc, beams.src, beams.attn_hist
        if not hasattr(model, "resize_source"):
            raise TypeError(f"{type(model).__name__} has no resize_source: sentences with "
                            "longer sources cannot join its search")
        attn_hist = (None if beams.attn_hist is None
                     else torch.nn.functional.pad(beams.attn_hist, (0, short)))
        return (model.resize_source(beams.enc, length),
                torch.nn.functional.pad(beams.src, (0, short), value=PAD), attn_hist)

    old_enc, old_src, old_attn = to_length(old)
    new_enc, new_src, _ = to_length(new)
    num_new = new.tokens.size(0)
    new_tokens = torch.full((num_new, width), PAD, dtype=torch.long, device=old.tokens.device)
    # new has no steps yet: its attention history is the width of old's, all zeros
    new_attn = None if old_attn is None else old_attn.new_zeros((num_new, width, length))
    return Beams(
        keys=old.keys + new.keys,
        max_lens=old.max_lens + new.max_lens,
        src_lens=old.src_lens + new.src_lens,
        steps=old.steps + new.steps,
        scores=torch.cat([old.scores, new.scores]),
        tokens=torch.cat([old.tokens, new_tokens]),
        attn_hist=concat(old_attn, new_attn),
        prev=torch.cat([old.prev, new.prev]),
        state=concat(old.state, new.state),
        enc=concat(old_enc, new_enc),
        src=torch.cat([old_src, new_src]),
    )


def blocked_targets(allowed: torch.Tensor, beam_size: int) -> torch.Tensor:
    """``(n, U)`` each sentence's own shortlist within the union -> ``(N, U)`` the targets
    each beam may not produce (:attr:`Beams.blocked`)."""
    return ~allowed.repeat_interleave(beam_size, dim=0)


def own_shortlists(log_probs: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Renormalise each row's log-probabilities over its sentence's own shortlist.

    Args:
        log_probs: ``(N, U)`` normalised over the batch's union of shortlists.
        blocked: ``(N, U)`` the targets outside each row's own shortlist (made once per join,
            not at every step).
    """
    # One pass per row (seq2seq.native), not a masked copy and a log_softmax (each about 3%
    # of an int8 step with a shortlist); the same function up to rounding.
    return native.log_softmax(log_probs, blocked)


def finish_eos(finished: dict[Hashable, list[Hypothesis]], beams: Beams, attn: torch.Tensor,
                cand_scores: torch.Tensor, cand_rows: torch.Tensor, cand_tokens: torch.Tensor,
                alpha: float, n_best: int) -> None:
    """Turn EOS candidates ranked within the top ``K`` into finished hypotheses, keeping each
    sentence's best ``n_best`` (:func:`keep_best`).

    EOS ranked below the top ``K`` is ignored, as if the beam had not had room for it.

    Args:
        attn: ``(N, S)`` attention of this step, by the rows before reordering.
    """
    beam_size = beams.scores.size(1)
    is_final = (cand_tokens == EOS) & torch.isfinite(cand_scores)
    is_final[:, beam_size:] = False
    where = is_final.nonzero()  # (F, 2): sentence j, candidate c
    if where.numel() == 0:
        return
    rows = cand_rows[where[:, 0], where[:, 1]]
    log_probs = cand_scores[where[:, 0], where[:, 1]].tolist()
    prefixes = beams.tokens[rows].tolist()
    width = beams.tokens.size(1)
    for i, (j, row) in enumerate(zip(where[:, 0].tolist(), rows.tolist())):
        start = width - beams.steps[j]  # the sentence's own tokens are the last steps[j]
        attention = None
        if beams.attn_hist is not None:
            steps = torch.cat([beams.attn_hist[row, start:], attn[row].unsqueeze(0)], dim=0)
            attention = own_copy(steps[:, :beams.src_lens[j]])
        finished[beams.keys[j]].append(
            make_hypothesis(prefixes[i][start:] + [EOS], log_probs[i], alpha, attention))
    for j in set(where[:, 0].tolist()):
        keep_best(finished[beams.keys[j]], n_best)


def keep_best(hyps: list[Hypothesis], n_best: int) -> None:
    """Drop all but the best ``n_best`` of ``hyps``, which are then sorted best first.

    Only those can be returned or decide the stopping rule, and keeping every finished
    hypothesis cost memory with the square of the output length (a sentence can finish
    ``K`` of them per step: 4,000 steps of beam 5 kept about 250 MB of them). The sort is
    stable and ``hyps`` lists the older ones first, so equal scores keep the order in which
    they were found, as the full list sorted at the end does.
    """
    if len(hyps) > n_best:
        hyps.sort(key=lambda h: -h.score)
        del hyps[n_best:]


def advance(beams: Beams, state: Any, attn: torch.Tensor, cand_scores: torch.Tensor,
             cand_rows: torch.Tensor, cand_tokens: torch.Tensor) -> Beams:
    """Extend the beams with the best ``K`` candidates that do not end in EOS.

    Args:
        state: the decoder state after this step, by the rows before reordering.
        attn: ``(N, S)`` attention of this step, by the rows before reordering.

    Returns:
        The beams one token longer, rows reordered to follow their candidates.
    """
    beam_size = beams.scores.size(1)
    num_cands = cand_scores.size(1)
    # Candidates are sorted best first; pushing EOS past the end keeps the rest in that order.
    order = (cand_tokens == EOS).long() * num_cands + torch.arange(
        num_cands, device=cand_tokens.device)
    pick = order.topk(beam_size, dim=1, largest=False).indices  # (n, K), ascending
    rows = cand_rows.gather(1, pick).view(-1)
    new_tokens = cand_tokens.gather(1, pick).view(-1)
    attn_hist = None
    if beams.attn_hist is not None:
        attn_hist = torch.cat([beams.attn_hist[rows], attn[rows].unsqueeze(1)], dim=1)
    return Beams(
        keys=beams.keys,
        max_lens=beams.max_lens,
        src_lens=beams.src_lens,
        steps=[t + 1 for t in beams.steps],
        scores=cand_scores.gather(1, pick),
        tokens=torch.cat([beams.tokens[rows], new_tokens.unsqueeze(1)], dim=1),
        attn_hist=attn_hist,
        prev=new_tokens,
        state=reorder(state, rows),
        enc=beams.enc,  # every beam of a sentence shares its encoder output: no reordering
        src=beams.src,
        blocked=beams.blocked,  # and its shortlist: the rows stay within their sentence
    )


def finish_done(finished: dict[Hashable, list[Hypothesis]], beams: Beams, n_best: int,
                 alpha: float) -> list[bool]:
    """Which sentences are done after their latest step; finish the live beams of those cut at
    length.

    A sentence is done at its maximum length, or when its ``n_best``-th finished hypothesis
    scores at least the bound on any live beam's final score (see the module docstring).

    Returns:
        ``n`` flags, one per unfinished sentence.
    """
    best_live = beams.scores.max(dim=1).values  # (n,)
    max_lens = torch.tensor(beams.max_lens, device=best_live.device, dtype=best_live.dtype)
    next_lp = torch.tensor([length_penalty(t + 1, alpha) for t in beams.steps],
                           device=best_live.device, dtype=best_live.dtype)
    # lp grows with length, so c / lp is largest at the longest length when c <= 0, and at the
    # shortest when rounding leaves c slightly > 0; taking both keeps the bound safe.
    bound = torch.maximum(best_live / next_lp,
                          best_live / ((5.0 + max_lens) / 6.0) ** alpha).tolist()
    done = []
    for j, key in enumerate(beams.keys):
        if key is FILLER:
            done.append(False)
            continue
        if beams.steps[j] >= beams.max_lens[j]:
            finish_cut(finished[key], beams, j, alpha)
            done.append(True)
            continue
        scores = sorted((h.score for h in finished[key]), reverse=True)
        nth_best = scores[n_best - 1] if len(scores) >= n_best else float("-inf")
        # -inf >= -inf: no live beam left, nothing more can be found.
        done.append(nth_best >= bound[j])
    return done


def finish_cut(hyps: list[Hypothesis], beams: Beams, j: int, alpha: float) -> None:
    """Finish the live beams of sentence ``j`` as they are: it reached its maximum length."""
    beam_size = beams.scores.size(1)
    start = beams.tokens.size(1) - beams.steps[j]
    for k, log_prob in enumerate(beams.scores[j].tolist()):
        if log_prob == float("-inf"):
            continue
        row = j * beam_size + k
        attention = None
        if beams.attn_hist is not None:
            attention = own_copy(beams.attn_hist[row, start:, :beams.src_lens[j]])
        hyps.append(make_hypothesis(beams.tokens[row, start:].tolist(), log_prob, alpha,
                                    attention))


FILLER: Hashable = object()  # the key of a sentence that is done but stays in the batch


def shrink(beams: Beams, done: list[bool], buckets: bool) -> Beams | None:
    """The beams of the next step: those of the sentences that are done dropped, or kept as
    fillers; None when no sentence is live.

    With ``buckets``, the search keeps a few sentence counts only
    (:func:`~seq2seq.search.common.bucket`): sentences that are done stay in the batch as
    fillers, their keys :data:`FILLER` and their scores -inf (no candidate of theirs can finish
    or be kept), until the live sentences fit a smaller count. The fillers kept are those with
    the shortest sources, so that they do not hold back :func:`drop_padding`. A filler's rows
    are computed like any other, and rows never mix, so the live sentences' results do not
    depend on them."""
    live = {j for j, key in enumerate(beams.keys) if key is not FILLER and not done[j]}
    if not live:
        return None
    keys = [FILLER if is_done else key for key, is_done in zip(beams.keys, done)]
    gone = torch.tensor(done, device=beams.scores.device).unsqueeze(1)
    beams = replace(beams, keys=keys, scores=beams.scores.masked_fill(gone, float("-inf")))
    size = bucket(len(live)) if buckets else len(live)
    if size >= len(keys):
        return beams
    fillers = sorted((j for j in range(len(keys)) if j not in live),
                     key=lambda j: beams.src_lens[j])
    return compact(beams, sorted([*live, *fillers[:size - len(live)]]))


def compact(beams: Beams, keep: list[int]) -> Beams:
    """Keep only sentences ``keep`` (indices into ``beams.keys``) in every flat tensor, and only
    as many token columns as the longest of them has."""
    beam_size = beams.scores.size(1)
    device = beams.scores.device
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    rows = (keep_t.unsqueeze(1) * beam_size + torch.arange(beam_size, device=device)).view(-1)
    steps = [beams.steps[j] for j in keep]
    first = beams.tokens.size(1) - max(steps)  # columns before it are PAD in every kept row
    attn_hist = reorder(beams.attn_hist, rows)
    return Beams(
        keys=[beams.keys[j] for j in keep],
        max_lens=[beams.max_lens[j] for j in keep],
        src_lens=[beams.src_lens[j] for j in keep],
        steps=steps,
        scores=beams.scores.index_select(0, keep_t),
        tokens=beams.tokens.index_select(0, rows)[:, first:],
        attn_hist=None if attn_hist is None else attn_hist[:, first:],
        prev=beams.prev.index_select(0, rows),
        state=reorder(beams.state, rows),
        enc=reorder(beams.enc, keep_t),
        src=beams.src.index_select(0, keep_t),
        blocked=reorder(beams.blocked, rows),
    )


def drop_padding(model: Any, beams: Beams) -> Beams:
    """Cut the source positions past the longest live source (the sentences that needed them
    are done), so that attention stops paying for them. Only once they are a quarter of the
    width: cutting copies the encoder output, which costs more than a few padded positions."""
    length = max(beams.src_lens)
    if length * 4 > beams.src.size(1) * 3:
        return beams
    attn_hist = None if beams.attn_hist is None else beams.attn_hist[:, :, :length]
    return replace(beams, enc=model.resize_source(beams.enc, length),
                               src=beams.src[:, :length], attn_hist=attn_hist)

"""Batched beam search with the GNMT length penalty (Wu et al. 2016 §7).

All beams of all sentences live in flat ``(n * K, ...)`` tensors (``n`` unfinished sentences,
``K`` beams each, beam ``k`` of sentence ``j`` in row ``j * K + k``). Each step:

1. the model scores every next token of every beam (with a shortlist, only the tokens the
   lexicon lists for the batch, each sentence renormalised over its own list: see
   :mod:`seq2seq.search.shortlist`);
2. constraints forbid tokens (EOS before ``min_len``, repeated n-grams);
3. the best ``2K`` extensions of each sentence are the candidates (``2K`` so that at least
   ``K`` of them do not end in EOS);
4. EOS candidates ranked within the top ``K`` become finished hypotheses;
5. the best ``K`` other candidates are the next beams;
6. sentences that are done are removed from the flat tensors (encoder output included), so they
   stop costing compute (with ``buckets``, the batch takes a few sizes only, and a done sentence
   stays as a filler until the live ones fit a smaller size: :func:`~.beam_steps.shrink`).

:class:`BeamSearch` runs these steps over a set of sentences that may grow between steps
(continuous batching: a server adds the sentences of new requests to the search in progress,
see :mod:`seq2seq.serve.worker`). Each sentence counts its own steps, so it is decoded as it
would be alone, but for rounding: products and softmaxes can round differently at other batch
shapes, which decides between hypotheses that tie to within it. :func:`beam_search` adds a
whole batch at once and steps until it is done.

A sentence is done at its maximum length (its live beams are then finished as they are, without
EOS), or once it has ``n_best`` finished hypotheses that no live beam can beat. "Can beat" uses an
exact bound, so stopping early never changes the result: log-probabilities only fall as a beam
grows, so a beam with log-probability ``c <= 0`` after ``L`` tokens ends with a normalised score
of at most ``max(c / lp(L + 1), c / lp(max_len))``. With alpha 0 that is plain ``c``.

OpenNMT-py's and Joey NMT's rule (stop a sentence at the first step whose best candidate is
EOS) was tried as an option and dropped (issue 16): on a trained Multi30k model, beam 5, alpha
0.6, it changed 63 of 1,000 test outputs, lowered BLEU by 0.28 and was no faster (0.99x), since
finished sentences already leave the batch and the exact bound stops them soon after.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from seq2seq.search.beam_steps import (
    Beams,
    advance,
    blocked_targets,
    drop_padding,
    finish_done,
    finish_eos,
    merge,
    own_shortlists,
    shrink,
    start,
)
from seq2seq.search.candidates import candidates
from seq2seq.search.common import PAD, Hypothesis, forbid_tokens
from seq2seq.search.shortlist import Shortlist


class BeamSearch:
    """Beam search over sentences that can join while others are being decoded.

    :meth:`add` encodes sentences and gives them their first beam; each :meth:`step` extends
    every live sentence by one token and returns the n-best lists of the sentences that are done.
    A sentence gets the same hypotheses, up to rounding, whatever it shares the steps with
    and whenever it joined. Arguments are those of :func:`beam_search`; the model also needs
    ``resize_source(enc, length)`` to add sentences whose source is longer than those decoded
    (with it, the search also drops source positions that only padding is left in).
    """

    def __init__(self, model: Any, beam_size: int, n_best: int = 1, alpha: float = 0.0,
                 max_len_ratio: float = 1.5, max_len_add: int = 10, min_len: int = 0,
                 no_repeat_ngram: int = 0, return_attention: bool = False,
                 shortlist: Shortlist | None = None, buckets: bool = False):
        if not 1 <= n_best <= beam_size:
            raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, "
                             f"beam_size={beam_size}")
        self.model, self.beam_size, self.n_best, self.alpha = model, beam_size, n_best, alpha
        self.max_len_ratio, self.max_len_add = max_len_ratio, max_len_add
        self.min_len, self.no_repeat_ngram = min_len, no_repeat_ngram
        self.return_attention, self.shortlist = return_attention, shortlist
        self.buckets = buckets
        self._beams: Beams | None = None
        self._finished: dict[Hashable, list[Hypothesis]] = {}
        self._targets: torch.Tensor | None = None  # the shortlist's union, (U,) target ids
        self._rows: Any = None  # the output layer restricted to _targets

    def __len__(self) -> int:
        """Sentences not yet done."""
        return len(self._finished)

    @torch.no_grad()
    def add(self, src: torch.Tensor, src_lens: torch.Tensor, keys: Sequence[Hashable]) -> None:
        """Encode ``(B, S)`` padded sources with ``(B,)`` lengths and start their beams; each
        :meth:`step` that finishes one returns it under its key (keys must not be live)."""
        keys = list(keys)
        if len(keys) != src.size(0) or len(set(keys)) != len(keys):
            raise ValueError(f"need {src.size(0)} distinct keys, got {keys!r}")
        if any(key in self._finished for key in keys):
            raise ValueError("a key is already being decoded")
        if not keys:
            return
        if self._beams is not None and src.size(1) < self._beams.src.size(1):
            # Encoded with the padding it will have, so that only a longer source needs the
            # search's encoder output widened (resize_source).
            src = torch.nn.functional.pad(src, (0, self._beams.src.size(1) - src.size(1)),
                                          value=PAD)
        new = start(self.model, src, src_lens, keys, self.beam_size, self.max_len_ratio,
                     self.max_len_add, self.return_attention)
        self._beams = new if self._beams is None else merge(self.model, self._beams, new)
        self._finished.update((key, []) for key in keys)
        if self.shortlist is not None:
            # Each sentence is normalised over its own shortlist, so a larger union does not
            # change the others' results.
            self._targets, allowed = self.shortlist.for_batch(self._beams.src)
            self._beams.blocked = blocked_targets(allowed, self.beam_size)
            self._rows = self.model.output_rows(self._targets)

    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, list[Hypothesis]]]:
        """Extend every live sentence by one token.

        Returns:
            ``(key, n-best list)`` of each sentence done at this step, its hypotheses best
            first (fewer than ``n_best`` only if the constraints leave fewer possible outputs).
        """
        beams = self._beams
        if beams is None:
            return []
        if self._rows is None:
            log_probs, state, attn = self.model.step(beams.prev, beams.state, beams.enc)
        else:
            log_probs, state, attn = self.model.step(beams.prev, beams.state, beams.enc,
                                                     self._rows)
            log_probs = own_shortlists(log_probs, beams.blocked)
        lengths = None if beams.aligned() else torch.tensor(
            beams.steps, device=log_probs.device).repeat_interleave(self.beam_size)
        log_probs = forbid_tokens(log_probs, beams.tokens, self.min_len, self.no_repeat_ngram,
                                  self._targets, lengths)
        cand_scores, cand_rows, cand_tokens = candidates(beams.scores, log_probs)
        if self._targets is not None:
            cand_tokens = self._targets[cand_tokens]
        finish_eos(self._finished, beams, attn, cand_scores, cand_rows, cand_tokens,
                    self.alpha, self.n_best)
        beams = advance(beams, state, attn, cand_scores, cand_rows, cand_tokens)
        done = finish_done(self._finished, beams, self.n_best, self.alpha)
        results = []
        for j, is_done in enumerate(done):
            if is_done:
                hyps = self._finished.pop(beams.keys[j])
                # Stable: equal scores keep the order in which they were found.
                hyps.sort(key=lambda h: -h.score)
                results.append((beams.keys[j], hyps[:self.n_best]))
        if results:
            beams = shrink(beams, done, self.buckets)
            if beams is not None and hasattr(self.model, "resize_source"):
                beams = drop_padding(self.model, beams)
        self._beams = beams
        return results


@torch.no_grad()
def beam_search(
    model: Any,
    src: torch.Tensor,
    src_lens: torch.Tensor,
    beam_size: int,
    n_best: int = 1,
    alpha: float = 0.0,
    max_len_ratio: float = 1.5,
    max_len_add: int = 10,
    min_len: int = 0,
    no_repeat_ngram: int = 0,
    return_attention: bool = False,
    shortlist: Shortlist | None = None,
    buckets: bool = False,
) -> list[list[Hypothesis]]:
    """Decode every sentence of a batch with beam search.

    The model should be in eval mode. A sentence gets the same hypotheses whether it is decoded
    alone or in any batch.

    Args:
        model: anything with ``encode``, ``init_state`` and ``step`` (see ``seq2seq.search``).
        src: ``(B, S)`` source token ids, padded with PAD.
        src_lens: ``(B,)`` source lengths.
        beam_size: beams kept per sentence (``K``).
        n_best: hypotheses returned per sentence, at most ``beam_size``.
        alpha: GNMT length penalty ``lp(|Y|) = ((5 + |Y|) / 6) ** alpha``, Wu et al. 2016 §7;
            hypotheses are ranked by ``log_prob / lp(|Y|)`` (0: by ``log_prob``).
        max_len_ratio: maximum output length is ``floor(max_len_ratio * src_len +
            max_len_add)`` scored tokens (EOS included); longer outputs are cut, without EOS.
        max_len_add: see ``max_len_ratio``.
        min_len: EOS is forbidden before this many tokens (PAD and BOS are always forbidden).
        no_repeat_ngram: forbid any token that would repeat an n-gram of this size already in
            the hypothesis (0: off).
        return_attention: keep the ``(T, S)`` attention of every hypothesis.
        shortlist: score only the target tokens a lexicon aligns to each sentence's source
            (see :mod:`seq2seq.search.shortlist`); the model needs ``output_rows``. None: all.
        buckets: run at the sentence counts of :func:`~seq2seq.search.common.bucket` only,
            keeping done sentences as fillers until the live ones fit a smaller count (the
            same results; faster where the products run on oneDNN).

    Returns:
        For each sentence, in input order, its ``n_best`` hypotheses, best first (fewer only if
        the constraints leave fewer possible outputs).
    """
    search = BeamSearch(model, beam_size, n_best, alpha, max_len_ratio, max_len_add, min_len,
                        no_repeat_ngram, return_attention, shortlist, buckets)
    search.add(src, src_lens, range(src.size(0)))
    results: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    while len(search):
        for key, hyps in search.step():
            results[key] = hyps
    return results

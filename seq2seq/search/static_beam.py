"""Beam search on fixed shapes, for CUDA graphs: the results of :func:`beam_search`, on the GPU
without a host synchronisation per step.

:func:`seq2seq.search.beam.beam_search` keeps finished hypotheses in Python lists and drops
finished sentences after every step, which needs the host at every step. Here everything a
step reads and writes lives in device buffers of fixed shape (:class:`_Search`):

- the finished hypotheses of each sentence are its best ``n_best`` so far, kept sorted (a stable
  merge, so equal scores keep the order in which they were found, as in ``beam_search``);
- a sentence that is done stays in the buffers, masked: it adds no hypotheses;
- the step number is a device tensor, so one recorded step serves every step.

The host looks at the buffers only every ``chunk`` steps: it collects the sentences that are
done and, when that allows a smaller shape, compacts them out, until none is left. Sentence
counts are padded to a multiple of ``SENTENCE_MULTIPLE`` with placeholder sentences that are
done from the start, and source and output widths to multiples of ``STEP_MULTIPLE``, so only a
few shapes occur. :class:`StaticBeamSearch` keeps one set of buffers per shape, and the graph
recorded on them, for every batch it decodes: a batch is copied into its shape's buffers and
the graph is replayed.

On a CPU (or with ``capture=False``) the same steps run eagerly; the tests compare them with
``beam_search``. Attention output and ``no_repeat_ngram`` are not supported here: callers use
``beam_search`` for those.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from seq2seq.search.candidates import candidates
from seq2seq.search.common import (
    BOS,
    EOS,
    PAD,
    Hypothesis,
    max_output_lengths,
    reorder,
)

SENTENCE_MULTIPLE = 32
STEP_MULTIPLE = 8  # source and output widths are padded to multiples of this
CHUNK = 8  # steps between two looks of the host


@dataclass
class _Search:
    """The search's device buffers for ``n`` sentences, ``K`` beams, ``N = n * K`` rows.

    Attributes:
        ids: ``(n,)`` each sentence's index in the input batch (-1: a placeholder).
        max_lens: ``(n,)`` maximum output lengths; max_lens_f: the same as float32.
        done: ``(n,)`` bool.
        t: ``()`` tokens generated so far.
        scores: ``(n, K)`` beam log-probabilities (-inf: no beam there).
        tokens: ``(N, T)`` tokens of each beam, PAD after its length.
        prev: ``(N,)`` last token of each beam.
        state: decoder state, a nest of ``(N, ...)`` tensors.
        enc: encoder output, a nest of ``(N, ...)`` tensors.
        fin_score: ``(n, M)`` float64 ranking scores of the best ``M = n_best`` finished
            hypotheses, best first (-inf: empty slot).
        fin_log_prob: ``(n, M)`` their log-probabilities.
        fin_len: ``(n, M)`` their scored token counts (an EOS included).
        fin_tokens: ``(n, M, T)`` their tokens.
    """

    ids: torch.Tensor
    max_lens: torch.Tensor
    max_lens_f: torch.Tensor
    done: torch.Tensor
    t: torch.Tensor
    scores: torch.Tensor
    tokens: torch.Tensor
    prev: torch.Tensor
    state: Any
    enc: Any
    fin_score: torch.Tensor
    fin_log_prob: torch.Tensor
    fin_len: torch.Tensor
    fin_tokens: torch.Tensor


@torch.no_grad()
def static_beam_search(
    model: Any,
    src: torch.Tensor,
    src_lens: torch.Tensor,
    beam_size: int,
    n_best: int = 1,
    alpha: float = 0.0,
    max_len_ratio: float = 1.5,
    max_len_add: int = 10,
    min_len: int = 0,
    capture: bool | None = None,
    chunk: int = CHUNK,
) -> list[list[Hypothesis]]:
    """Decode one batch like :func:`seq2seq.search.beam_search` (same arguments and results,
    without attention and n-gram blocking), with fixed-shape steps.

    To decode many batches, make one :class:`StaticBeamSearch` and call it for each: its
    buffers and graphs are kept per shape and serve every batch of that shape.
    """
    searcher = StaticBeamSearch(model, beam_size, n_best, alpha, max_len_ratio, max_len_add,
                                min_len, capture=src.is_cuda if capture is None else capture,
                                chunk=chunk)
    return searcher(src, src_lens)


@dataclass
class _Slot:
    """The buffers of one shape, and the graph recorded on them (once they have been warmed)."""

    search: _Search
    graph: torch.cuda.CUDAGraph | None = None
    warm: bool = False


class StaticBeamSearch:
    """Beam search for many batches, on fixed shapes; CUDA graphs recorded once per shape.

    Args:
        model: anything with ``encode``, ``init_state`` and ``step``.
        beam_size, n_best, alpha, max_len_ratio, max_len_add, min_len: as in ``beam_search``.
        capture: record each chunk of steps in a CUDA graph and replay it (needs CUDA).
        chunk: steps between two looks of the host.
    """

    def __init__(self, model: Any, beam_size: int, n_best: int = 1, alpha: float = 0.0,
                 max_len_ratio: float = 1.5, max_len_add: int = 10, min_len: int = 0,
                 capture: bool = False, chunk: int = CHUNK):
        if not 1 <= n_best <= beam_size:
            raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, "
                             f"beam_size={beam_size}")
        self.model, self.beam_size, self.n_best = model, beam_size, n_best
        self.max_len_ratio, self.max_len_add = max_len_ratio, max_len_add
        self.capture, self.chunk = capture, chunk
        self.step = _Stepper(model, beam_size, n_best, alpha, min_len)
        self.slots: dict[tuple, _Slot] = {}

    @torch.no_grad()
    def __call__(self, src: torch.Tensor, src_lens: torch.Tensor) -> list[list[Hypothesis]]:
        """The ``n_best`` hypotheses of every sentence of the batch, best first."""
        if self.capture and not src.is_cuda:
            raise ValueError("capture needs the batch on a CUDA device")
        slot = self._load(_start(self.model, src, src_lens, self.beam_size, self.n_best,
                                 self.max_len_ratio, self.max_len_add))
        results: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
        ids = slot.search.ids.tolist()  # -1: a placeholder, or already collected
        while True:
            self._run_chunk(slot)
            done = slot.search.done.tolist()
            new = [j for j, d in enumerate(done) if d and ids[j] >= 0]
            _collect(slot.search, new, results)
            for j in new:
                ids[j] = -1
            if all(done):
                return results
            keep = [j for j, d in enumerate(done) if not d]
            if _round_up(len(keep), SENTENCE_MULTIPLE) < len(done):  # smaller shape: compact
                slot = self._load(_compact(slot.search, keep, self.beam_size))
                ids = slot.search.ids.tolist()

    def _load(self, search: _Search) -> _Slot:
        """The slot of ``search``'s shape, its buffers now holding ``search``'s values."""
        key = tuple(tuple(t.shape) for t in _flatten(_fields(search)))
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = _Slot(search)
        else:
            for buffer, value in zip(_flatten(_fields(slot.search)), _flatten(_fields(search))):
                buffer.copy_(value)
        return slot

    def _run_chunk(self, slot: _Slot) -> None:
        if slot.graph is not None:
            slot.graph.replay()
            return
        if not self.capture or not slot.warm:
            # Eagerly; on a GPU the first chunk of a shape also warms its kernels up, the
            # next one is recorded.
            for _ in range(self.chunk):
                self.step(slot.search)
            slot.warm = True
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.chunk):
                self.step(slot.search)
        slot.graph = graph
        graph.replay()


def _start(model: Any, src: torch.Tensor, src_lens: torch.Tensor, beam_size: int, n_best: int,
           max_len_ratio: float, max_len_add: int) -> _Search:
    """Pad the batch (placeholder sentences, source and output widths to multiples of
    ``STEP_MULTIPLE``), encode it, and set up fresh buffers."""
    batch = src.size(0)
    n = _round_up(batch, SENTENCE_MULTIPLE)
    device = src.device
    width = _round_up(src.size(1), STEP_MULTIPLE)
    padded = torch.full((n, width), PAD, dtype=torch.long, device=device)
    padded[:batch, :src.size(1)] = src
    padded[batch:, 0] = EOS  # a one-token source: attention needs a real position
    lens = torch.ones(n, dtype=torch.long, device=device)
    lens[:batch] = src_lens
    max_lens = torch.zeros(n, dtype=torch.long)
    max_lens[:batch] = torch.tensor(max_output_lengths(src_lens, max_len_ratio, max_len_add))
    longest = _round_up(int(max_lens.max()), STEP_MULTIPLE)
    enc = model.encode(padded, lens)
    state = model.init_state(enc)
    rows = torch.arange(n, device=device).repeat_interleave(beam_size)
    scores = torch.full((n, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0  # only beam 0 is real at first
    ids = torch.full((n,), -1, dtype=torch.long)
    ids[:batch] = torch.arange(batch)
    max_lens = max_lens.to(device)
    return _Search(
        ids=ids.to(device), max_lens=max_lens, max_lens_f=max_lens.float(),
        done=torch.arange(n, device=device) >= batch,
        t=torch.zeros((), dtype=torch.long, device=device),
        scores=scores,
        tokens=torch.full((n * beam_size, longest), PAD, dtype=torch.long, device=device),
        prev=torch.full((n * beam_size,), BOS, dtype=torch.long, device=device),
        state=reorder(state, rows), enc=reorder(enc, rows),
        fin_score=torch.full((n, n_best), float("-inf"), dtype=torch.float64, device=device),
        fin_log_prob=torch.zeros((n, n_best), device=device),
        fin_len=torch.zeros((n, n_best), dtype=torch.long, device=device),
        fin_tokens=torch.full((n, n_best, longest), PAD, dtype=torch.long, device=device),
    )


class _Stepper:
    """One search step that reads the buffers of a :class:`_Search` and writes them in place."""

    def __init__(self, model: Any, beam_size: int, n_best: int, alpha: float, min_len: int):
        self.model, self.beam_size, self.n_best = model, beam_size, n_best
        self.alpha, self.min_len = alpha, min_len
        self.banned: torch.Tensor | None = None  # made before any capture (a host copy)

    def __call__(self, s: _Search) -> None:
        K = self.beam_size
        n = s.scores.size(0)
        width = s.tokens.size(1)
        log_probs, state, _ = self.model.step(s.prev, s.state, s.enc)
        if self.banned is None:
            self.banned = torch.tensor([PAD, BOS], device=log_probs.device)
        log_probs = log_probs.index_fill(1, self.banned, float("-inf"))
        eos = torch.where(s.t < self.min_len, float("-inf"), log_probs[:, EOS])
        log_probs[:, EOS] = eos

        # The best 2K extensions of each sentence, as beam_search ranks them.
        cand_scores, cand_rows, cand_tokens = candidates(s.scores, log_probs)
        num_cands = cand_scores.size(1)

        # EOS within the top K: finished hypotheses of t + 1 scored tokens.
        column = s.t.clamp(max=width - 1).view(1, 1)
        top_rows = cand_rows[:, :K].reshape(-1)
        ended = s.tokens[top_rows].scatter(1, column.expand(n * K, 1), EOS)
        is_eos = ((cand_tokens[:, :K] == EOS) & torch.isfinite(cand_scores[:, :K])
                  & ~s.done.unsqueeze(1))
        self._merge(s, is_eos, cand_scores[:, :K], s.t + 1, ended.view(n, K, width))

        # The best K candidates that do not end in EOS are the next beams (as _advance).
        order = (cand_tokens == EOS).long() * num_cands + torch.arange(
            num_cands, device=cand_tokens.device)
        pick = order.topk(K, dim=1, largest=False).indices
        rows = cand_rows.gather(1, pick).view(-1)
        new_tokens = cand_tokens.gather(1, pick).view(-1)
        scores = cand_scores.gather(1, pick)
        tokens = s.tokens[rows].scatter(1, column.expand(n * K, 1), new_tokens.unsqueeze(1))
        t = s.t + 1

        # At its maximum length a sentence's live beams finish as they are (no EOS).
        cut = (t == s.max_lens) & ~s.done
        live = cut.unsqueeze(1) & torch.isfinite(scores)
        self._merge(s, live, scores, t, tokens.view(n, K, width))

        # Done: cut, or no live beam can beat the n_best-th finished one (beam_search's bound,
        # computed with the same float32 operations).
        best_live = scores.max(dim=1).values
        bound = torch.maximum(best_live / self._penalty(t + 1).float(),
                              best_live / ((5.0 + s.max_lens_f) / 6.0) ** self.alpha)
        done = s.done | cut | (s.fin_score[:, self.n_best - 1] >= bound.double())

        s.scores.copy_(scores)
        s.tokens.copy_(tokens)
        s.prev.copy_(new_tokens)
        for buffer, value in zip(_flatten(s.state), _flatten(reorder(state, rows))):
            buffer.copy_(value)
        s.done.copy_(done)
        s.t.copy_(t)

    def _penalty(self, length: torch.Tensor) -> torch.Tensor:
        """GNMT length penalty in float64, as ``length_penalty`` computes it in Python."""
        return ((5.0 + length.double()) / 6.0) ** self.alpha

    def _merge(self, s: _Search, valid: torch.Tensor, log_prob: torch.Tensor,
               length: torch.Tensor, tokens: torch.Tensor) -> None:
        """Merge ``(n, K)`` new hypotheses (where ``valid``) into each sentence's best ``M``.

        A stable sort after the old ones keeps equal scores in the order they were found.
        """
        score = torch.where(valid, log_prob.double() / self._penalty(length),
                            float("-inf"))
        all_score = torch.cat([s.fin_score, score], dim=1)
        keep = all_score.sort(dim=1, descending=True, stable=True).indices[:, :self.n_best]
        lengths = torch.cat([s.fin_len, length.expand_as(valid)], dim=1)
        all_tokens = torch.cat([s.fin_tokens, tokens], dim=1)
        s.fin_tokens.copy_(all_tokens.gather(
            1, keep.unsqueeze(2).expand(-1, -1, all_tokens.size(2))))
        s.fin_log_prob.copy_(torch.cat([s.fin_log_prob, log_prob], dim=1).gather(1, keep))
        s.fin_len.copy_(lengths.gather(1, keep))
        s.fin_score.copy_(all_score.gather(1, keep))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _collect(s: _Search, rows: list[int], results: list[list[Hypothesis]]) -> None:
    """Copy the finished hypotheses of the newly done sentences ``rows`` into ``results``."""
    if not rows:
        return
    index = torch.tensor(rows, device=s.ids.device)
    ids = s.ids[index].tolist()
    scores = s.fin_score[index].tolist()
    log_probs = s.fin_log_prob[index].tolist()
    lengths = s.fin_len[index].tolist()
    tokens = s.fin_tokens[index].tolist()
    for i, b in enumerate(ids):
        for k, score in enumerate(scores[i]):
            if score == float("-inf"):
                continue  # an empty slot: the constraints left fewer outputs
            ids_k = tokens[i][k][:lengths[i][k]]
            if ids_k and ids_k[-1] == EOS:
                ids_k = ids_k[:-1]
            results[b].append(Hypothesis(tokens=ids_k, score=score, log_prob=log_probs[i][k]))


def _compact(s: _Search, keep: list[int], beam_size: int) -> _Search:
    """The sentences ``keep`` only, padded again with done placeholders."""
    n = _round_up(len(keep), SENTENCE_MULTIPLE)
    device = s.ids.device
    # Placeholders repeat the first kept sentence, marked done and without an id.
    index = torch.tensor(keep + [keep[0]] * (n - len(keep)), device=device)
    rows = (index.unsqueeze(1) * beam_size + torch.arange(beam_size, device=device)).view(-1)
    placeholder = torch.arange(n, device=device) >= len(keep)
    by_sentence = {f.name: getattr(s, f.name).index_select(0, index)
                   for f in fields(s) if f.name in ("ids", "max_lens", "max_lens_f", "done",
                                                      "scores", "fin_score", "fin_log_prob",
                                                      "fin_len", "fin_tokens")}
    by_sentence["ids"] = by_sentence["ids"].masked_fill(placeholder, -1)
    by_sentence["done"] = by_sentence["done"] | placeholder
    return _Search(t=s.t.clone(), tokens=s.tokens.index_select(0, rows),
                   prev=s.prev.index_select(0, rows), state=reorder(s.state, rows),
                   enc=reorder(s.enc, rows), **by_sentence)


def _fields(s: _Search) -> tuple:
    """Every buffer of a search, as a nest (in field order)."""
    return tuple(getattr(s, f.name) for f in fields(s))


def _flatten(x: Any) -> list[torch.Tensor]:
    """The tensors of a nest of tuples, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _flatten(item)]

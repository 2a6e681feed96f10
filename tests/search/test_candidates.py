"""The beam step's candidates, found run by run (``seq2seq.search.candidates``), against one
``topk`` over every beam's every next token."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import ModelConfig
from seq2seq.models.seq2seq import build_model
from seq2seq.search import beam_search
from seq2seq.search import candidates as candidates_module
from seq2seq.search.candidates import RUN, candidates
from seq2seq.search.static_beam import static_beam_search
from tests.search.test_search import SRC_LENS, make_batch


def every_sum(scores: torch.Tensor, log_probs: torch.Tensor):
    """The reference: the (n, K * V) sums sorted, best first, equal ones in (beam, token)
    order."""
    n, beam_size = scores.shape
    vocab = log_probs.size(1)
    total = (scores.unsqueeze(2) + log_probs.view(n, beam_size, vocab)).view(n, -1)
    cand_scores, flat = total.sort(dim=1, descending=True, stable=True)
    count = min(2 * beam_size, beam_size * vocab)
    cand_scores, flat = cand_scores[:, :count], flat[:, :count]
    first = torch.arange(n).unsqueeze(1) * beam_size
    return cand_scores, first + flat // vocab, flat % vocab


@pytest.mark.parametrize("vocab", [4 * RUN, 4 * RUN + 1, 1000, 7000, 7000 + RUN - 1])
@pytest.mark.parametrize("beam_size", [1, 5, 12])
def test_runs_find_the_candidates_of_one_topk(vocab, beam_size):
    generator = torch.Generator().manual_seed(vocab * 31 + beam_size)
    n = 7
    log_probs = torch.log_softmax(torch.randn(n * beam_size, vocab, generator=generator) * 4, -1)
    log_probs[:, [0, 1]] = float("-inf")  # forbidden tokens, as forbid_tokens leaves them
    log_probs[3, vocab - 5:] = float("-inf")  # the last run's live tokens all forbidden in a row
    scores = -torch.rand(n, beam_size, generator=generator) * 10
    scores[0, 1:] = float("-inf")  # a sentence at its first step: one live beam
    # The best tokens crowded into one run of one row, and into the last, shorter run.
    log_probs[beam_size, RUN:2 * RUN] = torch.linspace(-0.01, -0.02, RUN)
    log_probs[2 * beam_size, -3:] = torch.tensor([-0.005, -0.007, -0.006])
    got, want = candidates(scores, log_probs), every_sum(scores, log_probs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("vocab", [3, 4 * RUN + 3, 7000])
def test_equal_scores_rank_by_beam_then_token(vocab):
    """bf16 logits take few values, so equal log-probabilities are common: their order is
    fixed, not the kernel's."""
    generator = torch.Generator().manual_seed(vocab)
    n, beam_size = 9, 5
    logits = (torch.randn(n * beam_size, vocab, generator=generator) * 0.05).bfloat16()
    logits.view(n, beam_size, vocab)[:, 3] = logits.view(n, beam_size, vocab)[:, 1]
    log_probs = torch.log_softmax(logits, -1, dtype=torch.float32)
    scores = torch.zeros(n, beam_size)  # every beam level: ties across beams as well
    scores[1] = -0.5
    got, want = candidates(scores, log_probs), every_sum(scores, log_probs)
    assert (want[0][:, 1:] == want[0][:, :-1]).any()  # the case has ties among candidates
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_small_vocabularies_take_one_topk():
    scores = torch.tensor([[0.0, -1.0]])
    log_probs = torch.log_softmax(torch.randn(2, 3), -1)
    for g, w in zip(candidates(scores, log_probs), every_sum(scores, log_probs)):
        assert torch.equal(g, w)


def large_model(vocab: int) -> torch.nn.Module:
    """A tiny float32 model with ``vocab`` target tokens, enough for candidates by runs."""
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=8, enc_hidden=16, dec_hidden=32, attention_size=16,
                      enc_layers=1, dec_layers=1)
    model = build_model(cfg, src_vocab=50, trg_vocab=vocab).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(6.0)
    return model


def n_bests(results: list) -> list:
    return [[(h.tokens, h.score) for h in n_best] for n_best in results]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_a_search_by_runs_equals_the_search_by_one_ranking(monkeypatch, alpha):
    vocab = 9 * RUN + 17
    model, (src, src_lens) = large_model(vocab), make_batch(SRC_LENS)
    options = dict(beam_size=5, n_best=3, alpha=alpha, max_len_ratio=2.0, max_len_add=4)
    by_runs = beam_search(model, src, src_lens, **options)
    assert any(len(h.tokens) > 1 for n_best in by_runs for h in n_best)
    static = static_beam_search(model, src, src_lens, capture=False, chunk=3, **options)
    assert [[h.tokens for h in n_best] for n_best in static] == \
        [[h.tokens for h in n_best] for n_best in by_runs]  # its scores round differently
    monkeypatch.setattr(candidates_module, "RUN", vocab)  # vocab < 4 * RUN: one ranking of all sums
    assert n_bests(beam_search(model, src, src_lens, **options)) == n_bests(by_runs)

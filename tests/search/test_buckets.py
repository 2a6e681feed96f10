"""With ``buckets=True`` the searches keep to a few sentence counts: finished sentences stay as
fillers until the live ones fit a smaller count (``beam_steps.shrink``), and nothing else
changes."""

from __future__ import annotations

import pytest
import torch

from seq2seq.decoding import bucketed_batches
from seq2seq.precision import decoding_model
from seq2seq.quantize import quantize_for_cpu
from seq2seq.search import BOS, beam_search, greedy_search
from seq2seq.search.beam import BeamSearch
from seq2seq.search.beam_steps import FILLER
from seq2seq.search.common import bucket
from tests.search.test_continuous import MODELS, assert_same
from tests.search.test_search import RowCounter, make_batch, one, real_model
from tests.search.test_shortlist import restrictive
from tests.search.toy_models import bigram

LENS = [int(n) for n in torch.randint(1, 13, (40,), generator=torch.Generator().manual_seed(3))]


def test_bucket_rounds_up_by_less_than_a_quarter():
    counts = range(1, 2049)
    sizes = [bucket(n) for n in counts]
    assert sizes[:8] == list(range(1, 9))
    for n, size in zip(counts, sizes):
        assert n <= size < 1.25 * n + 1
        assert bucket(size) == size
    assert sizes == sorted(sizes)
    # four sizes per doubling past 8
    assert len(set(sizes)) == 8 + 4 * 8


def test_a_never_ending_batch_runs_at_the_bucketed_counts():
    # Every sentence runs to its maximum length (its source length here): one is done at each
    # step, and the batch shrinks only when the live ones fit a smaller count.
    model = bigram(6, {BOS: {4: 1.0}, 4: {4: 1.0}})
    src, src_lens = make_batch(list(range(1, 41)))
    counter = RowCounter(model)
    results = beam_search(counter, src, src_lens, beam_size=3, max_len_ratio=1.0,
                          max_len_add=0, buckets=True)
    assert [len(hyps[0].tokens) for hyps in results] == list(range(1, 41))
    expected = ([40] * 8 + [32] * 4 + [28] * 4 + [24] * 4 + [20] * 4 + [16] * 2 + [14] * 2
                + [12] * 2 + [10] * 2 + [8, 7, 6, 5, 4, 3, 2, 1])
    assert counter.rows == [(3 * n, n) for n in expected]
    counter = RowCounter(model)
    results = greedy_search(counter, src, src_lens, max_len_ratio=1.0, max_len_add=0,
                            buckets=True)
    assert [len(hyp.tokens) for hyp in results] == list(range(1, 41))
    assert counter.rows == [(n, n) for n in expected]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("settings", [
    dict(alpha=0.6, n_best=2),
    dict(alpha=0.0, min_len=3, no_repeat_ngram=2),
])
def test_fillers_leave_every_result_unchanged(name, settings):
    bucketed, plain = RowCounter(MODELS[name]()), RowCounter(MODELS[name]())
    src, src_lens = make_batch(LENS, seed=4)
    with_fillers = beam_search(bucketed, src, src_lens, beam_size=4, max_len_add=5,
                               buckets=True, **settings)
    exact = beam_search(plain, src, src_lens, beam_size=4, max_len_add=5, **settings)
    assert bucketed.rows != plain.rows  # there were fillers
    assert all(bucket(n) == n for _, n in bucketed.rows)  # 40 sentences to start: a bucket
    for hyps, hyps2 in zip(with_fillers, exact):
        assert_same(hyps, hyps2)


def test_fillers_leave_attention_and_shortlists_unchanged():
    model = real_model()
    src, src_lens = make_batch(LENS, seed=5)
    settings = dict(beam_size=3, n_best=2, alpha=0.6, max_len_add=5, return_attention=True,
                    shortlist=restrictive())
    with_fillers = beam_search(model, src, src_lens, buckets=True, **settings)
    exact = beam_search(model, src, src_lens, **settings)
    for hyps, hyps2 in zip(with_fillers, exact):
        assert_same(hyps, hyps2)
        for h, h2 in zip(hyps, hyps2):
            torch.testing.assert_close(h.attention, h2.attention, atol=1e-9, rtol=0)


def test_sentences_joining_a_search_with_fillers_decode_as_alone():
    model = real_model()
    src, src_lens = make_batch(LENS, seed=6)
    settings = dict(beam_size=3, n_best=2, alpha=0.6, max_len_add=5)
    search = BeamSearch(model, buckets=True, **settings)
    search.add(src[:30], src_lens[:30], range(30))
    joins = {4: range(30, 34), 8: range(34, 38), 11: range(38, 40)}
    results: dict = {}
    joined_beside_fillers = 0
    step = 0
    while len(search) or joins:
        if step in joins:
            assert len(search) > 0
            joined_beside_fillers += FILLER in search._beams.keys
            for i in joins.pop(step):
                search.add(*one(src, src_lens, i), [i])
        results.update(search.step())
        step += 1
    assert joined_beside_fillers > 0
    assert sorted(results) == list(range(40))
    for i in range(40):
        assert_same(results[i], beam_search(model, *one(src, src_lens, i), **settings)[0])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_fillers_leave_every_result_unchanged(name):
    bucketed, plain = RowCounter(MODELS[name]()), RowCounter(MODELS[name]())
    src, src_lens = make_batch(LENS, seed=7)
    settings = dict(max_len_ratio=1.5, max_len_add=5, min_len=2)
    with_fillers = greedy_search(bucketed, src, src_lens, buckets=True, **settings)
    exact = greedy_search(plain, src, src_lens, **settings)
    assert bucketed.rows != plain.rows
    for hyp, hyp2 in zip(with_fillers, exact):
        assert hyp.tokens == hyp2.tokens
        assert hyp.log_prob == pytest.approx(hyp2.log_prob, abs=1e-9)


def test_greedy_fillers_leave_attention_unchanged():
    model = real_model()
    src, src_lens = make_batch(LENS, seed=8)
    with_fillers = greedy_search(model, src, src_lens, 1.5, 5, return_attention=True,
                                 buckets=True)
    exact = greedy_search(model, src, src_lens, 1.5, 5, return_attention=True)
    for hyp, hyp2 in zip(with_fillers, exact):
        assert hyp.tokens == hyp2.tokens
        torch.testing.assert_close(hyp.attention, hyp2.attention, atol=1e-9, rtol=0)


def test_batches_are_bucketed_for_bf16_weights_on_a_cpu():
    cpu = torch.device("cpu")
    assert bucketed_batches(decoding_model(real_model().float(), "bf16", cpu)[0], cpu)
    assert not bucketed_batches(real_model().float(), cpu)
    assert not bucketed_batches(quantize_for_cpu(real_model().float()), cpu)
    assert not bucketed_batches(real_model().float().bfloat16(), torch.device("cuda"))

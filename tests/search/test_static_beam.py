"""The fixed-shape beam search (for CUDA graphs) gives beam_search's results.

On the CPU its steps run eagerly; the test marked ``gpu`` records and replays them on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from seq2seq.search import beam_search
from seq2seq.search.static_beam import SENTENCE_MULTIPLE, StaticBeamSearch, static_beam_search
from tests.search.test_search import MODELS, make_batch

LENS_MANY = [(i * 7) % 11 + 1 for i in range(SENTENCE_MULTIPLE + 9)]  # two shapes, compaction


def assert_same_results(static, reference):
    assert len(static) == len(reference)
    for i, (mine, theirs) in enumerate(zip(static, reference)):
        assert [h.tokens for h in mine] == [h.tokens for h in theirs], i
        for a, b in zip(mine, theirs):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("beam_size,n_best,alpha,min_len,max_len_ratio", [
    (5, 1, 0.6, 0, 1.5),
    (4, 3, 0.0, 0, 1.5),
    (3, 2, 1.0, 4, 0.8),  # EOS forbidden early, and many sentences cut at their maximum length
    (1, 1, 0.0, 0, 1.5),
])
def test_static_beam_search_gives_beam_search_results(name, beam_size, n_best, alpha, min_len,
                                                       max_len_ratio):
    model = MODELS[name]()
    src, src_lens = make_batch(LENS_MANY, seed=1)
    options = dict(beam_size=beam_size, n_best=n_best, alpha=alpha, min_len=min_len,
                   max_len_ratio=max_len_ratio, max_len_add=3)
    reference = beam_search(model, src, src_lens, **options)
    assert any(len(h) < n_best or h[0].tokens for h in reference)
    static = static_beam_search(model, src, src_lens, capture=False, chunk=3, **options)
    assert_same_results(static, reference)


def test_the_look_interval_does_not_change_results():
    model = MODELS["gru-bahdanau"]()
    src, src_lens = make_batch(LENS_MANY, seed=2)
    runs = [static_beam_search(model, src, src_lens, beam_size=4, n_best=2, alpha=0.6,
                               capture=False, chunk=chunk) for chunk in (1, 5, 64)]
    assert_same_results(runs[0], runs[1])
    assert_same_results(runs[0], runs[2])


def test_one_searcher_serves_many_batches_through_its_shape_buffers():
    """Batches of one shape reuse the same buffers (and, on a GPU, graphs): values copied in
    must fully replace the previous batch's."""
    model = MODELS["lstm-luong"]()
    options = dict(beam_size=4, n_best=2, alpha=0.6, max_len_ratio=1.5, max_len_add=3)
    searcher = StaticBeamSearch(model, chunk=4, **options)
    batches = [make_batch(LENS_MANY, seed=seed) for seed in (4, 5, 4)]
    batches.append(make_batch(LENS_MANY[:7], seed=6))  # a smaller shape in between
    batches.append(make_batch(LENS_MANY, seed=7))
    for src, src_lens in batches:
        assert_same_results(searcher(src, src_lens), beam_search(model, src, src_lens, **options))
    assert 2 <= len(searcher.slots) < 2 * len(batches)  # shapes were shared


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_static_beam_search_gives_beam_search_results_on_the_gpu():
    model = MODELS["gru-bahdanau"]().cuda()
    options = dict(beam_size=5, n_best=2, alpha=0.6, max_len_ratio=1.5, max_len_add=3)
    searcher = StaticBeamSearch(model, capture=True, chunk=4, **options)
    for seed in (3, 4, 3):  # the second and third batches replay the first one's graphs
        src, src_lens = (t.cuda() for t in make_batch(LENS_MANY, seed=seed))
        assert_same_results(searcher(src, src_lens), beam_search(model, src, src_lens,
                                                                 **options))
    assert any(slot.graph is not None for slot in searcher.slots.values())

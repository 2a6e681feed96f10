"""Continuous batching: sentences that join a beam search in progress are decoded as if alone."""

from __future__ import annotations

import pytest
import torch

from seq2seq.search import BOS, Ensemble, beam_search
from seq2seq.search.beam import BeamSearch
from tests.search.test_search import SRC_LENS, make_batch, one, real_model
from tests.search.test_shortlist import restrictive
from tests.search.toy_models import ToyModel, bigram

# When each sentence of make_batch(SRC_LENS) joins: (step, indices). Short sources join before
# long ones, so later sentences widen the source positions of the search.
JOINS = [(0, [1, 4]), (2, [2]), (3, [0, 5]), (7, [3])]


def run_joined(search: BeamSearch, src: torch.Tensor, src_lens: torch.Tensor,
               joins=JOINS) -> dict[int, list]:
    """Step ``search``, adding each sentence (alone, unpadded) at its step of ``joins``;
    every sentence's n-best list by index. Every join after the first must find the search
    busy, or the test would not test joining."""
    results: dict[int, list] = {}
    pending = dict(joins)
    step = 0
    while pending or len(search):
        for i in pending.pop(step, []):
            assert step == 0 or len(search) > 0, f"sentence {i} joined an idle search"
            search.add(*one(src, src_lens, i), [i])
        results.update(search.step())
        step += 1
    return results


def joined_and_alone(model, **settings) -> list[tuple[list, list]]:
    """Each sentence's n-best list when joining a search at its step of JOINS, beside its list
    when decoded alone with the same settings."""
    src, src_lens = make_batch(SRC_LENS)
    joined = run_joined(BeamSearch(model, **settings), src, src_lens)
    assert sorted(joined) == list(range(len(SRC_LENS)))
    return [(joined[i], beam_search(model, *one(src, src_lens, i), **settings)[0])
            for i in range(len(SRC_LENS))]


def assert_same(hyps: list, alone: list) -> None:
    assert [h.tokens for h in hyps] == [h.tokens for h in alone]
    for h, a in zip(hyps, alone):
        assert h.score == pytest.approx(a.score, abs=1e-5)
        assert h.log_prob == pytest.approx(a.log_prob, abs=1e-5)


MODELS = {
    "toy": lambda: ToyModel(eos_bias=2.0),
    "gru-bahdanau": lambda: real_model(),
    "lstm-luong": lambda: real_model(cell="lstm", decoder="luong", attention="general"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("settings", [
    dict(alpha=0.0),
    dict(alpha=0.6, n_best=3),
    dict(alpha=1.5, min_len=4),
    dict(alpha=0.6, no_repeat_ngram=2),
])
def test_joining_late_gives_what_decoding_alone_gives(name, settings):
    for joined, alone in joined_and_alone(MODELS[name](), beam_size=4, max_len_add=5,
                                          **settings):
        assert_same(joined, alone)


def test_joined_attention_covers_each_sentences_own_steps_and_source():
    pairs = joined_and_alone(real_model(), beam_size=3, n_best=2, alpha=0.6, max_len_add=5,
                             return_attention=True)
    for (joined, alone), src_len in zip(pairs, SRC_LENS):
        assert_same(joined, alone)
        for h, a in zip(joined, alone):
            assert h.attention.shape == a.attention.shape == (a.attention.size(0), src_len)
            torch.testing.assert_close(h.attention, a.attention, atol=1e-6, rtol=0)


def test_joining_a_shortlisted_search_keeps_each_sentences_own_shortlist():
    for joined, alone in joined_and_alone(real_model(), beam_size=4, n_best=3, alpha=0.6,
                                          max_len_add=5, shortlist=restrictive()):
        assert_same(joined, alone)


def test_an_ensemble_joins_like_its_members():
    model = Ensemble([real_model(),
                      real_model(cell="lstm", decoder="luong", attention="general")])
    for joined, alone in joined_and_alone(model, beam_size=3, alpha=0.6, max_len_add=5):
        assert_same(joined, alone)


def test_a_search_empties_and_starts_again():
    model = ToyModel(eos_bias=2.0)
    src, src_lens = make_batch(SRC_LENS)
    search = BeamSearch(model, beam_size=3, max_len_add=5)
    assert len(search) == 0 and search.step() == []
    first = run_joined(search, src, src_lens, joins=[(0, [0])])
    assert len(search) == 0
    again = run_joined(search, src, src_lens, joins=[(0, [0, 1])])
    assert_same(again[0], first[0])


def test_keys_must_be_distinct_and_not_live():
    search = BeamSearch(ToyModel(), beam_size=2)
    src, src_lens = make_batch([3, 4])
    with pytest.raises(ValueError, match="distinct keys"):
        search.add(src, src_lens, ["a", "a"])
    with pytest.raises(ValueError, match="distinct keys"):
        search.add(src, src_lens, ["a"])
    search.add(src, src_lens, ["a", "b"])
    with pytest.raises(ValueError, match="already being decoded"):
        search.add(*one(src, src_lens, 0), ["b"])


def test_a_model_without_resize_source_takes_shorter_sentences_only():
    class NoPad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ToyModel(eos_bias=-5.0)  # never ends early

        def encode(self, src, src_lens):
            return self.inner.encode(src, src_lens)

        def init_state(self, enc):
            return self.inner.init_state(enc)

        def step(self, prev, state, enc):
            return self.inner.step(prev, state, enc)

    search = BeamSearch(NoPad(), beam_size=2, max_len_add=20)
    src, src_lens = make_batch([5, 2, 9])
    search.add(*one(src, src_lens, 0), [0])
    search.step()
    search.add(*one(src, src_lens, 1), [1])  # shorter: padded to the search's width
    search.step()
    with pytest.raises(TypeError, match="resize_source"):
        search.add(*one(src, src_lens, 2), [2])


def test_source_positions_of_finished_sentences_are_dropped():
    # A model that never ends: each sentence runs to its maximum length, here 4 tokens for
    # every source (max_len_ratio 0), so the long sentence that joined first ends first.
    inner = bigram(6, {BOS: {4: 1.0}, 4: {4: 1.0}})
    widths: list[int] = []

    class Recording(torch.nn.Module):
        def encode(self, src, src_lens):
            return inner.encode(src, src_lens)

        def init_state(self, enc):
            return inner.init_state(enc)

        def resize_source(self, enc, length):
            return inner.resize_source(enc, length)

        def step(self, prev, state, enc):
            widths.append(enc.enc_out.size(1))
            return inner.step(prev, state, enc)

    src, src_lens = make_batch([9, 3])
    search = BeamSearch(Recording(), beam_size=2, max_len_ratio=0.0, max_len_add=4)
    done = run_joined(search, src, src_lens, joins=[(0, [0]), (2, [1])])
    assert sorted(done) == [0, 1]
    assert widths == [9, 9, 9, 9, 3, 3]

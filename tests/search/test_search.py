"""Invariants of greedy and beam search, on toy models and on the real model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seq2seq.config import ModelConfig
from seq2seq.models.seq2seq import build_model
from seq2seq.search import (
    BOS,
    EOS,
    PAD,
    Ensemble,
    Hypothesis,
    beam_search,
    greedy_search,
    length_penalty,
    reorder,
)
from seq2seq.search.beam import BeamSearch
from seq2seq.search.beam_steps import keep_best
from seq2seq.search.common import max_output_lengths
from tests.search.toy_models import ToyEncoding, ToyModel, bigram

VOCAB = 32
SRC_LENS = [9, 3, 5, 7, 1, 4]


def real_model(**overrides) -> torch.nn.Module:
    """The project's model, tiny, with weights scaled up so that its choices are clear-cut.

    In float64: scaled-up float32 logits carry ~1e-5 of batch-dependent rounding, and these
    tests are about search, not about float32 matmul.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(emb_size=8, enc_hidden=16, dec_hidden=32, attention_size=16, enc_layers=1,
                      dec_layers=1, **overrides)
    model = build_model(cfg, src_vocab=VOCAB, trg_vocab=VOCAB).eval().double()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(15.0)
        model.decoder.output.bias[EOS] += 1.5  # some hypotheses end by EOS, some at max length
    return model


MODELS = {
    "toy": lambda: ToyModel(eos_bias=2.0),
    "gru-bahdanau": lambda: real_model(),
    "lstm-luong": lambda: real_model(cell="lstm", decoder="luong", attention="general"),
}


@pytest.fixture(params=sorted(MODELS))
def model(request) -> torch.nn.Module:
    return MODELS[request.param]()


def make_batch(lens: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S)`` random sources padded with PAD, and their ``(B,)`` lengths."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (len(lens), max(lens)), generator=generator)
    for i, n in enumerate(lens):
        src[i, n:] = PAD
    return src, torch.tensor(lens)


def one(src: torch.Tensor, src_lens: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence ``i`` alone, without padding."""
    n = int(src_lens[i])
    return src[i:i + 1, :n], src_lens[i:i + 1]


def rescore(model, src, src_lens, i: int, hyp: Hypothesis, max_len: int) -> float:
    """Teacher-forced log-probability of a hypothesis (ending in EOS unless cut at max_len)."""
    cut = len(hyp.tokens) == max_len
    trg = [BOS] + hyp.tokens + ([] if cut else [EOS])
    trg_in, trg_out = torch.tensor([trg[:-1]]), torch.tensor([trg[1:]])
    s, n = one(src, src_lens, i)
    with torch.no_grad():
        return float(model.score(s, n, trg_in, trg_out)[0])


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ------------------------------------------------------------------------------------------
# Greedy and beam 1
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_len,no_repeat_ngram", [(0, 0), (4, 0), (0, 2)])
def test_beam_1_equals_greedy(model, min_len, no_repeat_ngram):
    src, src_lens = make_batch(SRC_LENS)
    greedy = greedy_search(model, src, src_lens, 1.5, 5, min_len=min_len,
                           no_repeat_ngram=no_repeat_ngram)
    beam = beam_search(model, src, src_lens, beam_size=1, max_len_ratio=1.5, max_len_add=5,
                       min_len=min_len, no_repeat_ngram=no_repeat_ngram)
    for g, [b] in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-5)


def test_greedy_alone_equals_batched(model):
    src, src_lens = make_batch(SRC_LENS)
    batched = greedy_search(model, src, src_lens, 1.5, 5)
    for i, hyp in enumerate(batched):
        [alone] = greedy_search(model, *one(src, src_lens, i), 1.5, 5)
        assert alone.tokens == hyp.tokens
        assert alone.log_prob == pytest.approx(hyp.log_prob, abs=1e-5)


def test_greedy_log_prob_equals_teacher_forcing(model):
    src, src_lens = make_batch(SRC_LENS)
    max_lens = max_output_lengths(src_lens, 1.5, 5)
    for i, hyp in enumerate(greedy_search(model, src, src_lens, 1.5, 5)):
        assert hyp.score == hyp.log_prob
        assert rescore(model, src, src_lens, i, hyp, max_lens[i]) == pytest.approx(
            hyp.log_prob, abs=1e-4)


# ------------------------------------------------------------------------------------------
# Beam search
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_beam_alone_equals_batched(model, alpha):
    src, src_lens = make_batch(SRC_LENS)
    batched = beam_search(model, src, src_lens, beam_size=4, n_best=3, alpha=alpha,
                          max_len_add=5)
    # A reordered batch of other sizes too: the output may not depend on the neighbours.
    order = [3, 0, 5]
    src2, src_lens2 = make_batch([SRC_LENS[i] for i in order] + [11, 2], seed=1)
    for j, i in enumerate(order):
        src2[j, :SRC_LENS[i]] = src[i, :SRC_LENS[i]]
    other = beam_search(model, src2, src_lens2, beam_size=4, n_best=3, alpha=alpha,
                        max_len_add=5)
    for i, hyps in enumerate(batched):
        alone = beam_search(model, *one(src, src_lens, i), beam_size=4, n_best=3, alpha=alpha,
                            max_len_add=5)[0]
        compared = [alone] + ([other[order.index(i)]] if i in order else [])
        for hyps2 in compared:
            assert [h.tokens for h in hyps2] == [h.tokens for h in hyps]
            for h, h2 in zip(hyps, hyps2):
                assert h2.score == pytest.approx(h.score, abs=1e-5)
                assert h2.log_prob == pytest.approx(h.log_prob, abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_beam_log_prob_equals_teacher_forcing(model, alpha):
    src, src_lens = make_batch(SRC_LENS)
    max_lens = max_output_lengths(src_lens, 1.5, 5)
    results = beam_search(model, src, src_lens, beam_size=4, n_best=4, alpha=alpha,
                          max_len_add=5)
    for i, hyps in enumerate(results):
        for hyp in hyps:
            assert rescore(model, src, src_lens, i, hyp, max_lens[i]) == pytest.approx(
                hyp.log_prob, abs=1e-4)
            scored = len(hyp.tokens) + (len(hyp.tokens) < max_lens[i])
            assert hyp.score == pytest.approx(hyp.log_prob / length_penalty(scored, alpha))


def test_outputs_cover_eos_and_cut_hypotheses(model):
    """The fixtures exercise both endings, so the tests above check both."""
    src, src_lens = make_batch(SRC_LENS)
    max_lens = max_output_lengths(src_lens, 1.5, 5)
    results = beam_search(model, src, src_lens, beam_size=4, n_best=4, max_len_add=5)
    cut = [len(h.tokens) == max_lens[i] for i, hyps in enumerate(results) for h in hyps]
    assert any(cut) and not all(cut)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_n_best_sorted_distinct_and_complete(model, alpha):
    src, src_lens = make_batch(SRC_LENS)
    for hyps in beam_search(model, src, src_lens, beam_size=5, n_best=5, alpha=alpha):
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5


def test_min_len_respected(model):
    src, src_lens = make_batch(SRC_LENS)
    min_len = 6
    free = beam_search(model, src, src_lens, beam_size=3, n_best=3, max_len_add=10)
    assert any(len(h.tokens) < min_len for hyps in free for h in hyps)  # the test can fail
    for hyps in beam_search(model, src, src_lens, beam_size=3, n_best=3, max_len_add=10,
                            min_len=min_len):
        assert all(len(h.tokens) >= min_len for h in hyps)
    assert all(len(h.tokens) >= min_len
               for h in greedy_search(model, src, src_lens, 1.5, 10, min_len=min_len))


@pytest.mark.parametrize("ratio,add", [(0.5, 1), (1.0, 0), (2.0, 3)])
def test_max_len_respected(model, ratio, add):
    src, src_lens = make_batch(SRC_LENS)
    max_lens = [max(1, math.floor(ratio * n + add)) for n in SRC_LENS]
    for i, hyps in enumerate(beam_search(model, src, src_lens, beam_size=3, n_best=2,
                                         max_len_ratio=ratio, max_len_add=add, min_len=100)):
        # min_len beyond reach: every hypothesis is cut, exactly at its maximum length.
        assert [len(h.tokens) for h in hyps] == [max_lens[i]] * 2
    for i, hyp in enumerate(greedy_search(model, src, src_lens, ratio, add)):
        assert len(hyp.tokens) <= max_lens[i]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_respected(n):
    # A model that loves to repeat 4 5 4 5 ...
    model = bigram(8, {BOS: {4: 1.0}, 4: {5: 0.8, 6: 0.1, EOS: 0.1},
                       5: {4: 0.8, 7: 0.1, EOS: 0.1}, 6: {4: 0.5, 7: 0.5}, 7: {4: 0.5, 6: 0.5}})
    src, src_lens = make_batch([5, 3], seed=0)
    free = beam_search(model, src, src_lens, beam_size=3, n_best=3, max_len_add=8)
    assert any(len(set(ngrams(h.tokens, n))) < len(ngrams(h.tokens, n))
               for hyps in free for h in hyps)
    for hyps in beam_search(model, src, src_lens, beam_size=3, n_best=3, max_len_add=8,
                            no_repeat_ngram=n):
        for h in hyps:
            assert len(set(ngrams(h.tokens, n))) == len(ngrams(h.tokens, n)), h.tokens
    for h in greedy_search(model, src, src_lens, 1.5, 8, no_repeat_ngram=n):
        assert len(set(ngrams(h.tokens, n))) == len(ngrams(h.tokens, n)), h.tokens


def test_beam_beats_greedy_on_a_garden_path():
    # Greedy takes A (0.6) and then pays for it: A C EOS = 0.6 * 0.36; B EOS = 0.4 * 0.9.
    a, b, c, d = 4, 5, 6, 7
    model = bigram(8, {BOS: {a: 0.6, b: 0.4}, a: {EOS: 0.3, c: 0.36, d: 0.34},
                       b: {EOS: 0.9, c: 0.1}})
    src, src_lens = make_batch([3])
    [greedy] = greedy_search(model, src, src_lens, 1.5, 5)
    [[beam]] = beam_search(model, src, src_lens, beam_size=2)
    assert greedy.tokens == [a, c]
    assert beam.tokens == [b]
    assert beam.log_prob == pytest.approx(math.log(0.4 * 0.9), abs=1e-4)
    assert beam.log_prob > greedy.log_prob


@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
def test_beam_wider_than_search_space_is_exact(alpha):
    """With every prefix kept, early stopping must not lose the true n best (exhaustive)."""
    vocab, max_len = 7, 4
    generator = torch.Generator().manual_seed(3)
    probs = torch.rand(vocab, vocab, generator=generator) ** 3
    probs[:, [PAD, BOS]] = 0.0
    model = bigram(vocab, {prev: dict(enumerate(probs[prev].tolist())) for prev in range(vocab)})
    words = [w for w in range(vocab) if w not in (PAD, BOS, EOS)]
    table = model.table.tolist()

    def best(n_best: int) -> list[tuple[float, list[int]]]:
        found = []
        for length in range(max_len + 1):
            for seq in itertools.product(words, repeat=length):
                full = [BOS, *seq] + ([EOS] if length < max_len else [])
                log_prob = sum(table[p][t] for p, t in itertools.pairwise(full))
                found.append((log_prob / length_penalty(len(full) - 1, alpha), list(seq)))
        return sorted(found, key=lambda x: -x[0])[:n_best]

    src, src_lens = torch.tensor([[4, 5]]), torch.tensor([2])
    # Enough beams for every candidate of the last step (EOS included), so none is dropped.
    beam_size = (len(words) + 1) * len(words) ** (max_len - 1)
    [hyps] = beam_search(model, src, src_lens, beam_size=beam_size, n_best=3,
                         alpha=alpha, max_len_ratio=0.0, max_len_add=max_len)
    expected = best(3)
    assert [h.tokens for h in hyps] == [seq for _, seq in expected]
    assert [h.score for h in hyps] == pytest.approx([s for s, _ in expected], abs=1e-5)


def test_early_stop_waits_for_beams_the_length_penalty_can_still_lift():
    # With alpha 2, "EOS" right away scores log 0.6 = -0.51. After one step the live "A" has
    # log 0.4 = -0.92, -0.67 even at lp(2): a bound at the current length would stop here. But
    # A A A A A A (cut at 6) has log(0.4 * 0.9^5) = -1.44, which lp(6) = 3.36 lifts to -0.43.
    a = 4
    model = bigram(6, {BOS: {EOS: 0.6, a: 0.4}, a: {a: 0.9, EOS: 0.1}})
    src, src_lens = make_batch([2])
    [[hyp]] = beam_search(model, src, src_lens, beam_size=2, alpha=2.0, max_len_ratio=0.0,
                          max_len_add=6)
    assert hyp.tokens == [a] * 6
    assert hyp.score == pytest.approx(math.log(0.4 * 0.9**5) / length_penalty(6, 2.0), abs=1e-4)
    # Without the penalty the finished "EOS" wins.
    [[hyp]] = beam_search(model, src, src_lens, beam_size=2, alpha=0.0, max_len_ratio=0.0,
                          max_len_add=6)
    assert hyp.tokens == []


def test_attention_rows_per_scored_token():
    model = ToyModel(eos_bias=2.0)
    src, src_lens = make_batch(SRC_LENS)
    max_lens = max_output_lengths(src_lens, 1.5, 5)
    plain = beam_search(model, src, src_lens, beam_size=3, n_best=2, max_len_add=5)
    with_attn = beam_search(model, src, src_lens, beam_size=3, n_best=2, max_len_add=5,
                            return_attention=True)
    for i, (hyps, hyps_attn) in enumerate(zip(plain, with_attn)):
        for h, ha in zip(hyps, hyps_attn):
            assert h.tokens == ha.tokens and h.attention is None
            rows = len(h.tokens) + (len(h.tokens) < max_lens[i])
            assert ha.attention.shape == (rows, SRC_LENS[i])
            assert torch.allclose(ha.attention.sum(1), torch.ones(rows))
    # Attention row t is the attention of step t: compare with greedy's, which is plain to see.
    greedy = greedy_search(model, src, src_lens, 1.5, 5, return_attention=True)
    beam1 = beam_search(model, src, src_lens, beam_size=1, max_len_add=5, return_attention=True)
    for g, [b] in zip(greedy, beam1):
        assert torch.allclose(g.attention, b.attention, atol=1e-6)


def test_attention_of_a_hypothesis_holds_no_more_than_itself():
    # Hypotheses ending by EOS and cut at their maximum length, from beam and greedy search:
    # each attention matrix owns its memory, not a view of the search's whole history.
    model = real_model()
    src, src_lens = make_batch(SRC_LENS)
    beam = beam_search(model, src, src_lens, beam_size=3, n_best=3, max_len_add=5,
                       return_attention=True)
    greedy = greedy_search(model, src, src_lens, 1.5, 5, return_attention=True)
    hyps = [h for nbest in beam for h in nbest] + greedy
    assert {len(h.tokens) < limit for h, limit in zip(
        greedy, max_output_lengths(src_lens, 1.5, 5))} == {True, False}
    for h in hyps:
        owned = h.attention.untyped_storage().nbytes()
        assert owned == h.attention.numel() * h.attention.element_size()


def test_attention_made_in_pieces_leaves_the_search_unchanged(monkeypatch):
    # On a CPU the decoder makes Bahdanau's hidden layer a few sentences at a time; a fp32
    # model finds the same hypotheses with the same scores whatever the piece size.
    from seq2seq.models import attention as module

    model = real_model().float()
    src, src_lens = make_batch(SRC_LENS)
    whole = beam_search(model, src, src_lens, beam_size=4, n_best=2, alpha=0.6, max_len_add=5)
    for piece in (1, 4 * 16 * 9 * 2):  # one sentence per piece; two of the longest
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", piece)
        pieces = beam_search(model, src, src_lens, beam_size=4, n_best=2, alpha=0.6,
                             max_len_add=5)
        assert [[(h.tokens, h.score) for h in hyps] for hyps in pieces] == \
            [[(h.tokens, h.score) for h in hyps] for hyps in whole]


class RowCounter:
    """Wraps a model and records how many rows each step computes (decoder state and enc)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def encode(self, src, src_lens):
        return self.model.encode(src, src_lens)

    def init_state(self, enc):
        return self.model.init_state(enc)

    def step(self, prev_tokens, state, enc):
        self.rows.append((prev_tokens.size(0), enc[0].size(0)))
        return self.model.step(prev_tokens, state, enc)


def test_finished_sentences_stop_costing_compute():
    # A model that never ends: each sentence runs to its maximum length, 1 and 5 tokens.
    a = 4
    model = bigram(6, {BOS: {a: 1.0}, a: {a: 1.0}})
    src, src_lens = make_batch([1, 5])
    counter = RowCounter(model)
    beam_search(counter, src, src_lens, beam_size=3, max_len_ratio=1.0, max_len_add=0)
    # Beam rows (3 per sentence) against encoder rows (one per sentence, shared by its beams).
    assert counter.rows == [(6, 2)] + [(3, 1)] * 4
    counter = RowCounter(model)
    greedy_search(counter, src, src_lens, max_len_ratio=1.0, max_len_add=0)
    assert counter.rows == [(2, 2)] + [(1, 1)] * 4


@pytest.mark.parametrize("name", ["toy", "gru-bahdanau"])
def test_a_search_keeps_no_more_finished_hypotheses_than_it_returns(name):
    """Each sentence keeps its best ``n_best`` finished hypotheses, not every one found: the
    others cost memory with the square of the output length. Its results are unchanged."""
    src, src_lens = make_batch(SRC_LENS)
    settings = dict(beam_size=4, n_best=2, alpha=1.0, max_len_ratio=3.0, max_len_add=10)
    search = BeamSearch(MODELS[name](), **settings)
    search.add(src, src_lens, list(range(len(SRC_LENS))))
    results = {}
    while len(search):
        results.update(search.step())
        assert all(len(hyps) <= 2 for hyps in search._finished.values())
    alone = [beam_search(MODELS[name](), *one(src, src_lens, i), **settings)[0]
             for i in range(len(SRC_LENS))]
    assert [[h.tokens for h in results[i]] for i in range(len(SRC_LENS))] == [
        [h.tokens for h in hyps] for hyps in alone]


def test_keeping_the_best_finished_hypotheses_keeps_the_order_of_a_full_sort():
    """Trimmed after every step, the kept ones are the first ``n`` of the whole list sorted
    stably by score: of equal scores, the ones found first."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = 1 + trial % 3
        kept, found = [], []
        for _ in range(int(torch.randint(1, 6, (1,), generator=generator))):
            for _ in range(int(torch.randint(0, 5, (1,), generator=generator))):
                score = float(torch.randint(-3, 0, (1,), generator=generator))  # many ties
                hyp = Hypothesis(tokens=[len(found)], score=score, log_prob=score)
                kept.append(hyp)
                found.append(hyp)
            keep_best(kept, n)
        kept.sort(key=lambda h: -h.score)
        assert kept == sorted(found, key=lambda h: -h.score)[:n]


def test_n_best_larger_than_beam_is_rejected():
    src, src_lens = make_batch([3])
    with pytest.raises(ValueError, match="n_best"):
        beam_search(ToyModel(), src, src_lens, beam_size=2, n_best=3)


# ------------------------------------------------------------------------------------------
# Ensembles and reordering
# ------------------------------------------------------------------------------------------


def test_ensemble_of_one_equals_the_model(model):
    src, src_lens = make_batch(SRC_LENS)
    single = beam_search(model, src, src_lens, beam_size=3, n_best=3, alpha=0.6)
    ensemble = beam_search(Ensemble([model]), src, src_lens, beam_size=3, n_best=3, alpha=0.6)
    for hyps, hyps_e in zip(single, ensemble):
        assert [h.tokens for h in hyps] == [h.tokens for h in hyps_e]
        assert [h.log_prob for h in hyps] == [h.log_prob for h in hyps_e]


def test_ensemble_of_two_identical_models_equals_one(model):
    src, src_lens = make_batch(SRC_LENS)
    single = beam_search(model, src, src_lens, beam_size=3, n_best=3, alpha=0.6)
    ensemble = beam_search(Ensemble([model, model]), src, src_lens, beam_size=3, n_best=3,
                           alpha=0.6)
    for hyps, hyps_e in zip(single, ensemble):
        assert [h.tokens for h in hyps] == [h.tokens for h in hyps_e]
        assert [h.log_prob for h in hyps] == pytest.approx([h.log_prob for h in hyps_e],
                                                           abs=1e-5)


def test_ensemble_averages_probabilities_and_decodes_consistently():
    first, second = ToyModel(seed=1), ToyModel(seed=2)
    ensemble = Ensemble([first, second])
    src, src_lens = make_batch(SRC_LENS)
    prev = torch.full((len(SRC_LENS),), BOS)
    enc = ensemble.encode(src, src_lens)
    log_probs, _, attn = ensemble.step(prev, ensemble.init_state(enc), enc)
    members = [m.step(prev, m.init_state(e), e) for m, e in zip([first, second], enc)]
    expected = (members[0][0].exp() + members[1][0].exp()).div(2).log()
    assert torch.allclose(log_probs, expected, atol=1e-6)
    assert torch.allclose(attn, (members[0][2] + members[1][2]) / 2)
    # Nested enc and state reorder like a single model's: batching changes nothing.
    batched = beam_search(ensemble, src, src_lens, beam_size=3, n_best=2, alpha=0.6)
    for i, hyps in enumerate(batched):
        alone = beam_search(ensemble, *one(src, src_lens, i), beam_size=3, n_best=2, alpha=0.6)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in hyps]


def test_reorder_follows_nested_named_tuples():
    enc = ToyEncoding(torch.arange(3.0), torch.tensor([True, False, True]), torch.eye(3))
    nest = (enc, (torch.arange(3), None))
    out = reorder(nest, torch.tensor([2, 2, 0]))
    assert isinstance(out[0], ToyEncoding)
    assert out[0].enc_out.tolist() == [2.0, 2.0, 0.0]
    assert out[0].src_mask.tolist() == [True, True, True]
    assert out[0].final.tolist() == [[0, 0, 1], [0, 0, 1], [1, 0, 0]]
    assert out[1][0].tolist() == [2, 2, 0] and out[1][1] is None

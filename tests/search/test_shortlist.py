"""The lexical shortlist: the IBM Model 1 lexicon, per-sentence shortlists, beam search on them."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import DecodeConfig
from seq2seq.decoding import decode_ids
from seq2seq.quantize import quantize_for_cpu
from seq2seq.search import EOS, PAD, UNK, beam_search
from seq2seq.search.shortlist import (
    TOP_STORED,
    Lexicon,
    Shortlist,
    build_lexicon,
    sentence_shortlists,
)
from tests.search.test_search import SRC_LENS, VOCAB, make_batch, real_model


def word_for_word(pairs: int = 400, seed: int = 0):
    """Pairs whose target is the source read through a fixed permutation of the ids, shuffled
    within the sentence, plus one filler token: IBM Model 1 must recover the permutation."""
    generator = torch.Generator().manual_seed(seed)
    mapping = (torch.randperm(VOCAB - 4, generator=generator) + 4).tolist()
    mapping = dict(zip(range(4, VOCAB), mapping))
    src_ids, trg_ids = [], []
    for _ in range(pairs):
        n = int(torch.randint(2, 8, (1,), generator=generator))
        src = torch.randint(4, VOCAB, (n,), generator=generator).tolist()
        trg = [mapping[s] for s in src]
        order = torch.randperm(n, generator=generator).tolist()
        src_ids.append(src)
        trg_ids.append([trg[i] for i in order] + [mapping[4]])
    return src_ids, trg_ids, mapping


def test_ibm1_recovers_a_word_for_word_mapping():
    src_ids, trg_ids, mapping = word_for_word()
    lexicon = build_lexicon(src_ids, trg_ids, VOCAB, VOCAB)
    assert lexicon.table.shape == (VOCAB, TOP_STORED)
    for s, t in mapping.items():
        assert int(lexicon.table[s, 0]) == t, s
    # ids never seen as sources have no entries; every listed target was seen
    assert (lexicon.table[:4] == -1).all()
    listed = lexicon.table[lexicon.table >= 0]
    assert set(listed.tolist()) <= {t for trg in trg_ids for t in trg}
    # frequent: the filler target first (it ends every pair)
    assert int(lexicon.frequent[0]) == mapping[4]
    assert Lexicon.from_state(lexicon.to_state()).table.equal(lexicon.table)


def test_ibm1_in_chunks_equals_ibm1_at_once():
    """The E-step works on a bounded number of token pairs at a time (its memory grew with the
    corpus): any chunking gives the same table, empty targets and one-pair chunks included."""
    generator = torch.Generator().manual_seed(3)
    src_ids, trg_ids = [], []
    for _ in range(300):
        n = int(torch.randint(1, 12, (1,), generator=generator))
        src_ids.append(torch.randint(4, VOCAB, (n,), generator=generator).tolist())
        trg_ids.append(torch.randint(4, VOCAB, (max(0, n - 2),), generator=generator).tolist())
    whole = build_lexicon(src_ids, trg_ids, VOCAB, VOCAB, chunk_pairs=10**9)
    assert (whole.table >= 0).sum() > VOCAB  # a table worth comparing
    for chunk_pairs in (1, 37, 500):
        chunked = build_lexicon(src_ids, trg_ids, VOCAB, VOCAB, chunk_pairs=chunk_pairs)
        assert chunked.table.equal(whole.table) and chunked.frequent.equal(whole.frequent)


def test_sentence_shortlists_hold_each_sentences_own_candidates():
    src_ids, trg_ids, mapping = word_for_word()
    lexicon = build_lexicon(src_ids, trg_ids, VOCAB, VOCAB)
    src, _ = make_batch(SRC_LENS)
    ids, allowed = sentence_shortlists(lexicon, src, top_k=1, frequent=2)
    assert ids.tolist() == sorted(set(ids.tolist()))
    assert allowed.shape == (len(SRC_LENS), ids.numel())
    common = set(lexicon.frequent[:2].tolist()) | {UNK, EOS}
    for i, n in enumerate(SRC_LENS):
        own = {mapping[s] for s in src[i, :n].tolist()} | common
        assert set(ids[allowed[i]].tolist()) == own  # padding adds nothing
    assert set(ids.tolist()) == set().union(*(set(ids[a].tolist()) for a in allowed))


def full_lexicon() -> Lexicon:
    """A lexicon whose frequent list is the whole vocabulary: the shortlist is every id."""
    return Lexicon(table=torch.full((VOCAB, TOP_STORED), -1, dtype=torch.long),
                   frequent=torch.arange(VOCAB))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_shortlist_of_every_token_changes_nothing(cell):
    model = real_model(cell=cell)
    src, src_lens = make_batch(SRC_LENS)
    plain = beam_search(model, src, src_lens, beam_size=4, n_best=2, alpha=0.6, max_len_add=5)
    listed = beam_search(model, src, src_lens, beam_size=4, n_best=2, alpha=0.6, max_len_add=5,
                         shortlist=Shortlist(full_lexicon(), top_k=1, frequent=VOCAB))
    for hyps, hyps2 in zip(plain, listed):
        assert [h.tokens for h in hyps] == [h.tokens for h in hyps2]
        for h, h2 in zip(hyps, hyps2):
            assert h2.score == pytest.approx(h.score, abs=1e-5)


def restrictive() -> Shortlist:
    src_ids, trg_ids, _ = word_for_word()
    return Shortlist(build_lexicon(src_ids, trg_ids, VOCAB, VOCAB), top_k=2, frequent=3)


def test_beam_output_stays_in_the_sentences_own_shortlist_and_ignores_its_neighbours():
    model = real_model()
    shortlist = restrictive()
    src, src_lens = make_batch(SRC_LENS)
    batched = beam_search(model, src, src_lens, beam_size=4, n_best=3, alpha=0.6,
                          max_len_add=5, shortlist=shortlist)
    ids, allowed = shortlist.for_batch(src)
    plain = beam_search(model, src, src_lens, beam_size=4, n_best=3, alpha=0.6, max_len_add=5)
    assert any(h.tokens != p.tokens for hs, ps in zip(batched, plain) for h, p in zip(hs, ps))
    for i, hyps in enumerate(batched):
        own = set(ids[allowed[i]].tolist())
        assert all(set(h.tokens) <= own for h in hyps)
        n = SRC_LENS[i]
        alone = beam_search(model, src[i:i + 1, :n], src_lens[i:i + 1], beam_size=4, n_best=3,
                            alpha=0.6, max_len_add=5, shortlist=shortlist)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        for h, h2 in zip(hyps, alone):
            assert h2.score == pytest.approx(h.score, abs=1e-5)


def test_scores_are_normalised_over_the_sentences_own_shortlist():
    """A hypothesis' log-probability is the teacher-forced one, with the softmax taken over the
    shortlist of its sentence."""
    model = real_model()
    shortlist = restrictive()
    src, src_lens = make_batch(SRC_LENS)
    hyps = beam_search(model, src, src_lens, beam_size=3, alpha=0.0, max_len_add=5,
                       shortlist=shortlist)
    ids, allowed = shortlist.for_batch(src)
    for i, (best,) in enumerate(h[:1] for h in hyps):
        n = SRC_LENS[i]
        own = ids[allowed[i]]
        trg = [2] + best.tokens + ([EOS] if len(best.tokens) < n + 5 else [])
        with torch.no_grad():
            logits = model(src[i:i + 1, :n], src_lens[i:i + 1], torch.tensor([trg[:-1]]))[0]
        log_probs = torch.log_softmax(logits[:, own], dim=-1)
        column = {int(t): c for c, t in enumerate(own)}
        expected = sum(float(log_probs[j, column[t]]) for j, t in enumerate(trg[1:]))
        assert best.log_prob == pytest.approx(expected, abs=1e-5)


def test_greedy_and_the_graphed_search_ignore_the_shortlist():
    model = real_model()
    src, _ = make_batch(SRC_LENS)
    ids = [src[i, :n].tolist() for i, n in enumerate(SRC_LENS)]
    greedy = DecodeConfig(beam_size=1, alpha=0.0, max_len_add=5)
    with_list = DecodeConfig(beam_size=1, alpha=0.0, max_len_add=5, shortlist=2,
                             shortlist_frequent=3)
    lexicon = restrictive().lexicon
    plain = decode_ids(model, ids, greedy, torch.device("cpu"))
    listed = decode_ids(model, ids, with_list, torch.device("cpu"), lexicon=lexicon)
    assert [[h.tokens for h in n] for n in plain] == [[h.tokens for h in n] for n in listed]
    with pytest.raises(ValueError, match="needs a lexicon"):
        decode_ids(model, ids, DecodeConfig(beam_size=3, shortlist=2), torch.device("cpu"))


def test_int8_models_compute_only_the_shortlisted_rows_with_their_full_values():
    model = real_model().float()
    quantized = quantize_for_cpu(model)
    shortlist = restrictive()
    src, src_lens = make_batch(SRC_LENS)
    ids, allowed = shortlist.for_batch(src)
    rows = quantized.output_rows(ids)
    assert rows.layer.out_features == len(ids) < VOCAB
    with torch.no_grad():
        enc = quantized.encode(src, src_lens)
        prev = torch.full((src.size(0),), 1, dtype=torch.long)
        state = quantized.init_state(enc)
        step = quantized.decoder.step
        full, _, _ = step(prev, state, enc.enc_out, enc.keys, enc.src_mask)
        listed, _, _ = step(prev, state, enc.enc_out, enc.keys, enc.src_mask, rows)
    assert torch.equal(listed, full.index_select(1, ids))  # the logits, before normalising
    hyps = beam_search(quantized, src, src_lens, beam_size=3, max_len_add=5,
                       shortlist=shortlist)
    for i, nbest in enumerate(hyps):
        assert set(nbest[0].tokens) <= set(ids[allowed[i]].tolist())
    assert PAD not in ids.tolist()


def test_an_ensemble_restricts_every_member_to_the_same_shortlist():
    from seq2seq.search import Ensemble

    shortlist = restrictive()
    src, src_lens = make_batch(SRC_LENS)
    single = beam_search(real_model(), src, src_lens, beam_size=3, alpha=0.6, max_len_add=5,
                         shortlist=shortlist)
    pair = beam_search(Ensemble([real_model(), real_model()]), src, src_lens, beam_size=3,
                       alpha=0.6, max_len_add=5, shortlist=shortlist)
    for hyps, hyps2 in zip(single, pair):
        assert [h.tokens for h in hyps] == [h.tokens for h in hyps2]
        assert hyps2[0].score == pytest.approx(hyps[0].score, abs=1e-5)


def test_an_int8_layers_selected_rows_follow_its_weights_when_they_change():
    from seq2seq.quantize import Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear.quantize(torch.randn(50, 8), torch.randn(50))
    ids = torch.tensor([3, 7, 40])
    x = torch.randn(4, 8)
    assert torch.equal(layer.select(ids)(x), layer(x)[:, ids])
    other = Int8Linear.quantize(torch.randn(50, 8), torch.randn(50))
    layer.load_state_dict(other.state_dict())  # written in place
    assert torch.equal(layer.select(ids)(x), other(x)[:, ids])
    layer.qweight = other.qweight.flip(0).contiguous()  # replaced
    assert torch.equal(layer.select(ids).qweight, layer.qweight[ids])

"""Fast paths against the plain ones: the fused decoder against the RNN-module decoder (same
loss, same gradients, same search output), and int8 quantised decoding within 1 BLEU of fp32."""

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from seq2seq.config import ModelConfig
from seq2seq.models import PAD, build_model
from seq2seq.quantize import Int8Linear, Int8PackedRNN, Int8RNN, quantize_for_cpu
from seq2seq.scoring import corpus_bleu
from seq2seq.search import beam_search, greedy_search

VOCAB = 32
# Every decoder that runs step by step in training (luong without input feeding runs all steps
# in one RNN call on both paths, so it has no fused path to test).
SEQUENTIAL = [(cell, attention, decoder, feeding)
              for cell, attention, decoder, feeding in itertools.product(
                  ("gru", "lstm", "rnn"), ("bahdanau", "general"), ("bahdanau", "luong"),
                  (True, False))
              if decoder == "bahdanau" or feeding]


def tiny(cell: str, attention: str, decoder: str, feeding: bool, dropout: float = 0.0,
         layers: int = 2) -> ModelConfig:
    return ModelConfig(cell=cell, emb_size=8, enc_hidden=16, enc_layers=layers,
                       bidirectional=True, dec_hidden=16, dec_layers=layers,
                       attention=attention, attention_size=16, decoder=decoder,
                       input_feeding=feeding, dropout=dropout)


def batch(lens: list[int], trg_len: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    src_lens = torch.tensor(lens)
    src = torch.randint(4, VOCAB, (len(lens), max(lens)), generator=gen)
    src[torch.arange(max(lens)) >= src_lens.unsqueeze(1)] = PAD
    trg = torch.randint(4, VOCAB, (len(lens), trg_len + 1), generator=gen)
    trg[1, 5:] = PAD  # a shorter target: padding must not matter either way
    return src, src_lens, trg[:, :-1], trg[:, 1:]


def loss_and_grads(model, fused: bool, src, src_lens, trg_in, trg_out):
    model.decoder.fused = fused
    model.zero_grad(set_to_none=True)
    logits = model(src, src_lens, trg_in)
    loss = F.cross_entropy(logits.flatten(0, 1), trg_out.flatten(), ignore_index=PAD,
                           reduction="sum", label_smoothing=0.1)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("cell,attention,decoder,feeding", SEQUENTIAL)
def test_fused_training_path_has_the_plain_loss_and_gradients(cell, attention, decoder, feeding):
    torch.manual_seed(0)
    model = build_model(tiny(cell, attention, decoder, feeding), VOCAB, VOCAB)
    model.train()  # dropout 0, so training mode is deterministic yet exercises its branches
    data = batch([6, 3, 5])
    plain_logits, plain_loss, plain_grads = loss_and_grads(model, False, *data)
    fused_logits, fused_loss, fused_grads = loss_and_grads(model, True, *data)
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-4, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # The gradient is not trivially zero: the comparison means something.
    assert plain_grads["decoder.rnn.weight_ih_l0"].abs().sum() > 0


def test_fused_path_is_the_default_and_only_dropout_streams_differ():
    """With dropout the two paths draw different masks, but the same expected function: in eval
    mode they agree, in training mode both are finite and differ from eval."""
    torch.manual_seed(0)
    model = build_model(tiny("gru", "bahdanau", "bahdanau", True, dropout=0.3), VOCAB, VOCAB)
    assert model.decoder.fused
    src, src_lens, trg_in, _ = batch([6, 3, 5])
    model.eval()
    with torch.no_grad():
        fused = model(src, src_lens, trg_in)
        model.decoder.fused = False
        plain = model(src, src_lens, trg_in)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    model.train()
    model.decoder.fused = True
    with torch.no_grad():
        dropped = model(src, src_lens, trg_in)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, fused)


@pytest.mark.parametrize("cell,decoder", [("gru", "bahdanau"), ("lstm", "luong")])
def test_fused_step_gives_the_plain_search_output(cell, decoder):
    torch.manual_seed(0)
    model = build_model(tiny(cell, "bahdanau", decoder, True), VOCAB, VOCAB).eval()
    src, src_lens, _, _ = batch([6, 3, 5, 1])
    results = {}
    for fused in (False, True):
        model.decoder.fused = fused
        beams = beam_search(model, src, src_lens, beam_size=3, n_best=2, alpha=0.6,
                            max_len_ratio=1.5, max_len_add=4)
        greedy = greedy_search(model, src, src_lens, max_len_ratio=1.5, max_len_add=4)
        results[fused] = ([[h.tokens for h in nbest] for nbest in beams],
                          [[h.score for h in nbest] for nbest in beams],
                          [h.tokens for h in greedy])
    assert results[True][0] == results[False][0]
    assert results[True][2] == results[False][2]
    for fused_scores, plain_scores in zip(results[True][1], results[False][1]):
        assert fused_scores == pytest.approx(plain_scores, abs=1e-5)


def test_quantised_model_keeps_the_search_interface_and_leaves_the_original():
    torch.manual_seed(0)
    model = build_model(tiny("lstm", "general", "luong", True), VOCAB, VOCAB).eval()
    before = copy.deepcopy(model.state_dict())
    quantised = quantize_for_cpu(model)
    assert model.decoder.fused and not quantised.decoder.fused
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(quantised.decoder.output, Int8Linear)
    assert isinstance(quantised.decoder.rnn, Int8RNN)
    assert isinstance(quantised.encoder.rnn, Int8PackedRNN)
    assert isinstance(model.encoder.rnn, torch.nn.LSTM)
    src, src_lens, _, _ = batch([6, 3])
    enc = quantised.encode(src, src_lens)
    log_probs, state, attn = quantised.step(torch.full((2,), 2), quantised.init_state(enc), enc)
    assert log_probs.shape == (2, VOCAB) and attn.shape == (2, src.size(1))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2))
    assert len(beam_search(quantised, src, src_lens, beam_size=2, max_len_ratio=1.0,
                           max_len_add=2)) == 2


def test_int8_leaves_only_vector_products_in_float():
    torch.manual_seed(0)
    model = build_model(tiny("gru", "bahdanau", "bahdanau", True), VOCAB, VOCAB).eval()
    quantised = quantize_for_cpu(model)
    linears = {name: type(module) for name, module in quantised.named_modules()
               if isinstance(module, (torch.nn.Linear, Int8Linear))}
    # Bahdanau's v has one output: quantising its (beams, S, A) input each step costs more
    # than the product
    assert linears.pop("decoder.attention.energy_layer") is torch.nn.Linear
    assert linears and set(linears.values()) == {Int8Linear}, linears


def test_int8_linear_is_close_to_float_and_each_row_depends_on_itself_only(int8_kernel):
    torch.manual_seed(3)
    linear = torch.nn.Linear(37, 53)
    int8 = Int8Linear.quantize(linear.weight, linear.bias)
    assert int8.kernel == int8_kernel
    x = torch.randn(9, 4, 37)
    x[0, 0] *= 100  # one large row: a scale per batch would coarsen every other row
    y = int8(x)
    assert y.shape == (9, 4, 53)
    close = linear(x[1:]).detach()
    assert float((y[1:] - close).abs().max()) < 0.02 * float(close.abs().max())
    for i in range(9):  # bitwise the same alone as in the batch
        assert torch.equal(int8(x[i]), y[i])


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_int8_rnn_steps_like_the_float_module(cell, int8_kernel):
    from seq2seq.models.encoder import make_rnn

    torch.manual_seed(4)
    rnn = make_rnn(cell, 12, 16, 2, 0.0).eval()
    x = torch.randn(5, 3, 12)
    h = torch.randn(2, 5, 16) * 0.5
    hx = (h, torch.randn(2, 5, 16) * 0.5) if cell == "lstm" else h
    want, want_hx = rnn(x, hx)
    got, got_hx = Int8RNN(rnn)(x, hx)
    torch.testing.assert_close(got, want, atol=0.03, rtol=0)
    for a, b in zip(got_hx if cell == "lstm" else [got_hx], want_hx if cell == "lstm"
                    else [want_hx]):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_int8_rnn_looks_the_embeddings_gates_up_as_the_float_module_multiplies(cell,
                                                                             int8_kernel):
    from seq2seq.models.encoder import make_rnn

    torch.manual_seed(6)
    embedding = torch.nn.Embedding(VOCAB, 8)
    rnn = make_rnn(cell, 8 + 16, 16, 2, 0.0).eval()  # input rows [embedding; feed]
    tokens = torch.randint(0, VOCAB, (5, 3))
    x = torch.cat([embedding(tokens), torch.randn(5, 3, 16)], dim=-1).detach()
    h = torch.randn(2, 5, 16) * 0.5
    hx = (h, torch.randn(2, 5, 16) * 0.5) if cell == "lstm" else h
    want, want_hx = rnn(x, hx)
    int8 = Int8RNN(rnn, embedding)
    assert int8.token_gates.shape == (VOCAB, rnn.weight_ih_l0.size(0))
    assert int8.ih[0].in_features == 16  # only the rest of the row is multiplied
    got, got_hx = int8(x, hx, tokens)
    torch.testing.assert_close(got, want, atol=0.03, rtol=0)
    for a, b in zip(got_hx if cell == "lstm" else [got_hx], want_hx if cell == "lstm"
                    else [want_hx]):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0)
    # without the embedding: the whole row is multiplied in int8
    plain = Int8RNN(rnn)
    assert plain.token_gates is None and plain.ih[0].in_features == 24
    with pytest.raises(ValueError, match="needs their tokens"):
        int8(x, hx)
    with pytest.raises(ValueError, match="needs their tokens"):
        int8(x, hx, tokens[:, :2])


def test_the_decoder_gets_its_embedding_table_where_it_is_small_enough(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny("gru", "bahdanau", "bahdanau", True), VOCAB, VOCAB).eval()
    assert quantize_for_cpu(model).decoder.rnn.token_gates is not None
    rows = model.decoder.rnn.weight_ih_l0.size(0)
    monkeypatch.setattr(Int8RNN, "MAX_TABLE", VOCAB * rows - 1)
    assert quantize_for_cpu(model).decoder.rnn.token_gates is None
    monkeypatch.setattr(Int8RNN, "MAX_TABLE", VOCAB * rows)
    assert quantize_for_cpu(model).decoder.rnn.token_gates is not None


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_int8_encoder_rnn_runs_like_the_float_module_over_packed_input(cell, bidirectional,
                                                                      int8_kernel):
    from torch.nn.utils.rnn import pack_padded_sequence

    from seq2seq.models.encoder import make_rnn

    torch.manual_seed(5)
    rnn = make_rnn(cell, 12, 16, 2, 0.0, bidirectional).eval()
    x = torch.randn(4, 6, 12)
    packed = pack_padded_sequence(x, torch.tensor([3, 6, 1, 4]), batch_first=True,
                                  enforce_sorted=False)
    int8 = Int8PackedRNN(rnn)
    assert all(m.kernel == int8_kernel for m in int8.modules() if isinstance(m, Int8Linear))
    want, want_hx = rnn(packed)
    got, got_hx = int8(packed)
    assert torch.equal(got.batch_sizes, want.batch_sizes)
    torch.testing.assert_close(got.data, want.data, atol=0.03, rtol=0)
    for a, b in zip(got_hx if cell == "lstm" else [got_hx], want_hx if cell == "lstm"
                    else [want_hx]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="packed input from zero states"):
        int8(x)


def test_int8_encoding_of_a_sentence_is_the_same_bits_whatever_its_batch(int8_kernel):
    torch.manual_seed(0)
    int8 = quantize_for_cpu(build_model(tiny("gru", "bahdanau", "luong", True), VOCAB,
                                        VOCAB).eval())
    src, src_lens, _, _ = batch([7, 3, 5, 1])
    with torch.inference_mode():
        together = int8.encode(src, src_lens)
        for i, n in enumerate(src_lens.tolist()):
            alone = int8.encode(src[i:i + 1, :n], src_lens[i:i + 1])
            assert torch.equal(alone.enc_out[0], together.enc_out[i, :n])
            assert torch.equal(alone.keys[0], together.keys[i, :n])
            assert torch.equal(alone.final[0], together.final[i])


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_int8_search_gives_each_sentence_what_it_gets_alone(cell, int8_kernel):
    torch.manual_seed(0)
    model = build_model(tiny(cell, "bahdanau", "luong", True), VOCAB, VOCAB).eval()
    int8 = quantize_for_cpu(model)
    src, src_lens, _, _ = batch([7, 3, 5])
    together = beam_search(int8, src, src_lens, beam_size=3, n_best=2, alpha=0.6,
                           max_len_ratio=1.5, max_len_add=4)
    for i in range(3):
        alone = beam_search(int8, src[i:i + 1, :int(src_lens[i])], src_lens[i:i + 1],
                            beam_size=3, n_best=2, alpha=0.6, max_len_ratio=1.5, max_len_add=4)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in together[i]]
        assert [h.score for h in alone[0]] == pytest.approx([h.score for h in together[i]],
                                                              abs=1e-5)


# ---- quantised decoding of a trained model ---------------------------------------------------

COPY_VOCAB = 24
FIRST_WORD = 4  # ids 0..3 are PAD, UNK, BOS, EOS


def copy_task(n: int, seed: int):
    """Reverse a random sequence of 3-8 word ids: learnable in seconds, needs attention."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 9, (n,), generator=gen)
    srcs = [torch.randint(FIRST_WORD, COPY_VOCAB, (int(n_),), generator=gen).tolist()
            for n_ in lens]
    return srcs, [s[::-1] for s in srcs]


def padded(rows: list[list[int]], before: int | None = None, after: int | None = None):
    rows = [([before] if before is not None else []) + r + ([after] if after is not None else [])
            for r in rows]
    out = torch.full((len(rows), max(map(len, rows))), PAD)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out, torch.tensor([len(r) for r in rows])


@pytest.fixture(scope="module")
def trained_model():
    """A small GRU model trained on reversal for a few hundred updates (~10 s on 2 cores)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny("gru", "bahdanau", "bahdanau", True), emb_size=32,
                              enc_hidden=32, dec_hidden=64, attention_size=32, enc_layers=1,
                              dec_layers=1)
    model = build_model(cfg, COPY_VOCAB, COPY_VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    srcs, trgs = copy_task(6400, seed=1)
    model.train()
    for first in range(0, len(srcs), 64):
        src, src_lens = padded(srcs[first:first + 64], after=3)
        trg_in, _ = padded(trgs[first:first + 64], before=2)
        trg_out, _ = padded(trgs[first:first + 64], after=3)
        logits = model(src, src_lens, trg_in)
        loss = F.cross_entropy(logits.flatten(0, 1), trg_out.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def decode_bleu(model, srcs, trgs) -> float:
    src, src_lens = padded(srcs, after=3)
    hyps = beam_search(model, src, src_lens, beam_size=4, alpha=0.6, max_len_ratio=1.5,
                       max_len_add=2)
    def words(ids):
        return " ".join(f"w{i}" for i in ids)
    return corpus_bleu([words(nbest[0].tokens) for nbest in hyps], [[words(t) for t in trgs]])


def test_quantised_decoding_is_within_one_bleu_of_fp32(trained_model, int8_kernel):
    srcs, trgs = copy_task(300, seed=2)
    fp32 = decode_bleu(trained_model, srcs, trgs)
    quantised = quantize_for_cpu(trained_model)
    kernels = {m.kernel for m in quantised.modules() if isinstance(m, Int8Linear)}
    assert kernels == {int8_kernel}
    int8 = decode_bleu(quantised, srcs, trgs)
    assert fp32 > 60, f"the fixture model did not learn the task (BLEU {fp32})"
    assert abs(fp32 - int8) <= 1.0, (fp32, int8)

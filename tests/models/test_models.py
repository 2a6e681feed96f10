"""Invariants of the encoder-decoder: shapes, masking, packing, step == forward, tying, I/O."""

import dataclasses
import io
import itertools

import pytest
import torch

from seq2seq.config import ModelConfig
from seq2seq.models import PAD, Attention, build_model

VOCAB = 32
CELLS = ("gru", "lstm", "rnn")
ATTENTIONS = ("bahdanau", "dot", "general")
DECODERS = ("bahdanau", "luong")
ALL_CONFIGS = list(itertools.product(CELLS, ATTENTIONS, DECODERS, (True, False), (True, False)))


def tiny(cell="gru", attention="bahdanau", decoder="bahdanau", input_feeding=True,
         bidirectional=True, **fields) -> ModelConfig:
    """Emb 8, hidden 16; dot attention gets an encoder output size equal to dec_hidden."""
    enc_hidden = 8 if attention == "dot" and bidirectional else 16
    base = ModelConfig(cell=cell, emb_size=8, enc_hidden=enc_hidden, enc_layers=2,
                       bidirectional=bidirectional, dec_hidden=16, dec_layers=2,
                       attention=attention, attention_size=16, decoder=decoder,
                       input_feeding=input_feeding, dropout=0.2)
    return dataclasses.replace(base, **fields)


def make(cfg: ModelConfig, seed: int = 0, src_vocab: int = VOCAB, trg_vocab: int = VOCAB):
    torch.manual_seed(seed)
    return build_model(cfg, src_vocab, trg_vocab)


def batch(lens, trg_len=6, seed=1):
    """Random tokens in [1, VOCAB) padded with PAD: (src, src_lens, trg_in, trg_out)."""
    gen = torch.Generator().manual_seed(seed)
    src_lens = torch.tensor(lens)
    src = torch.randint(1, VOCAB, (len(lens), max(lens)), generator=gen)
    src[torch.arange(max(lens)) >= src_lens.unsqueeze(1)] = PAD
    trg = torch.randint(1, VOCAB, (len(lens), trg_len + 1), generator=gen)
    return src, src_lens, trg[:, :-1], trg[:, 1:]


def step_all(model, src, src_lens, trg_in):
    """Step-by-step teacher forcing: log_probs (B, T, V), attention (B, T, S)."""
    enc = model.encode(src, src_lens)
    state = model.init_state(enc)
    log_probs, attns = [], []
    for t in range(trg_in.size(1)):
        step_log_probs, state, attn = model.step(trg_in[:, t], state, enc)
        log_probs.append(step_log_probs)
        attns.append(attn)
    return torch.stack(log_probs, 1), torch.stack(attns, 1)


@pytest.mark.parametrize("cell,attention,decoder,feeding,bidi", ALL_CONFIGS)
def test_shapes_and_forward_equals_steps(cell, attention, decoder, feeding, bidi):
    model = make(tiny(cell, attention, decoder, feeding, bidi)).eval()
    src, src_lens, trg_in, _ = batch([5, 3, 1, 4])
    B, S, T = src.size(0), src.size(1), trg_in.size(1)

    enc = model.encode(src, src_lens)
    assert all(tensor.size(0) == B for tensor in enc)
    assert enc.enc_out.shape == (B, S, (2 if bidi else 1) * model.encoder.rnn.hidden_size)
    assert enc.keys.shape[:2] == (B, S) and enc.src_mask.dtype == torch.bool
    state = model.init_state(enc)
    assert all(tensor.size(0) == B for tensor in state)
    assert len(state) == (2 if cell == "lstm" else 1) + (1 if feeding else 0)
    log_probs, state, attn = model.step(trg_in[:, 0], state, enc)
    assert log_probs.shape == (B, VOCAB) and log_probs.dtype == torch.float32
    assert attn.shape == (B, S) and all(tensor.size(0) == B for tensor in state)

    logits = model(src, src_lens, trg_in)
    assert logits.shape == (B, T, VOCAB)
    assert model.decoder.parallel == (decoder == "luong" and not feeding)
    with torch.no_grad():
        stepped, _ = step_all(model, src, src_lens, trg_in)
        torch.testing.assert_close(stepped, torch.log_softmax(logits, -1), atol=1e-5, rtol=0)


def attention_over_three_sources(kind: str) -> tuple[Attention, torch.Tensor, torch.Tensor]:
    """An attention layer, encoder outputs ``(3, 7, 16)`` and a mask of lengths 7, 2, 1."""
    torch.manual_seed(0)
    attention = Attention(kind, query_size=16, value_size=16, attention_size=12)
    return attention, torch.randn(3, 7, 16), torch.arange(7) < torch.tensor([[7], [2], [1]])


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_attention_weights_are_exactly_zero_on_padding(kind):
    attention, enc_out, src_mask = attention_over_three_sources(kind)
    context, weights = attention(torch.randn(3, 4, 16), attention.project_keys(enc_out),
                                 enc_out, src_mask)
    assert context.shape == (3, 4, 16) and weights.shape == (3, 4, 7)
    assert torch.all(weights.masked_select(~src_mask.unsqueeze(1)) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    assert torch.all(weights[2, :, 0] == 1)


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_beams_attend_to_one_shared_source_row(kind):
    # Beam search keeps one encoder row per sentence for its K beams (rows j*K..j*K+K-1).
    attention, enc_out, src_mask = attention_over_three_sources(kind)
    keys = attention.project_keys(enc_out)
    query = torch.randn(3 * 4, 1, 16)
    shared = attention(query, keys, enc_out, src_mask)
    copied = attention(query, *(t.repeat_interleave(4, 0) for t in (keys, enc_out, src_mask)))
    assert shared[0].shape == (12, 1, 16) and shared[1].shape == (12, 1, 7)
    for got, want in zip(shared, copied):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("piece", [1, 3 * 7 * 12 * 2, 3 * 7 * 12 * 5 + 1])
def test_additive_scores_made_in_pieces_equal_one_piece(monkeypatch, torch_kernels, piece):
    # Decoding on a CPU without the C kernel (tests/test_native.py) makes the (B, T, S, A)
    # hidden layer a few sentences at a time: 1 sentence, 2, or 5 of 6 per piece here (3 beams
    # of one query, S = 7, A = 12).
    from seq2seq.models import attention as module

    torch.manual_seed(0)
    attention = Attention("bahdanau", query_size=16, value_size=16, attention_size=12)
    enc_out = torch.randn(6, 7, 16)
    src_mask = torch.arange(7) < torch.tensor([[7], [2], [1], [7], [4], [3]])
    query = torch.randn(6 * 3, 1, 16)  # 3 beams per sentence
    with torch.no_grad():
        keys = attention.project_keys(enc_out)
        whole = attention(query, keys, enc_out, src_mask)
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", piece)
        calls = []
        sigmoid = torch.sigmoid
        monkeypatch.setattr(torch, "sigmoid", lambda x: calls.append(x.size(0)) or sigmoid(x))
        pieces = attention(query, keys, enc_out, src_mask)
    assert calls == {1: [1] * 6, 504: [2] * 3, 1261: [5, 1]}[piece]
    for got, want in zip(pieces, whole):
        assert torch.equal(got, want)
    # Training keeps one piece: autograd sees the same graph as before.
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1)
    calls.clear()
    trained = attention(query, keys, enc_out, src_mask)
    assert calls == [6] and trained[1].requires_grad
    torch.testing.assert_close(trained[1], whole[1], atol=0, rtol=0)
    # ... made of the tensors themselves: the backward of a slice would zero-fill and copy a
    # whole (B, S, A) gradient at every decoder step.
    graph, todo = set(), [trained[1].grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in graph:
            graph.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    assert not [node.name() for node in graph if "Slice" in node.name()]


@pytest.mark.parametrize("decoder", DECODERS)
def test_step_attention_is_exactly_zero_on_padding(decoder):
    model = make(tiny(decoder=decoder, attention="general")).eval()
    src, src_lens, trg_in, _ = batch([6, 2, 4])
    _, attn = step_all(model, src, src_lens, trg_in)
    padding = (src == PAD).unsqueeze(1).expand_as(attn)
    assert padding.any() and torch.all(attn[padding] == 0)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_encoder_equals_plain_rnn_on_full_length_input(cell):
    model = make(tiny(cell)).eval()
    encoder = model.encoder
    src, src_lens, _, _ = batch([5, 5, 5])
    enc_out, final = encoder(src, src_lens)
    with torch.no_grad():
        plain_out, hx = encoder.rnn(encoder.embedding(src))  # no packing
    torch.testing.assert_close(enc_out, plain_out, atol=1e-6, rtol=0)
    h = hx[0] if cell == "lstm" else hx
    top = torch.cat([h[-2], h[-1]], dim=-1)  # forward and backward of the top layer
    torch.testing.assert_close(final[:, :top.size(1)], top, atol=1e-6, rtol=0)
    # Forward direction ends at the last token, backward at the first.
    torch.testing.assert_close(top[:, :16], plain_out[:, -1, :16], atol=1e-6, rtol=0)
    torch.testing.assert_close(top[:, 16:], plain_out[:, 0, 16:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell,decoder,feeding", [("gru", "bahdanau", True),
                                                  ("lstm", "luong", False),
                                                  ("rnn", "luong", True)])
def test_sentence_alone_equals_sentence_in_padded_batch(cell, decoder, feeding):
    model = make(tiny(cell, "bahdanau", decoder, feeding)).eval()
    src, src_lens, trg_in, _ = batch([7, 3, 5, 1])
    with torch.no_grad():
        enc = model.encode(src, src_lens)
        log_probs, _ = step_all(model, src, src_lens, trg_in)
        for i, length in enumerate(src_lens.tolist()):
            alone = src[i:i + 1, :length]
            enc_alone = model.encode(alone, src_lens[i:i + 1])
            torch.testing.assert_close(enc_alone.enc_out[0], enc.enc_out[i, :length],
                                       atol=1e-5, rtol=0)
            assert torch.all(enc.enc_out[i, length:] == 0)
            alone_log_probs, _ = step_all(model, alone, src_lens[i:i + 1], trg_in[i:i + 1])
            torch.testing.assert_close(alone_log_probs[0], log_probs[i], atol=1e-5, rtol=0)


def test_score_is_the_sum_of_step_log_probs_without_padding():
    model = make(tiny(cell="lstm")).eval()
    src, src_lens, trg_in, trg_out = batch([4, 6, 2])
    trg_out[1, 3:] = PAD
    trg_in[1, 4:] = PAD
    with torch.no_grad():
        log_probs, _ = step_all(model, src, src_lens, trg_in)
        expected = [log_probs[b, t, trg_out[b, t]] for b in range(3) for t in range(6)
                    if trg_out[b, t] != PAD]
        score = model.score(src, src_lens, trg_in, trg_out)
    assert score.shape == (3,)
    torch.testing.assert_close(score.sum(), torch.stack(expected).sum(), atol=1e-4, rtol=0)
    torch.testing.assert_close(score[1], log_probs[1, :3].gather(
        -1, trg_out[1, :3, None]).sum(), atol=1e-5, rtol=0)


def test_tied_embeddings_share_storage_and_count_once():
    untied = make(tiny(emb_size=16))
    decoder_tied = make(tiny(emb_size=16, tie_embeddings="decoder"))
    all_tied = make(tiny(emb_size=16, tie_embeddings="all"))
    out, emb = decoder_tied.decoder.output.weight, decoder_tied.decoder.embedding.weight
    assert out.data_ptr() == emb.data_ptr()
    assert decoder_tied.encoder.embedding.weight.data_ptr() != emb.data_ptr()
    assert all_tied.encoder.embedding.weight.data_ptr() == \
        all_tied.decoder.output.weight.data_ptr()
    table = VOCAB * 16
    assert untied.num_parameters - decoder_tied.num_parameters == table
    assert untied.num_parameters - all_tied.num_parameters == 2 * table
    with pytest.raises(ValueError, match="joint vocabulary"):
        make(tiny(emb_size=16, tie_embeddings="all"), src_vocab=VOCAB, trg_vocab=VOCAB + 1)
    # A tied model still trains: a gradient step keeps the weights shared.
    src, src_lens, trg_in, _ = batch([3, 2])
    all_tied(src, src_lens, trg_in).sum().backward()
    assert all_tied.decoder.output.weight.grad is all_tied.encoder.embedding.weight.grad


@pytest.mark.parametrize("tie", ["none", "all"])
def test_state_dict_round_trip_gives_identical_outputs(tie):
    cfg = tiny(cell="lstm", emb_size=16, tie_embeddings=tie)
    model = make(cfg, seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(cfg, seed=123).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    src, src_lens, trg_in, _ = batch([5, 2])
    assert torch.equal(model(src, src_lens, trg_in), fresh(src, src_lens, trg_in))


def test_initialisation_is_deterministic_bounded_and_pads_are_zero():
    first, second = make(tiny(), seed=7), make(tiny(), seed=7)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
        assert a.abs().max() <= 0.1, name
    assert torch.all(first.encoder.embedding.weight[PAD] == 0)
    assert torch.all(first.decoder.embedding.weight[PAD] == 0)
    assert not torch.equal(make(tiny(), seed=8).decoder.rnn.weight_hh_l0,
                           first.decoder.rnn.weight_hh_l0)


@pytest.mark.parametrize("cell,attention,decoder,feeding,init", [
    ("gru", "bahdanau", "bahdanau", True, "bridge"),
    ("lstm", "general", "luong", False, "bridge"),
    ("rnn", "general", "luong", True, "zeros"),
    ("lstm", "bahdanau", "bahdanau", False, "zeros"),
])
def test_gradients_reach_every_parameter(cell, attention, decoder, feeding, init):
    model = make(tiny(cell, attention, decoder, feeding, init=init)).train()
    src, src_lens, trg_in, trg_out = batch([5, 3, 4])
    logits = model(src, src_lens, trg_in)
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), trg_out).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert (model.decoder.bridge is None) == (init == "zeros")


def test_zero_init_starts_from_zero_state():
    model = make(tiny(cell="lstm", init="zeros"))
    src, src_lens, _, _ = batch([3, 2])
    assert all(torch.all(tensor == 0) for tensor in model.init_state(model.encode(src, src_lens)))


@pytest.mark.parametrize("cell,decoder,feeding", [("lstm", "bahdanau", True),
                                                  ("gru", "luong", False)])
def test_step_traces_as_one_graph_for_any_batch_size(cell, decoder, feeding):
    """fullgraph=True fails on .item(), tensor-valued ifs or other graph breaks in step."""
    model = make(tiny(cell, "general", decoder, feeding)).eval()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True), torch.no_grad():
        compiled = torch.compile(model.step, backend="eager", fullgraph=True, dynamic=True)
        for size in (1, 7):
            src, src_lens, trg_in, _ = batch([4] * size)
            enc = model.encode(src, src_lens)
            state = model.init_state(enc)
            expected = model.step(trg_in[:, 0], state, enc)
            got = compiled(trg_in[:, 0], state, enc)
            for a, b in zip(torch.utils._pytree.tree_leaves(expected),
                            torch.utils._pytree.tree_leaves(got)):
                torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoder_style_decides_which_state_attends(decoder):
    """Bahdanau attends with the previous top state, Luong with the new one (§3.1 of each)."""
    model = make(tiny(cell="lstm", attention="general", decoder=decoder)).eval()
    src, src_lens, trg_in, _ = batch([5, 3])
    with torch.no_grad():
        enc = model.encode(src, src_lens)
        state = model.init_state(enc)
        for t in range(3):
            _, new_state, attn = model.step(trg_in[:, t], state, enc)
            query = (state if decoder == "bahdanau" else new_state)[0][:, -1:]  # top h
            _, expected = model.decoder.attention(query, enc.keys, enc.enc_out, enc.src_mask)
            torch.testing.assert_close(attn, expected[:, 0])
            state = new_state


def test_input_feeding_carries_the_attentional_vector():
    model = make(tiny(decoder="luong", input_feeding=True)).eval()
    src, src_lens, trg_in, _ = batch([5, 3])
    with torch.no_grad():
        enc = model.encode(src, src_lens)
        state = model.init_state(enc)
        assert torch.all(state[-1] == 0)
        _, state, _ = model.step(trg_in[:, 0], state, enc)
        feed = state[-1]
        assert feed.shape == (2, 16) and feed.abs().min() > 0 and feed.abs().max() < 1  # tanh
        log_probs, _, _ = model.step(trg_in[:, 1], state, enc)
        other, _, _ = model.step(trg_in[:, 1], state[:-1] + (torch.zeros_like(feed),), enc)
    assert not torch.allclose(log_probs, other)


def test_forget_bias_sets_only_the_lstm_forget_gates():
    import dataclasses

    cfg = ModelConfig(cell="lstm", emb_size=8, enc_hidden=16, enc_layers=2, dec_hidden=16,
                      dec_layers=1, attention_size=8, forget_bias=1.0)
    model = build_model(cfg, 32, 32)
    lstms = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    assert lstms
    for lstm in lstms:
        h = lstm.hidden_size
        for name, param in lstm.named_parameters():
            if name.startswith("bias_ih"):
                assert torch.all(param[h:2 * h] == 1.0)
                assert not torch.all(param[:h] == 1.0)
            elif name.startswith("bias_hh"):
                assert torch.all(param[h:2 * h] == 0.0)
    plain = build_model(dataclasses.replace(cfg, forget_bias=None), 32, 32)
    assert not torch.all(next(m for m in plain.modules()
                              if isinstance(m, torch.nn.LSTM)).bias_ih_l0[16:32] == 1.0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_rnn_modules_run_in_their_weights_precision_unless_cpu_bf16(cell, packed):
    """Autocast would run cuDNN RNNs in fp16 even for bf16, and on a CPU it runs LSTM and
    tanh-RNN in bf16 but GRU in fp32: so RNN calls run with autocast off, in the weights'
    precision (here under CPU fp16 autocast), except under CPU bf16 autocast, where every cell
    runs in bf16 on bf16 copies of the fp32 weights (tests/test_precision.py compares them)."""
    model = make(tiny(cell, attention="general", decoder="luong", input_feeding=False,
                      dropout=0.0)).eval()
    model.encoder.packed = packed
    src, src_lens, trg_in, trg_out = batch([5, 3, 4])
    enc_out, final = model.encoder(src, src_lens)
    with torch.autocast("cpu", dtype=torch.float16):
        auto_out, auto_final = model.encoder(src, src_lens)
    # The encoder is embeddings and RNNs only: under fp16 autocast it computes exactly what
    # it computes in fp32.
    assert auto_out.dtype == torch.float32 and torch.equal(auto_out, enc_out)
    assert torch.equal(auto_final, final)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_out, _ = model.encoder(src, src_lens)
        # The luong decoder without input feeding runs its RNN module over the whole target.
        logits = model(src, src_lens, trg_in)
    assert bf16_out.dtype == torch.bfloat16
    assert torch.allclose(bf16_out.float(), enc_out, atol=0.02)
    assert logits.dtype == torch.bfloat16
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), trg_out.flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               and torch.isfinite(p.grad).all() for p in model.decoder.rnn.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_word_dropout_reaches_source_and_target_in_training_only(cell):
    """model.word_dropout zeroes whole input tokens on both sides in training; evaluation and
    a model without it are untouched."""
    src, src_lens, trg_in, _ = batch([5, 3, 4])
    cfg = tiny(cell, dropout=0.0, word_dropout=0.5)
    model = make(cfg)
    plain = make(dataclasses.replace(cfg, word_dropout=0.0))
    assert model.encoder.word_dropout == model.decoder.word_dropout == 0.5
    assert plain.encoder.word_dropout == plain.decoder.word_dropout == 0.0
    model.eval()
    plain.eval()
    with torch.no_grad():
        reference = plain(src, src_lens, trg_in)
        assert torch.equal(model(src, src_lens, trg_in), reference)
        plain.train()
        assert torch.equal(plain(src, src_lens, trg_in), reference)  # no other dropout
        model.train()
        for side in (model.encoder, model.decoder):
            other = model.decoder if side is model.encoder else model.encoder
            other.word_dropout = 0.0
            torch.manual_seed(6)
            assert not torch.allclose(model(src, src_lens, trg_in), reference)
            other.word_dropout = 0.5

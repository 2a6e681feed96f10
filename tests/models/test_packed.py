"""Decoding with weights packed once for oneDNN (seq2seq.models.packed): the products and the
searches agree with the plain model, bf16 and fp32, for every cell, attention and decoder
style; training, CPUs without oneDNN bf16 and fp32 where its products stay with BLAS keep the
plain path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.models import packed as pk
from seq2seq.models.step_weights import step_linears
from seq2seq.precision import decoding_model
from seq2seq.search import beam_search, greedy_search
from tests.models.test_models import ALL_CONFIGS, batch, make, step_all, tiny
from tests.search.test_search import SRC_LENS, make_batch, real_model
from tests.search.test_shortlist import restrictive

CPU = torch.device("cpu")
SUPPORTED = pk.packing_supported(CPU)
# One bf16 rounding of a product: packed and plain may accumulate in another order.
BF16 = {"rtol": 2 * 2 ** -8, "atol": 1e-2}


# fp32 products of a few hundred terms, summed in another order by another library.
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def packed_copy(model: nn.Module) -> nn.Module:
    packed = copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    assert pk.pack_for_cpu(packed) == pk.packing_supported(CPU, dtype)
    return packed


def linears(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (2, 3, 4, 24), (0, 24)])
@pytest.mark.parametrize("out,bias", [(40, True), (40, False), (1, False)])
def test_a_packed_product_is_f_linear(shape, out, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).bfloat16()
    weight = torch.randn(out, 24, generator=gen).bfloat16()
    b = torch.randn(out, generator=gen).bfloat16() if bias else None
    if not SUPPORTED:
        assert not pk.pack_for_cpu(nn.Linear(24, out).bfloat16())
        return
    y = pk.linear_fn(weight, b)(x)
    assert y.shape == (*shape[:-1], out) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, weight, b).float(), **BF16)
    # a strided input (a column slice) and a strided weight (a block of a wider one)
    wide = torch.randn(out, 48, generator=gen).bfloat16()
    xs = torch.randn(*shape[:-1], 48, generator=gen).bfloat16()[..., ::2]
    torch.testing.assert_close(pk.linear_fn(wide[:, 24:], b)(xs).float(),
                               F.linear(xs, wide[:, 24:], b).float(), **BF16)


@pytest.mark.parametrize("cell,attention,decoder,feeding,bidi", ALL_CONFIGS)
def test_packed_steps_agree_with_the_plain_bf16_model(cell, attention, decoder, feeding, bidi):
    model = make(tiny(cell, attention, decoder, feeding, bidi)).eval().to(torch.bfloat16)
    packed = packed_copy(model)
    src, src_lens, trg_in, _ = batch([5, 3, 4])
    with torch.no_grad():
        expected, expected_attn = step_all(model, src, src_lens, trg_in)
        got, got_attn = step_all(packed, src, src_lens, trg_in)
    torch.testing.assert_close(got, expected, **BF16)
    torch.testing.assert_close(got_attn.float(), expected_attn.float(), **BF16)
    if SUPPORTED:  # the packed paths were the ones taken
        assert set(linears(packed)) == {pk.PackedLinear}
        with torch.no_grad():
            assert step_linears(packed.decoder) is packed.decoder.packed_linears
    else:
        assert set(linears(packed)) == {nn.Linear} and packed.decoder.packed_linears is None


def test_packing_keeps_parameters_ties_and_state_dict():
    model = make(tiny(emb_size=16, tie_embeddings="decoder")).eval().to(torch.bfloat16)
    packed = packed_copy(model)
    assert packed.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(packed.state_dict()[key], value), key
    assert packed.decoder.output.weight is packed.decoder.embedding.weight


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_searches_with_packed_weights_find_what_the_plain_bf16_model_finds(cell):
    # real_model's weights are scaled up, so its choices are clear-cut beyond bf16 rounding
    model = real_model(cell=cell).to(torch.bfloat16)
    packed = packed_copy(model)
    src, src_lens = make_batch(SRC_LENS)
    shortlist = restrictive()
    for search in (
        lambda m: beam_search(m, src, src_lens, beam_size=4, n_best=2, alpha=0.6, max_len_add=5),
        lambda m: beam_search(m, src, src_lens, beam_size=4, alpha=0.6, max_len_add=5,
                              shortlist=shortlist),
        lambda m: [[h] for h in greedy_search(m, src, src_lens, 1.5, 5)],
    ):
        for hyps, hyps2 in zip(search(model), search(packed)):
            assert [h.tokens for h in hyps] == [h.tokens for h in hyps2]
            for h, h2 in zip(hyps, hyps2):
                assert h2.log_prob == pytest.approx(h.log_prob, rel=0.02, abs=0.05)
    if SUPPORTED:  # the shortlist's rows were packed too
        with torch.no_grad():
            rows = packed.output_rows(shortlist.for_batch(src)[0])
        assert rows.packed is not None and rows.packed.is_mkldnn


def test_training_and_gradients_take_the_plain_path():
    model = make(tiny()).to(torch.bfloat16)
    packed = packed_copy(model)
    src, src_lens, trg_in, _ = batch([5, 3])
    packed.train()
    logits = packed(src, src_lens, trg_in)
    logits.float().sum().backward()
    assert all(p.grad is not None for p in packed.decoder.output.parameters())
    packed.eval()  # eval mode with gradients enabled: still the parameters as they are now
    if SUPPORTED:
        assert step_linears(packed.decoder) is not packed.decoder.packed_linears


def test_fp32_with_blas_and_cpus_without_onednn_bf16_are_left_alone(monkeypatch, fp32_gemm):
    fp32_gemm("blas")
    model = make(tiny()).eval()
    assert not pk.pack_for_cpu(model)  # fp32 products by BLAS
    assert set(linears(model)) == {nn.Linear} and model.decoder.packed_linears is None
    decoded, precision, _ = decoding_model(model, "fp32", CPU)
    assert decoded is model and precision == "fp32"
    monkeypatch.setattr(pk, "packing_supported", lambda device, dtype: False)
    bf16 = make(tiny()).eval().to(torch.bfloat16)
    assert not pk.pack_for_cpu(bf16)
    assert set(linears(bf16)) == {nn.Linear}
    # decoding_model still gives a working bf16 copy, unpacked
    decoded, precision, _ = decoding_model(make(tiny()).eval(), "bf16", CPU)
    assert precision == "bf16" and set(linears(decoded)) == {nn.Linear}


def test_decoding_model_packs_its_bf16_copy_where_supported():
    model = make(tiny()).eval()
    decoded, precision, _ = decoding_model(model, "bf16", CPU)
    assert precision == "bf16" and decoded is not model
    assert set(linears(decoded)) == ({pk.PackedLinear} if SUPPORTED else {nn.Linear})
    assert set(linears(model)) == {nn.Linear}  # the fp32 model is untouched


@pytest.mark.parametrize("cell,attention,decoder,feeding,bidi", ALL_CONFIGS)
def test_packed_fp32_steps_agree_with_the_plain_model(fp32_gemm, cell, attention, decoder,
                                                      feeding, bidi):
    fp32_gemm("onednn")
    model = make(tiny(cell, attention, decoder, feeding, bidi)).eval()
    packed = packed_copy(model)
    assert set(linears(packed)) == {pk.PackedLinear}
    src, src_lens, trg_in, _ = batch([5, 3, 4])
    with torch.no_grad():
        assert step_linears(packed.decoder) is packed.decoder.packed_linears
        expected, expected_attn = step_all(model, src, src_lens, trg_in)
        got, got_attn = step_all(packed, src, src_lens, trg_in)
    torch.testing.assert_close(got, expected, **FP32)
    torch.testing.assert_close(got_attn, expected_attn, **FP32)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_searches_with_packed_fp32_weights_find_what_blas_finds(fp32_gemm, cell):
    fp32_gemm("blas")
    # real_model's weights are x15 for float64; in fp32 that makes 18-step hypotheses chaotic
    # (BLAS's fp32 greedy score differs from float64's by 0.6): x8 keeps choices clear-cut.
    model = real_model(cell=cell).float()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(8 / 15)
    src, src_lens = make_batch(SRC_LENS)
    shortlist = restrictive()
    searches = (
        lambda m: beam_search(m, src, src_lens, beam_size=4, n_best=2, alpha=0.6, max_len_add=5),
        lambda m: beam_search(m, src, src_lens, beam_size=4, alpha=0.6, max_len_add=5,
                              shortlist=shortlist),
        lambda m: [[h] for h in greedy_search(m, src, src_lens, 1.5, 5)],
    )
    expected = [search(model) for search in searches]
    fp32_gemm("onednn")
    packed, precision, _ = decoding_model(model, "fp32", CPU)
    assert precision == "fp32" and packed is not model
    assert set(linears(packed)) == {pk.PackedLinear} and set(linears(model)) == {nn.Linear}
    # not all empty: at least a token per sentence on average over the searches
    assert sum(len(h.tokens) for want in expected for hyps in want for h in hyps) \
        >= len(SRC_LENS) * len(searches)
    for search, want in zip(searches, expected):
        for hyps, got in zip(want, search(packed)):
            assert [h.tokens for h in got] == [h.tokens for h in hyps]
            for h, h2 in zip(hyps, got):
                assert h2.log_prob == pytest.approx(h.log_prob, rel=1e-4, abs=1e-5)
    with torch.no_grad():  # the shortlist's rows were packed too
        rows = packed.output_rows(shortlist.for_batch(src)[0])
    assert rows.packed is not None and rows.packed.is_mkldnn


def test_packed_fp32_keeps_parameters_ties_and_trains_plain(fp32_gemm):
    fp32_gemm("onednn")
    model = make(tiny(emb_size=16, tie_embeddings="decoder")).eval()
    packed = packed_copy(model)
    assert packed.decoder.output.weight is packed.decoder.embedding.weight
    for key, value in model.state_dict().items():
        assert torch.equal(packed.state_dict()[key], value), key
    src, src_lens, trg_in, _ = batch([5, 3])
    torch.manual_seed(5)
    expected = model.train()(src, src_lens, trg_in)
    torch.manual_seed(5)  # the same dropout masks
    got = packed.train()(src, src_lens, trg_in)
    torch.testing.assert_close(got, expected, **FP32)
    got.sum().backward()
    assert all(p.grad is not None for p in packed.decoder.output.parameters())
    packed.eval()
    assert step_linears(packed.decoder) is not packed.decoder.packed_linears  # grads enabled


def test_a_packed_model_deep_copies_casts_and_quantises(fp32_gemm):
    """translate's model is packed already: the benchmark and the Python API copy it, cast it
    to bf16 and quantise it; each gets packs (or int8 layers) of its own weights."""
    from seq2seq.quantize import Int8Linear, quantize_for_cpu

    fp32_gemm("onednn")
    model = make(tiny()).eval()
    packed, _, _ = decoding_model(model, "fp32", CPU)
    src, src_lens, trg_in, _ = batch([5, 3, 4])
    with torch.no_grad():
        expected, _ = step_all(model, src, src_lens, trg_in)
        copied = copy.deepcopy(packed)
        assert set(linears(copied)) == {pk.PackedLinear}
        copied_out, _ = step_all(copied, src, src_lens, trg_in)
        torch.testing.assert_close(copied_out, expected, **FP32)
        # the copy's packs are its own, made from its own weights
        for ours, theirs in ((copied.decoder.output.packed, packed.decoder.output.packed),
                             (copied.decoder.packed_linears.hh[0].packed,
                              packed.decoder.packed_linears.hh[0].packed)):
            assert ours.tensor is not theirs.tensor
            assert ours.weight.data_ptr() != theirs.weight.data_ptr()
            assert torch.equal(ours.weight, theirs.weight)
        assert copied.decoder.packed_linears.hh[0].bias is copied.decoder.rnn.bias_hh_l0
        repacked, _, _ = decoding_model(packed, "fp32", CPU)  # packing a packed model
        torch.testing.assert_close(step_all(repacked, src, src_lens, trg_in)[0], expected, **FP32)
        bf16, precision, _ = decoding_model(packed, "bf16", CPU)
        assert precision == "bf16"
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(step_all(bf16, src, src_lens, trg_in)[0].float(), expected,
                                   **BF16)
        int8 = quantize_for_cpu(packed)
        assert not any(isinstance(m, pk.PackedLinear) for m in int8.modules())
        assert any(isinstance(m, Int8Linear) for m in int8.modules())
        assert int8.decoder.packed_linears is None
        assert step_all(int8, src, src_lens, trg_in)[0].shape == expected.shape
    assert set(linears(packed)) == {pk.PackedLinear}  # the packed model itself is unchanged

"""fp32 products by oneDNN (seq2seq.models.gemm): the choice of backend, and products,
gradients and whole training steps that agree with torch's own."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from seq2seq.errors import Seq2SeqError
from seq2seq.models import gemm
from seq2seq.models.gemm import choose_backend, linear, product, uses_onednn
from tests.models.test_models import batch, make, tiny

# fp32 products of a few hundred terms, summed in another order by another library.
RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("choice, available, capability, vendor, expected", [
    ("auto", True, "AVX512", "AuthenticAMD", "onednn"),
    ("auto", True, "AVX512", "HygonGenuine", "onednn"),
    ("auto", True, "AVX512", "", "onednn"),  # no /proc/cpuinfo: not known to be Intel
    ("auto", True, "AVX512", "GenuineIntel", "blas"),
    ("auto", True, "AVX2", "AuthenticAMD", "blas"),  # MKL trains faster; decoding packs
    ("auto", True, "AVX2", "GenuineIntel", "blas"),
    ("auto", True, "DEFAULT", "AuthenticAMD", "blas"),
    ("auto", False, "AVX512", "AuthenticAMD", "blas"),
    ("onednn", True, "AVX2", "GenuineIntel", "onednn"),
    ("onednn", False, "AVX512", "AuthenticAMD", "blas"),
    ("blas", True, "AVX512", "AuthenticAMD", "blas"),
])
def test_choose_backend(choice, available, capability, vendor, expected):
    chosen, why = choose_backend(choice, available, capability, vendor)
    assert chosen == expected
    assert why


@pytest.mark.parametrize("choice, available, capability, vendor, expected", [
    ("auto", True, "AVX512", "AuthenticAMD", True),
    ("auto", True, "AVX2", "AuthenticAMD", True),  # a Zen 3: MKL trains, oneDNN decodes
    ("auto", True, "AVX2", "", True),
    ("auto", True, "AVX2", "GenuineIntel", False),
    ("auto", True, "AVX512", "GenuineIntel", False),
    ("auto", True, "DEFAULT", "AuthenticAMD", False),
    ("auto", False, "AVX2", "AuthenticAMD", False),
    ("onednn", True, "AVX2", "GenuineIntel", True),
    ("blas", True, "AVX2", "AuthenticAMD", False),  # asked for: no oneDNN at all
])
def test_choose_packing(choice, available, capability, vendor, expected):
    assert gemm.choose_packing(choice, available, capability, vendor) is expected


@pytest.mark.parametrize("value", ["mkl", "yes", "one dnn"])
def test_a_bad_choice_is_refused(value):
    with pytest.raises(Seq2SeqError, match=gemm.ENV):
        choose_backend(value, True, "AVX512", "AuthenticAMD")


def test_the_cli_refuses_a_bad_choice_in_one_line(tmp_path):
    env = {"SEQ2SEQ_FP32_GEMM": "mkl", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "seq2seq", "generate-data", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SEQ2SEQ_FP32_GEMM='mkl': expected one of auto, onednn, blas"]
    assert not out.exists()


def test_environment_values_are_read_case_blind(fp32_gemm):
    assert fp32_gemm("BLAS") == "blas"
    assert fp32_gemm("") == fp32_gemm("auto")


def _case(shape, out_features, layout, bias, seed=0):
    """Leaves ``[x, base, bias?]``, and a view of ``base`` as the ``(out, in)`` weight."""
    gen = torch.Generator().manual_seed(seed)
    in_features = shape[-1]
    x = torch.randn(*shape, generator=gen)
    if layout == "column block":  # a block of a wider weight, as the fused step has
        base = torch.randn(out_features, in_features + 7, generator=gen)
        view = lambda w: w[:, 3:3 + in_features]  # noqa: E731
    elif layout == "transposed":
        base = torch.randn(in_features, out_features, generator=gen)
        view = lambda w: w.t()  # noqa: E731
    else:
        base = torch.randn(out_features, in_features, generator=gen)
        view = lambda w: w  # noqa: E731
    leaves = [x, base] + ([torch.randn(out_features, generator=gen)] if bias else [])
    return leaves, view


LAYOUTS = ["contiguous", "column block", "transposed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(5, 24), (3, 4, 24), (1, 24), (2, 1, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [17, 40])  # narrower and wider than the input (24)
def test_linear_and_its_gradients_match_torch(fp32_gemm, layout, shape, bias, out_features):
    assert fp32_gemm("onednn") == "onednn"
    leaves, view = _case(shape, out_features, layout, bias)
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    assert uses_onednn(ours[0], view(ours[1]))
    out = linear(ours[0], view(ours[1]), ours[2] if bias else None)
    want = F.linear(ref[0], view(ref[1]), ref[2] if bias else None)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for leaf, ref_leaf in zip(ours, ref):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["onednn", "blas"])
@pytest.mark.parametrize("outputs", [7, 300])
def test_weight_grad_copies_the_narrower_operand_only(fp32_gemm, backend, outputs):
    fp32_gemm(backend)
    gen = torch.Generator().manual_seed(5)
    grads, rows = torch.randn(50, outputs, generator=gen), torch.randn(50, 24, generator=gen)
    got = gemm.weight_grad(grads, rows)
    torch.testing.assert_close(got, grads.t() @ rows, rtol=RTOL, atol=ATOL)
    # oneDNN computes a wider gradient transposed, (rows^T grads)^T: column-major
    assert got.is_contiguous() == (backend == "blas" or outputs < 24)


def test_a_strided_input_and_a_strided_gradient(fp32_gemm):
    fp32_gemm("onednn")
    state = torch.randn(6, 2, 24)  # (B, L, H): one layer's rows are strided
    x = state.unbind(1)[1].requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    weight = torch.randn(24, 24)
    out, ref = linear(x, weight), F.linear(ref_x, weight)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    grad = torch.randn(6, 48)[:, ::2]  # no row- or column-major layout
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=RTOL, atol=ATOL)


def test_only_some_gradients_wanted(fp32_gemm):
    fp32_gemm("onednn")
    (x, weight, b), _ = _case((4, 8), 5, "contiguous", True)
    weight.requires_grad_()
    linear(x, weight, b).sum().backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(weight.grad, torch.ones(4, 5).t() @ x, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, out_features", [((0, 8), 5), ((3, 8), 0), ((2, 0, 8), 5)])
def test_empty_products_are_torch_s(fp32_gemm, shape, out_features):
    fp32_gemm("onednn")
    (x, weight, b), _ = _case(shape, out_features, "contiguous", True)
    assert not uses_onednn(x, weight)
    assert linear(x, weight, b).shape == F.linear(x, weight, b).shape


def test_other_dtypes_autocast_and_blas_keep_torch_s_product(fp32_gemm):
    fp32_gemm("onednn")
    (x, weight), _ = _case((4, 8), 5, "contiguous", False)
    assert uses_onednn(x, weight)
    assert not uses_onednn(x.double(), weight.double())
    assert not uses_onednn(x.bfloat16(), weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, weight)
        assert linear(x, weight).dtype == torch.bfloat16  # autocast's own product
    fp32_gemm("blas")
    assert not uses_onednn(x, weight)
    assert torch.equal(product(x, weight), F.linear(x, weight))


def test_step_weights_are_made_contiguous_for_onednn_only(fp32_gemm):
    block = torch.randn(6, 10)[:, 2:8]
    fp32_gemm("onednn")
    assert gemm.step_weight(block).is_contiguous()
    fp32_gemm("blas")
    assert gemm.step_weight(block) is block


def _training_step(cell: str, attention: str, decoder: str, feeding: bool, seed: int = 0):
    model = make(tiny(cell, attention, decoder, feeding), seed=seed).train()
    src, src_lens, trg_in, trg_out = batch([5, 3, 4, 1])
    torch.manual_seed(seed + 1)  # the same dropout masks in both runs
    logits = model(src, src_lens, trg_in)
    loss = F.cross_entropy(logits.transpose(1, 2), trg_out)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("attention, decoder, feeding", [
    ("bahdanau", "bahdanau", True), ("bahdanau", "luong", True), ("general", "luong", False),
    ("dot", "luong", True)])
def test_a_training_step_agrees_with_blas(fp32_gemm, cell, attention, decoder, feeding):
    fp32_gemm("blas")
    ref_loss, ref_grads = _training_step(cell, attention, decoder, feeding)
    fp32_gemm("onednn")
    loss, grads = _training_step(cell, attention, decoder, feeding)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_loss_agrees_with_blas(fp32_gemm):
    from seq2seq.training.loss import linear_cross_entropy

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=gen)
    output = torch.nn.Linear(16, 50)
    target = torch.randint(0, 50, (37,), generator=gen)
    results = []
    for choice in ("blas", "onednn"):
        fp32_gemm(choice)
        h = hidden.clone().requires_grad_()
        output.zero_grad()
        loss = linear_cross_entropy(h, output, target, 0.1)
        loss.backward()
        results.append((loss.detach(), h.grad, output.weight.grad.clone(),
                        output.bias.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

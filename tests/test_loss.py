"""The training loss fused with the output layer equals the unfused cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.tokenizer import PAD
from seq2seq.training import loss as fused


def problem(bias: bool = True, rows: int = 37, hidden: int = 16, vocab: int = 29):
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(rows, hidden, generator=gen)
    output = nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        output.weight.copy_(torch.randn(vocab, hidden, generator=gen) * 0.3)
        if bias:
            output.bias.copy_(torch.randn(vocab, generator=gen))
    target = torch.randint(1, vocab, (rows,), generator=gen)
    target[::5] = PAD  # padding rows contribute nothing
    return features, output, target


def gradients(loss_fn, features, output, target, dtype):
    features = features.clone().requires_grad_()
    output.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(features, output, target)
    (loss * 0.37).backward()  # a scale, as the step's 1 / tokens
    grads = [features.grad, output.weight.grad]
    if output.bias is not None:
        grads.append(output.bias.grad)
    return [loss.detach()] + [g.clone() for g in grads]


def unfused(features, output, target, smoothing=0.1):
    return F.cross_entropy(output(features).float(), target, ignore_index=PAD,
                           reduction="sum", label_smoothing=smoothing)


def fused_loss(features, output, target, smoothing=0.1):
    return fused.linear_cross_entropy(features, output, target, smoothing)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_elements", [2**22, 29 * 8])  # one chunk; 8 rows (5 chunks)
def test_fp32_equals_cross_entropy(monkeypatch, bias, chunk_elements):
    monkeypatch.setitem(fused.CHUNK_ELEMENTS, "cpu", chunk_elements)
    features, output, target = problem(bias)
    expected = gradients(unfused, features, output, target, None)
    got = gradients(fused_loss, features, output, target, None)
    for want, have in zip(expected, got):
        assert have.dtype == want.dtype
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
    assert got[1][target == PAD].abs().max() == 0  # padding rows get no gradient


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_smoothing_values(monkeypatch, smoothing):
    monkeypatch.setitem(fused.CHUNK_ELEMENTS, "cpu", 29 * 7)
    features, output, target = problem()
    expected = gradients(lambda *a: unfused(*a, smoothing), features, output, target, None)
    got = gradients(lambda *a: fused_loss(*a, smoothing), features, output, target, None)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_agrees_with_unfused_bf16(monkeypatch):
    """Under bf16 autocast both compute the logits in bf16 and the softmax in fp32; they differ
    only by the matmul kernels' rounding and where the gradient is rounded to bf16
    (tolerance: a few bf16 ulps)."""
    monkeypatch.setitem(fused.CHUNK_ELEMENTS, "cpu", 29 * 8)
    features, output, target = problem(rows=64, hidden=32, vocab=29)
    expected = gradients(unfused, features, output, target, torch.bfloat16)
    got = gradients(fused_loss, features, output, target, torch.bfloat16)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # master grads
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    for want, have in zip(expected[1:], got[1:]):
        scale = want.abs().max()
        assert (have - want).abs().max() <= 2e-2 * scale


def test_tied_weight_gets_both_gradients():
    embedding = nn.Embedding(29, 16, padding_idx=PAD)
    features, output, target = problem(hidden=16)
    output.weight = embedding.weight
    tokens = torch.tensor([3, 4, 5])
    (embedding(tokens).sum() + fused_loss(features, output, target)).backward()
    via_output = embedding.weight.grad.clone()
    via_output[tokens] -= 1.0  # the embedding lookups' own gradient
    output.zero_grad(set_to_none=True)
    unfused(features, output, target).backward()
    torch.testing.assert_close(via_output, output.weight.grad, rtol=1e-5, atol=1e-6)


def test_only_padding_gives_zero_loss_and_gradients():
    features, output, target = problem()
    target[:] = PAD
    features.requires_grad_()
    loss = fused_loss(features, output, target)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert features.grad.abs().max() == 0 and output.weight.grad.abs().max() == 0

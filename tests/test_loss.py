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


def rdrop_pair(alpha, features_2, output, target, smoothing=0.1):
    return fused.rdrop_cross_entropy(features_2, output, target, smoothing, alpha)


@pytest.mark.parametrize("bias", [True, False])
def test_rdrop_with_two_equal_passes_is_the_plain_loss(bias):
    features, output, target = problem(bias)
    want = gradients(fused_loss, features, output, target, None)

    def twice(f, out, y):
        objective, cross_entropy = rdrop_pair(3.0, torch.cat([f, f]), out, y)
        torch.testing.assert_close(cross_entropy, objective.detach())  # the KL is 0
        return objective

    got = gradients(twice, features, output, target, None)
    for expected, have in zip(want, got):
        torch.testing.assert_close(have, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_rdrop_adds_alpha_times_the_symmetric_kl_of_the_passes(smoothing):
    features, output, target = problem()
    other = features + 0.5 * torch.randn(features.shape, generator=torch.Generator().manual_seed(4))
    objective, cross_entropy = rdrop_pair(5.0, torch.cat([features, other]), output, target,
                                          smoothing)
    keep = target != PAD
    p, q = (F.log_softmax(output(x[keep]), dim=-1) for x in (features, other))
    kl_pq = F.kl_div(q, p, log_target=True, reduction="sum")  # KL(p || q)
    kl_qp = F.kl_div(p, q, log_target=True, reduction="sum")
    plain = (unfused(features, output, target, smoothing)
             + unfused(other, output, target, smoothing)) / 2
    torch.testing.assert_close(cross_entropy, plain.detach())
    # The paper's CE_1 + CE_2 + alpha / 2 (KL_pq + KL_qp), halved.
    paper = 2 * plain + 5.0 / 2 * (kl_pq + kl_qp)
    torch.testing.assert_close(objective, paper / 2)
    assert kl_pq + kl_qp > 0.1  # the passes differ, so the term is not vacuous


def test_rdrop_refuses_rows_that_are_not_two_passes():
    features, output, target = problem()
    with pytest.raises(ValueError, match="2 x 37 rows"):
        fused.rdrop_cross_entropy(features, output, target, 0.1, 1.0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_reused_workspace_leaves_no_trace_between_calls(monkeypatch, dtype):
    monkeypatch.setattr(fused, "_WORKSPACE", {})
    small = problem(rows=23)
    fresh = gradients(fused_loss, *small, dtype)
    # A larger call fills the workspace with its own logits and gradients; a smaller one
    # after it reuses the memory and must compute exactly what it did from fresh memory.
    features, output, target = problem(rows=61)
    gradients(fused_loss, features * 7, output, target, dtype)
    (buffer,) = fused._WORKSPACE.values()
    again = gradients(fused_loss, *small, dtype)
    assert fused._WORKSPACE[buffer.dtype] is buffer  # reused, not made again
    for want, have in zip(fresh, again):
        assert torch.equal(have, want)

"""StepSources: attention's keys and values gradients summed over a decoder's steps in one
place, equal to those of attending step by step."""

import gc
import weakref

import pytest
import torch

from seq2seq.models import step_sources
from seq2seq.models.attention import Attention
from seq2seq.models.step_sources import StepSources

STEPS, ROWS, SOURCES, SIZE = 5, 4, 6, 8


def decode(attention, attend, keys, enc_out, src_mask, query0):
    """A toy recurrence through attention: each step's query is made from the last context,
    as a decoder's next state is; also a step whose output is left unused."""
    query, outs = query0, []
    for _ in range(STEPS):
        context, weights = attend(attention, query, keys, enc_out, src_mask)
        query = torch.tanh(context + query)
        outs.append(query * weights.sum(-1, keepdim=True))
    attend(attention, query, keys, enc_out, src_mask)  # not part of the loss: adds nothing
    return torch.cat(outs, dim=1)


def per_step(attention, query, keys, enc_out, src_mask):
    return attention(query, keys, enc_out, src_mask)


def gradients(kind, over_steps, dtype=torch.float64, autocast=False):
    """The output and the gradients of every input and parameter."""
    torch.manual_seed(0)
    attention = Attention(kind, SIZE, SIZE, 7).to(dtype)
    # drawn in float64 whatever the dtype: randn draws other values in other dtypes
    enc_out = torch.randn(ROWS, SOURCES, SIZE, dtype=torch.float64).to(dtype).requires_grad_()
    query0 = torch.randn(ROWS, 1, SIZE, dtype=torch.float64).to(dtype).requires_grad_()
    src_mask = torch.arange(SOURCES) < torch.tensor([[6], [3], [1], [5]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        keys = attention.project_keys(enc_out)
        if over_steps:
            made = attention.over_steps(keys, enc_out)
            out = decode(attention, lambda a, q, k, v, m: made(q, m), keys, enc_out,
                         src_mask, query0)
        else:
            out = decode(attention, per_step, keys, enc_out, src_mask, query0)
    torch.manual_seed(1)
    (out.double() * torch.randn(out.shape, dtype=torch.float64)).sum().backward()
    return [out, enc_out.grad, query0.grad] + [p.grad for p in attention.parameters()]


@pytest.mark.parametrize("kind", ["bahdanau", "dot", "general"])
def test_summed_gradients_equal_those_of_attending_step_by_step(kind):
    want = gradients(kind, over_steps=False)
    got = gradients(kind, over_steps=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bahdanau", "dot"])
def test_fp32_gradients_equal_step_by_steps_through_the_c_kernels_and_without(
        kind, request):
    # fp32 takes the C kernels for the additive scores (their keys' gradients summed in C);
    # the same test again with the kernels off takes torch's code for them.
    for off in (False, True):
        if off:
            request.getfixturevalue("torch_kernels")
        want = gradients(kind, over_steps=False, dtype=torch.float32)
        got = gradients(kind, over_steps=True, dtype=torch.float32)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_gradients_are_close_to_fp64s():
    want = gradients("bahdanau", over_steps=False)
    got = gradients("bahdanau", over_steps=True, dtype=torch.float32, autocast=True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32  # the gradients come back in their own dtypes
        torch.testing.assert_close(g.double(), w, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["bahdanau", "dot"])
def test_the_shared_gradients_are_one_product_not_one_per_step(kind, monkeypatch):
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append((a.shape, b.shape)) or bmm(a, b))
    gradients(kind, over_steps=True)
    outer = [c for c in calls if c[0][-1] == 1]  # (B, X, 1) x (B, 1, Y): a step's share
    summed = [c for c in calls if c[0][-1] == STEPS]  # (B, X, T) x (B, T, Y)
    assert not outer
    assert len(summed) == (1 if kind == "bahdanau" else 2)  # the values (and the keys)


def test_a_second_backward_adds_the_same_gradients_again():
    torch.manual_seed(0)
    attention = Attention("bahdanau", SIZE, SIZE, 7)
    enc_out = torch.randn(ROWS, SOURCES, SIZE, requires_grad=True)
    src_mask = torch.ones(ROWS, SOURCES, dtype=torch.bool)
    attend = attention.over_steps(attention.project_keys(enc_out), enc_out)
    out = sum(attend(torch.randn(ROWS, 1, SIZE), src_mask)[0].sum() for _ in range(3))
    out.backward(retain_graph=True)
    once = enc_out.grad.clone()
    out.backward()
    torch.testing.assert_close(enc_out.grad, 2 * once)


def test_decoding_and_beams_attend_as_forward_does():
    torch.manual_seed(0)
    attention = Attention("bahdanau", SIZE, SIZE, 7)
    enc_out = torch.randn(2, SOURCES, SIZE)
    src_mask = torch.ones(2, SOURCES, dtype=torch.bool)
    keys = attention.project_keys(enc_out)
    query = torch.randn(6, 1, SIZE)  # three beams per sentence
    with torch.no_grad():
        got = attention.over_steps(keys, enc_out)(query, src_mask)
        want = attention(query, keys, enc_out, src_mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    enc_out.requires_grad_()  # in training too, rows that are not one per source
    keys = attention.project_keys(enc_out)
    got = attention.over_steps(keys, enc_out)(query, src_mask)
    got[0].sum().backward()
    assert enc_out.grad is not None and got[1].shape == (6, 1, SOURCES)


def test_a_forward_pass_leaves_nothing_behind():
    attention = Attention("dot", SIZE, SIZE, 7)
    enc_out = torch.randn(ROWS, SOURCES, SIZE, requires_grad=True)
    made = []
    real = step_sources.StepSources

    def remember(*args):
        sources = real(*args)
        made.append(weakref.ref(sources))
        return sources

    src_mask = torch.ones(ROWS, SOURCES, dtype=torch.bool)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("seq2seq.models.attention.StepSources", remember)
        attend = attention.over_steps(enc_out, enc_out)
        alive = made[0]()  # held until the pass is over
    attend(torch.randn(ROWS, 1, SIZE), src_mask)[0].sum().backward()
    assert isinstance(alive, StepSources)
    del attend, alive
    gc.collect()
    assert made[0]() is None

"""StepLinear: a recurrence's weight gradient as one product, equal to per-step F.linear's."""

import functools
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from seq2seq.models.step_linear import StepLinear, step_linear


def recurrence(linear, xs, h):
    """h_t = tanh(x_t + linear(h_{t-1})); also a product whose output is left unused."""
    outs = []
    for x in xs:
        h = torch.tanh(x + linear(h))
        outs.append(h)
    linear(xs[0])  # not part of the loss: adds nothing to the gradient
    return torch.stack(outs)


def gradients(make, dtype, bias=True, steps=6, rows=5, size=4):
    torch.manual_seed(0)
    weight = torch.randn(size, size, dtype=torch.float64, requires_grad=True)
    b = torch.randn(size, dtype=torch.float64, requires_grad=True) if bias else None
    xs = torch.randn(steps, rows, size, dtype=torch.float64).to(dtype).requires_grad_()
    out = recurrence(make(weight, b), xs, torch.zeros(rows, size, dtype=dtype))
    torch.manual_seed(1)
    (out.double() * torch.randn(out.shape, dtype=torch.float64)).sum().backward()
    return [out, xs.grad, weight.grad] + ([b.grad] if bias else [])


def plain(dtype):
    def make(weight, bias):
        return functools.partial(F.linear, weight=weight.to(dtype),
                                 bias=None if bias is None else bias.to(dtype))
    return make


@pytest.mark.parametrize("bias", [True, False])
def test_one_product_gives_the_gradients_of_a_product_per_step(bias):
    want = gradients(plain(torch.float64), torch.float64, bias)
    made = []

    def make(weight, b):
        made.append(StepLinear(weight, b, torch.float64))
        return made[-1]

    got = gradients(make, torch.float64, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert len(made[0].inputs) == 7 and not made[0].grads  # 7 products; gradients consumed


def test_bf16_gradients_are_close_to_fp64s():
    want = gradients(plain(torch.float64), torch.float64)
    got = gradients(functools.partial(step_linear, dtype=torch.bfloat16), torch.bfloat16)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0.05, atol=0.05)


def test_backward_in_any_order_and_in_parts_adds_every_steps_share():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    linear = StepLinear(weight, None, torch.float64)
    ys = [linear(x) for x in xs]  # three products, none feeding another
    ys[2].sum().backward(retain_graph=True)
    ys[0].sum().backward(retain_graph=True)
    ys[1].sum().backward()
    want = sum(torch.ones(2, 3, dtype=torch.float64).t() @ x for x in xs)
    torch.testing.assert_close(weight.grad, want)


def test_only_bf16_cpu_training_takes_it():
    weight = torch.randn(3, 4, requires_grad=True)
    assert isinstance(step_linear(weight, None, torch.bfloat16), StepLinear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(step_linear(weight), StepLinear)
    assert not isinstance(step_linear(weight), StepLinear)  # fp32
    with torch.no_grad():
        assert not isinstance(step_linear(weight, None, torch.bfloat16), StepLinear)
    x = torch.randn(2, 4)
    with torch.no_grad():
        out = step_linear(weight, None, torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x @ weight.detach().t(), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("backward", [True, False])
def test_a_forward_pass_leaves_nothing_behind(backward):
    # The owner holds its cast's outputs: a strong reference back from the cast's node would
    # be a cycle the collector cannot see, keeping every step's input of every update.
    weight = torch.randn(4, 4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    linear = StepLinear(weight, bias, torch.bfloat16)
    owner = weakref.ref(linear)
    out = linear(linear(torch.randn(2, 4)))
    if backward:
        out.float().sum().backward()
        assert weight.grad is not None and bias.grad is not None
    del linear, out
    gc.collect()
    assert owner() is None

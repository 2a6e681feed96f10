"""Products by one weight at every step of a recurrence, with one weight-gradient product.

A recurrence multiplies by the same weight at each of its ``T`` steps. The backward of each
``F.linear`` computes that step's share of the weight's gradient, ``g_t^T x_t``, a product whose
inner dimension is only the batch (a few hundred rows), and adds it to the sum so far: ``T``
small products and ``T`` additions of a whole weight-sized gradient (under bf16 autocast, summed
in bf16). :class:`StepLinear` instead keeps each step's input and, in backward, each step's
output gradient, and computes the weight's and the bias's gradients once, as one product over all
steps, ``cat(g)^T cat(x)``, accumulated in fp32 inside the product and rounded once.

It casts the weight for the steps itself, and computes the gradients in the backward of that
cast: every step uses the cast, so autograd runs its backward only after the backward of every
step whose output reaches the loss, in whatever order those ran (a step whose output does not
reach the loss adds nothing, as with ``F.linear``).

:func:`step_linear` uses it where it pays: bf16 training on a CPU. There the one product runs
faster than the ``T`` small ones (about 11 against 13-18 ms for 20 steps of 300 x 1,536 x 512
on a 2-core Xeon with AMX) and the ``T`` bf16 additions go: ``de-en.gru`` bf16 training was
3.5% and 1.7% faster in two runs, alternating in one process. In fp32 on the same CPU the small
products are as fast as the one (MKL), and the copies of the steps' inputs and gradients made
training 4% slower, so fp32, decoding and GPUs keep plain :func:`~seq2seq.models.gemm.linear`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from seq2seq.models.gemm import bucket_rows, linear, pad_rows, product, step_weight, weight_grad

Linear = Callable[[torch.Tensor], torch.Tensor]


class StepLinear:
    """``x -> x W^T + b`` in ``dtype`` for the steps of one forward pass, with one
    weight-gradient product.

    Args:
        weight: ``(out, in)``, as it is kept (fp32 master weights); its cast to ``dtype`` is
            made here once.
        bias: ``(out,)`` or None.
        dtype: the dtype the products are made in.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.inputs: list[torch.Tensor] = []  # each step's input, in the order of the steps
        self.grads: dict[int, torch.Tensor] = {}  # the output gradients of the steps so far
        self.dtypes = weight.dtype, None if bias is None else bias.dtype
        casts = _Cast.apply(self, dtype, weight, *(() if bias is None else (bias,)))
        self.weight, self.bias = (casts, None) if bias is None else casts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = len(self.inputs)
        x = x.to(self.weight.dtype)  # once: kept for the gradient and multiplied
        self.inputs.append(x.detach())
        return _Step.apply(x, self.weight, self.bias, self, step)

    def gradients(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weight's and the bias's gradients from every step whose backward ran, in the
        dtypes they are kept in (None if none ran)."""
        if not self.grads:
            return None, None
        steps = sorted(self.grads)
        grads = [self.grads[t] for t in steps]
        rows = [self.inputs[t] for t in steps]
        self.grads.clear()
        count = sum(g.size(0) for g in grads)
        if bucket_rows(count) > count:  # zero rows, to a bucketed inner size (bucket_rows)
            grads.append(grads[0].new_zeros(bucket_rows(count) - count, grads[0].size(1)))
            rows.append(rows[0].new_zeros(bucket_rows(count) - count, rows[0].size(1)))
        grads, rows = torch.cat(grads), torch.cat(rows)
        with torch.autocast(grads.device.type, enabled=False):
            grad_weight = weight_grad(grads, rows).to(self.dtypes[0])
            wide = torch.promote_types(grads.dtype, torch.float32)  # bf16 summed in fp32
            grad_bias = None if self.dtypes[1] is None else \
                grads.sum(0, dtype=wide).to(self.dtypes[1])
        return grad_weight, grad_bias


class _Cast(torch.autograd.Function):
    """The weight (and bias) cast for the steps; its backward is the one gradient product."""

    @staticmethod
    def forward(ctx: Any, owner: StepLinear, dtype: torch.dtype, weight: torch.Tensor,
                *bias: torch.Tensor) -> Any:
        # A weak reference: the owner holds this node's outputs, so a strong one would be a
        # cycle through autograd's graph that Python's collector cannot see, and every
        # forward's owner, with its steps' inputs, would stay in memory for good. While
        # backward runs, the steps' nodes hold the owner.
        ctx.owner = weakref.ref(owner)
        ctx.has_bias = bool(bias)
        ctx.set_materialize_grads(False)  # the steps give it no gradient of their own
        casts = tuple(t.to(dtype, copy=True) for t in (weight, *bias))
        return casts if bias else casts[0]

    @staticmethod
    def backward(ctx: Any, *unused: Any) -> tuple[torch.Tensor | None, ...]:
        owner = ctx.owner()
        grad_weight, grad_bias = (None, None) if owner is None else owner.gradients()
        return (None, None, grad_weight) + ((grad_bias,) if ctx.has_bias else ())


class _Step(torch.autograd.Function):
    """One step's product; its backward keeps the output's gradient for :class:`_Cast`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                owner: StepLinear, step: int) -> torch.Tensor:
        ctx.owner, ctx.step = owner, step
        ctx.save_for_backward(weight)
        with torch.autocast(x.device.type, enabled=False):
            return padded_product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        ctx.owner.grads[ctx.step] = grad
        grad_x = None
        if ctx.needs_input_grad[0]:
            with torch.autocast(grad.device.type, enabled=False):
                grad_x = padded_product(grad, weight.t())
        return grad_x, None, None, None, None


def padded_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``x W^T + b`` for ``x`` ``(m, in)``, computed at :func:`~seq2seq.models.gemm.
    bucket_rows` rows (zero rows added, their results dropped): a recurrence's rows change
    as its sentences end, and each new row count would make oneDNN build a new kernel."""
    rows = x.size(0)
    return product(pad_rows(x, bucket_rows(rows)), weight, bias)[:rows]


def step_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> Linear:
    """A function ``x -> x W^T + b`` for the steps of one forward pass of a recurrence.

    Args:
        weight, bias: as they are kept (the master weights).
        dtype: the dtype of the products; None: autocast's where it is on, else the weight's.

    Returns:
        a :class:`StepLinear` for bf16 products on a CPU with gradients enabled for
        ``weight``; else :func:`~seq2seq.models.gemm.linear` on the weight cast once (or,
        uncast, made contiguous once for oneDNN: :func:`~seq2seq.models.gemm.step_weight`).
    """
    device = weight.device.type
    if dtype is None and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    if (device == "cpu" and dtype == torch.bfloat16 and torch.is_grad_enabled()
            and weight.requires_grad):
        return StepLinear(weight, bias, dtype)
    if dtype is None or dtype == weight.dtype:
        return functools.partial(linear, weight=step_weight(weight), bias=bias)
    return functools.partial(linear, weight=weight.to(dtype),
                             bias=None if bias is None else bias.to(dtype))

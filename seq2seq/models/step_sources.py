"""An attention's keys and values for the steps of one decoder pass, with gradients summed once.

Every decoder step attends over the same keys and values (the encoder outputs). Autograd's
backward of each step computes that step's share of their gradients and adds it to the sum so
far: for the context ``bmm(weights, values)``, a ``(B, S, 1) x (B, 1, He)`` product (an outer
product, which runs at a few GFLOP/s on a CPU) makes a new ``(B, S, He)`` tensor at every step,
and another addition of it follows; the additive scores' backward writes a new ``(B, S, A)``
keys gradient at every step likewise. :class:`StepSources` instead keeps each step's left
operand and, in backward, its output gradient, and computes each shared operand's gradient as
one product over all steps, ``(B, X, T) x (B, T, Y)``; the additive scores' C backward adds its
steps' keys gradients into one fp32 sum. All of it happens in the backward of the node that
hands the keys and values to the steps, which autograd runs only after the backward of every
step (as :mod:`seq2seq.models.step_linear` does for a recurrent weight).

:meth:`seq2seq.models.attention.Attention.over_steps` uses it in CPU training. GPUs, decoding
and a step with another number of query rows than source rows attend as before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

Slot = str  # "keys" (dot and general scores: ``query x keys^T``) or "values" (the context)


class StepSources:
    """Keys ``(B, S, A)`` and values ``(B, S, He)`` for the steps of one forward pass.

    Args:
        keys, values: as :meth:`~seq2seq.models.attention.Attention.project_keys` and the
            encoder return them.
        dtype: the dtype the steps compute in (autocast's where it is on); the two are cast
            to it once here, their gradients returned in their own dtypes.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
        self.operands: dict[Slot, dict[int, torch.Tensor]] = {"keys": {}, "values": {}}
        self.grads: dict[Slot, dict[int, torch.Tensor]] = {"keys": {}, "values": {}}
        self.keys_sum: torch.Tensor | None = None  # fp32, from the additive scores' backward
        self.keys, self.values = _Sources.apply(self, dtype, keys, values)

    def keys_grad(self) -> torch.Tensor:
        """The fp32 ``(B, S, A)`` sum to which the additive scores' backward adds each step's
        keys gradient (:func:`seq2seq.native.additive_scores`)."""
        if self.keys_sum is None:
            self.keys_sum = torch.zeros(self.keys.shape, dtype=torch.float32,
                                        device=self.keys.device)
        return self.keys_sum

    def product(self, left: torch.Tensor, slot: Slot) -> torch.Tensor:
        """One step's ``left @ keys^T`` (``(B, t, A)`` queries: scores ``(B, t, S)``) or
        ``left @ values`` (``(B, t, S)`` weights: the context ``(B, t, He)``)."""
        step = len(self.operands[slot])  # the step's forward adds its operand
        shared = self.keys.transpose(1, 2) if slot == "keys" else self.values
        return _Step.apply(left, shared, self, slot, step)

    def gradient(self, slot: Slot) -> torch.Tensor | None:
        """The shared operand's gradient from every step whose backward ran (None if none),
        as ``(B, A, S)`` for the keys' slot (the transposed keys), ``(B, S, He)`` for the
        values'."""
        grads = self.grads[slot]
        if not grads:
            return None
        steps = sorted(grads)
        operands = torch.cat([self.operands[slot][t] for t in steps], dim=1)  # (B, T, X)
        outputs = torch.cat([grads[t] for t in steps], dim=1)  # (B, T, Y)
        grads.clear()
        with torch.autocast(outputs.device.type, enabled=False):
            return torch.bmm(operands.transpose(1, 2), outputs)


class _Sources(torch.autograd.Function):
    """The keys and values as the steps use them; its backward sums their gradients."""

    @staticmethod
    def forward(ctx: Any, owner: StepSources, dtype: torch.dtype, keys: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A weak reference: the owner holds this node's outputs (see step_linear._Cast).
        ctx.owner = weakref.ref(owner)
        ctx.dtypes = keys.dtype, values.dtype
        ctx.set_materialize_grads(False)  # the steps give it no gradient of their own
        return tuple(t.view_as(t) if t.dtype == dtype else t.to(dtype) for t in (keys, values))

    @staticmethod
    def backward(ctx: Any, grad_keys: torch.Tensor | None, grad_values: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        owner = ctx.owner()
        if owner is not None:
            keys_t = owner.gradient("keys")
            parts = [grad_keys, owner.keys_sum, None if keys_t is None else keys_t.transpose(1, 2)]
            owner.keys_sum = None  # a second backward (retain_graph) sums afresh
            grad_keys = _total(parts)
            grad_values = _total([grad_values, owner.gradient("values")])
        return (None, None, None if grad_keys is None else grad_keys.to(ctx.dtypes[0]),
                None if grad_values is None else grad_values.to(ctx.dtypes[1]))


def _total(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the parts that are there, in fp32 where any is (None if none is)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    dtype = torch.float32 if any(p.dtype == torch.float32 for p in present) else present[0].dtype
    total = present[0].to(dtype)
    for part in present[1:]:
        total = total + part.to(dtype)
    return total


class _Step(torch.autograd.Function):
    """One step's product by a shared operand; its backward keeps the output's gradient for
    :class:`_Sources` and returns only the left operand's."""

    @staticmethod
    def forward(ctx: Any, left: torch.Tensor, shared: torch.Tensor, owner: StepSources,
                slot: Slot, step: int) -> torch.Tensor:
        ctx.owner, ctx.slot, ctx.step, ctx.dtype = owner, slot, step, left.dtype
        left = left.to(shared.dtype)
        owner.operands[slot][step] = left.detach()
        ctx.save_for_backward(shared)
        with torch.autocast(left.device.type, enabled=False):
            return torch.bmm(left, shared)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (shared,) = ctx.saved_tensors
        grad = grad.to(shared.dtype)
        ctx.owner.grads[ctx.slot][ctx.step] = grad
        grad_left = None
        if ctx.needs_input_grad[0]:
            with torch.autocast(grad.device.type, enabled=False):
                grad_left = torch.bmm(grad, shared.transpose(1, 2)).to(ctx.dtype)
        return grad_left, None, None, None, None

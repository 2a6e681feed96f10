"""Weights reordered once for oneDNN, for decoding on a CPU.

oneDNN multiplies matrices with the weight in a blocked layout of its own. ``F.linear`` on
bf16 CPU tensors reorders the weight into that layout at every call: a pass over the whole
weight, which at a decoder step's batch sizes costs as much as the product or more. Measured on
a 2-core AMD EPYC (Zen 5, ``avx512_bf16``), the 512 -> 7,000 output layer with two threads:
5 rows (one sentence's beams) 0.23 ms plain against 0.06 ms packed, 160 rows 1.56 against
1.12, 500 rows 4.38 against 3.49. fp32 weights are packed too where fp32 products go to oneDNN
(:mod:`seq2seq.models.gemm`): on the same CPU, 5 rows 0.54 ms by MKL, 0.34 by oneDNN on the
plain weight and 0.09 packed; 160 rows 5.76, 2.52 and 2.07 ms.

:func:`pack_for_cpu` turns every ``nn.Linear`` of a bf16 or fp32 model into a
:class:`PackedLinear` (same parameters, so tied weights stay tied and ``state_dict`` is
unchanged) and has each :class:`~seq2seq.models.decoder.Decoder` pack the weight blocks its
fused step multiplies by (:meth:`~seq2seq.models.decoder.Decoder.pack_steps`).
Packing is for inference: the packed copies are made once and do not follow later changes to
the parameters, and the packed paths are taken only without gradients, in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from seq2seq.models.gemm import fp32_packing, linear, onednn_available

Linear = Callable[[torch.Tensor], torch.Tensor]


def packing_supported(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN multiplies by packed ``dtype`` weights on ``device``: bf16 where torch
    runs oneDNN's bf16 inner product on this CPU, fp32 where decoding packs them
    (:func:`~seq2seq.models.gemm.fp32_packing`)."""
    if device.type != "cpu" or not onednn_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32 and fp32_packing()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(out, in)`` in oneDNN's blocked layout (an mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight from :func:`pack_weight`; ``x`` may have
    any number of leading dimensions."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedWeight:
    """``weight`` packed once (:func:`pack_weight`). oneDNN's tensors cannot be deep-copied,
    so a deep copy packs the copied weight again: ``copy.deepcopy`` of a packed model works,
    and the copy's packs are its own."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()
        self.tensor = pack_weight(self.weight)

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight(copy.deepcopy(self.weight, memo))


class PackedProduct:
    """``x -> x W^T + b`` by a packed copy of ``weight`` (``bias`` is read as it is)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.packed, self.bias = PackedWeight(weight), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed.tensor, self.bias)


def linear_fn(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """``x -> x W^T + b`` by a packed copy of ``weight`` (``bias`` is read as it is)."""
    return PackedProduct(weight, bias)


def _on_parameters_of(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    """A ``cls`` module on ``linear``'s own weight and bias (tied weights stay tied)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.in_features, module.out_features = linear.in_features, linear.out_features
    module.weight, module.bias = linear.weight, linear.bias
    module.training = linear.training
    return module


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies by a packed copy of its weight outside training.

    The weight and bias stay the module's parameters (tied weights stay tied); with gradients
    enabled or in training mode it multiplies by them as they are now
    (:func:`~seq2seq.models.gemm.linear`).
    """

    packed: PackedWeight

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        module = _on_parameters_of(cls, linear)
        module.packed = PackedWeight(linear.weight)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed.tensor, self.bias)


def pack_for_cpu(model: nn.Module) -> bool:
    """Pack ``model``'s Linear weights in place (see the module docstring).

    Returns:
        False, leaving the model as it was, where packing is not supported for the model's
        dtype (:func:`packing_supported`) or the model is not all bf16 or all fp32 on the
        CPU; else True.
    """
    params = list(model.parameters())
    dtype = params[0].dtype if params else None
    if dtype not in (torch.bfloat16, torch.float32) \
            or any(p.dtype != dtype or p.device.type != "cpu" for p in params):
        return False
    if not packing_supported(params[0].device, dtype):
        return False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear.from_linear(child))
    for module in model.modules():
        pack_steps = getattr(module, "pack_steps", None)  # the decoder's own weight blocks
        if callable(pack_steps):
            pack_steps()
    return True


def unpack(model: nn.Module) -> nn.Module:
    """Undo :func:`pack_for_cpu` in place (before casting or quantising a packed model, whose
    packs would not follow): every :class:`PackedLinear` back to an ``nn.Linear`` on the same
    parameters, the decoders' packed step weights dropped. Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, _on_parameters_of(nn.Linear, child))
        if getattr(parent, "packed_linears", None) is not None:
            parent.packed_linears = None
    return model

"""The recurrent cells' arithmetic, and a stacked RNN over packed sequences built from it.

:func:`cell_update` is one step of ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (tanh) given the
input's and the hidden state's shares of the gates, with torch's equations and gate order (GRU:
r, z, n; LSTM: i, f, g, o), so the modules' parameters mean the same here as in torch.
:func:`packed_rnn` steps with it, multiplying by the hidden-to-hidden weight through
:func:`~seq2seq.models.step_linear.step_linear`, and so does the decoder's fused path (with
weights packed for bf16 decoding).

:func:`packed_rnn` is what ``rnn(packed)`` computes, for training on a CPU. Torch's CPU kernel
for packed input reads each step's rows of the precomputed input gates with ``narrow``, and
the backward of each ``narrow`` writes a zero-filled gradient the size of the whole sequence
before adding it up: ``S`` full-size fills and additions per layer and direction. Here the
gates are ``split`` into their steps, whose backward joins the steps' gradients once.

:func:`padded` is ``pad_packed_sequence(packed, batch_first=True)``, for the same reason: torch
copies each run of steps into a slice of the output in place, and the backward of every such
copy clones the whole ``(S, B, H)`` gradient (one clone per distinct batch size: about 15 per
``de-en.gru`` batch, measured). Here the packed rows are put in place by one ``index_copy``,
whose backward is one ``index_select``, and the result is contiguous batch-first memory, which
each decoder step's attention reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq import native
from seq2seq.models.dropout import dropout
from seq2seq.models.gemm import linear
from seq2seq.models.step_linear import Linear, step_linear

CELLS = {"GRU": "gru", "LSTM": "lstm", "RNN_TANH": "rnn"}


def tanh(x: torch.Tensor) -> torch.Tensor:
    """``torch.tanh(x)``, computed by the C kernels (:func:`seq2seq.native.tanh`) or numpy for
    a float32 CPU tensor outside autograd, and in fp32 for a bf16 CPU tensor.

    torch's CPU tanh is slow: a ``(160, 256)`` tensor (a beam-5 step's GRU gate or ``h~`` for
    32 sentences) takes 80 us on a 2-core AMD EPYC (Zen 5), against 7 us for numpy's SIMD
    tanh and 9 us for torch's sigmoid; that was 8% of an int8 decoding step's op time. numpy's
    result is within 1.1e-7 relative of the exact one (torch's: 6e-8), but it runs on one
    thread, and where it has no SIMD tanh it is slow too (1 ms for a ``(500, 512)`` tensor
    on a 2-core Zen 3 EPYC, with AVX2 only; the C kernel: 0.15 ms on two threads). The C
    kernel is within 1.6e-7 absolute of the exact tanh. Each is element-wise, the same for an
    element whatever its neighbours, layout or batch (checked on slices, strided and
    transposed views), so decoding stays batch-invariant. With gradients, for other dtypes
    and devices, and inside ``torch.compile``, it is ``torch.tanh``.

    torch's bf16 CPU tanh is slower still: a ``(315, 25, 512)`` tensor takes 4.4 ms on a
    2-core Xeon with AMX, against 0.7 ms in fp32. A bf16 CPU tensor's tanh is therefore
    computed in fp32 and rounded once (:class:`_Bf16Tanh`, which is also more exact), with or
    without gradients.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        return _Bf16Tanh.apply(x)
    if (x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
            and not torch.compiler.is_compiling()):
        fused = native.tanh(x.contiguous())
        return fused if fused is not None else torch.from_numpy(np.tanh(x.numpy()))
    return torch.tanh(x)


class _Bf16Tanh(torch.autograd.Function):
    """``tanh`` of a bf16 tensor computed in fp32 and rounded once (see :func:`tanh`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = tanh(x.float()).to(x.dtype)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, out)


def cell_update(cell: str, gates: torch.Tensor, hidden: torch.Tensor, h: torch.Tensor,
                c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of a GRU / LSTM / tanh-RNN cell.

    Args:
        cell: "gru", "lstm" or "rnn".
        gates: ``(B, G)`` the input's share of the gates, ``x W_ih^T + b_ih``.
        hidden: ``(B, G)`` the hidden state's share, ``h W_hh^T + b_hh``.
        h: ``(B, H)`` the previous hidden state; c: the LSTM's cell state (else None).

    Returns:
        the new ``h`` and ``c`` (None but for LSTM).
    """
    if cell == "gru":
        if torch.is_grad_enabled() and h.device.type == "cpu" and (
                gates.requires_grad or hidden.requires_grad or h.requires_grad):
            return _GRUUpdate.apply(gates, hidden, h), None
        fused = native.gru_update(gates, hidden, h)  # one pass per row, in inference
        if fused is not None:
            return fused, None
        size = h.size(-1)
        reset, update = torch.sigmoid(gates[:, :2 * size] + hidden[:, :2 * size]).chunk(2, -1)
        new = tanh(gates[:, 2 * size:] + reset * hidden[:, 2 * size:])
        return new + update * (h - new), None
    if cell == "lstm":
        i, f, g, o = (gates + hidden).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * tanh(g)
        return torch.sigmoid(o) * tanh(c), c
    return tanh(gates + hidden), None


class _GRUUpdate(torch.autograd.Function):
    """The GRU update of :func:`cell_update` with a backward written out, for CPU training.

    Autograd's backward of the update as written runs about twenty kernels, among them a
    zero-filled ``(B, 3H)`` gradient and a copy for each of the four gate slices and their
    additions; this one runs nine. It computes the same values by the same operations, with
    :func:`tanh` for the candidate state (numpy's in fp32, fp32's in bf16): given the same
    ``tanh``, its results and gradients are bitwise those of autograd's (checked in fp32, fp64
    and bf16).

    Where the C kernels take the inputs (fp32 or bf16 CPU tensors of one dtype), the forward
    and the backward are one pass per row each instead (:func:`seq2seq.native.gru_train`):
    the same equations computed in fp32 and rounded once, ``tanh`` as ``2 sigmoid(2x) - 1``
    as in decoding's :func:`seq2seq.native.gru_update`.
    """

    @staticmethod
    def forward(ctx: Any, gates: torch.Tensor, hidden: torch.Tensor, h: torch.Tensor
                ) -> torch.Tensor:
        fused = native.gru_train(gates, hidden, h)  # all of it in one pass per row
        ctx.fused = fused is not None
        if fused is not None:
            out, rz, new = fused
            ctx.save_for_backward(rz, new, hidden, h)
            return out
        size = h.size(-1)
        rz = torch.sigmoid(gates[:, :2 * size] + hidden[:, :2 * size])
        hn = hidden[:, 2 * size:]
        pre = gates[:, 2 * size:] + rz[:, :size] * hn
        new = tanh(pre)
        ctx.save_for_backward(rz, new, hn, h)
        ctx.dtypes = gates.dtype, hidden.dtype, h.dtype
        return new + rz[:, size:] * (h - new)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if ctx.fused:
            return native.gru_train_backward(grad, *ctx.saved_tensors)
        rz, new, hn, h = ctx.saved_tensors
        size = h.size(-1)
        grad_h = grad * rz[:, size:]
        grad_rz = torch.empty_like(rz, dtype=torch.promote_types(rz.dtype, grad.dtype))
        torch.mul(grad, h - new, out=grad_rz[:, size:])  # the update gate's
        grad_pre = torch.ops.aten.tanh_backward(grad - grad_h, new)
        torch.mul(grad_pre, hn, out=grad_rz[:, :size])  # the reset gate's
        grad_rz = torch.ops.aten.sigmoid_backward(grad_rz, rz)
        gates_dtype, hidden_dtype, h_dtype = ctx.dtypes
        return (torch.cat([grad_rz, grad_pre], 1).to(gates_dtype),
                torch.cat([grad_rz, grad_pre * rz[:, :size]], 1).to(hidden_dtype),
                grad_h.to(h_dtype))


def steps_packed(rnn: nn.Module) -> bool:
    """Whether :func:`packed_rnn` computes ``rnn``: a float ``nn.GRU`` / ``nn.LSTM`` /
    tanh ``nn.RNN`` without projections (not a quantised one, whose weights are packed)."""
    return (isinstance(rnn, nn.RNNBase) and rnn.mode in CELLS
            and not getattr(rnn, "proj_size", 0))


def layer_weights(rnn: nn.RNNBase, layer: int, direction: int,
                  dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
    """``[weight_ih, weight_hh, bias_ih, bias_hh]`` of one layer and direction of ``rnn``
    (None for a missing bias), cast to ``dtype`` unless it is None."""
    suffix = f"l{layer}" + ("_reverse" if direction else "")
    weights = [getattr(rnn, f"{name}_{suffix}", None)
               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return weights if dtype is None else [w if w is None else w.to(dtype) for w in weights]


def packed_rnn(rnn: nn.RNNBase, packed: PackedSequence, dtype: torch.dtype | None = None,
               products: Sequence[tuple[Linear, Linear]] | None = None
               ) -> tuple[PackedSequence, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """``rnn(packed)`` from zero initial states, with the module's parameters.

    Args:
        rnn: a module that :func:`steps_packed` accepts; its dropout between layers applies
            in training, as the module's own.
        packed: the input, as ``pack_padded_sequence`` makes it.
        dtype: compute in this dtype on copies of the weights (bf16 under CPU bf16
            autocast); None: in the weights' dtype.
        products: for each layer and direction (layer-major, as torch orders them), the
            input and recurrent products ``x -> x W_ih^T + b_ih`` and ``h -> h W_hh^T +
            b_hh`` to compute with instead of ``rnn``'s weights (an int8 encoder's,
            :mod:`seq2seq.quantize`); ``rnn`` then needs only the module's settings
            (``mode``, ``num_layers``, ``bidirectional``, ``hidden_size``, ``dropout``,
            ``training``).

    Returns:
        the packed outputs of the top layer, and the final states ``(L * D, B, H)`` in the
        input's batch order (for LSTM ``(h, c)``), as the module returns them.
    """
    cell = CELLS[rnn.mode]
    sizes = packed.batch_sizes.tolist()
    x = packed.data if dtype is None else packed.data.to(dtype)
    directions = 2 if rnn.bidirectional else 1
    finals_h, finals_c = [], []
    for layer in range(rnn.num_layers):
        if layer > 0:
            x = dropout(x, rnn.dropout, rnn.training)
        outputs = []
        for direction in range(directions):
            if products is None:
                w_ih, w_hh, b_ih, b_hh = layer_weights(rnn, layer, direction)
                if dtype is not None:
                    w_ih, b_ih = w_ih.to(dtype), None if b_ih is None else b_ih.to(dtype)
                gates = linear(x, w_ih, b_ih)
                # Multiplies by w_hh at every step; in bf16, its gradient is one product for
                # all steps.
                recurrent = step_linear(w_hh, b_hh, dtype)
            else:
                input_product, recurrent = products[layer * directions + direction]
                gates = input_product(x)
            out, h, c = _layer(cell, gates, sizes, recurrent, rnn.hidden_size,
                               reverse=direction == 1)
            outputs.append(out)
            finals_h.append(h)
            finals_c.append(c)
        x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
    order = packed.unsorted_indices
    h = torch.stack(finals_h)
    h = h if order is None else h.index_select(1, order)
    if cell != "lstm":
        return packed._replace(data=x), h
    c = torch.stack(finals_c)
    return packed._replace(data=x), (h, c if order is None else c.index_select(1, order))


def _layer(cell: str, gates: torch.Tensor, sizes: list[int], recurrent: Linear, hidden: int,
           reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer and direction over packed data, given its input gates ``gates`` ``(N, G)``
    (every step's at once) with ``sizes`` rows per step (non-increasing: the batch is sorted
    by length, longest first), multiplying the state of ``hidden`` features by
    ``recurrent`` at each step.

    Returns:
        the outputs ``(N, H)`` in the same packed layout, and the final ``h`` and ``c`` (None
        but for LSTM), ``(B, H)`` in sorted order: each sentence's state after its last real
        step, or (reverse) after its first.
    """
    steps = gates.split(sizes)  # backward: one join, not a fill per step
    h = gates.new_zeros(sizes[-1] if reverse else sizes[0], hidden)
    c = torch.zeros_like(h) if cell == "lstm" else None
    outputs: list[torch.Tensor] = [h] * len(sizes)
    done_h, done_c = [], []
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        rows = sizes[t]
        if rows > h.size(0):  # reverse: longer sentences join at their last step
            h = torch.cat([h, h.new_zeros(rows - h.size(0), hidden)])
            c = None if c is None else torch.cat([c, c.new_zeros(rows - c.size(0), hidden)])
        elif rows < h.size(0):  # forward: the shortest sentences have ended
            done_h.append(h[rows:])
            done_c.append(None if c is None else c[rows:])
            h, c = h[:rows], None if c is None else c[:rows]
        h, c = cell_update(cell, steps[t], recurrent(h), h, c)
        outputs[t] = h
    if not reverse and done_h:  # the longest sentences last: sorted order is the reverse
        h = torch.cat([h] + done_h[::-1])
        c = None if c is None else torch.cat([c] + done_c[::-1])
    return torch.cat(outputs), h, c


def padded(packed: PackedSequence, length: int) -> torch.Tensor:
    """``pad_packed_sequence(packed, batch_first=True, total_length=length)[0]`` (zeros on
    padding) as contiguous ``(B, length, H)``, made by one ``index_copy``."""
    data, sizes = packed.data, packed.batch_sizes
    rows = torch.arange(data.size(0))
    starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    steps = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    sorted_rows = rows - starts  # each packed row's place in the length-sorted batch
    order = packed.sorted_indices
    batch_rows = sorted_rows if order is None else order.cpu()[sorted_rows]
    index = (batch_rows * length + steps).to(data.device)
    batch = int(sizes[0])
    out = data.new_zeros(batch * length, data.size(-1)).index_copy(0, index, data)
    return out.view(batch, length, data.size(-1))

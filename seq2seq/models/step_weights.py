"""The weight products of the decoder's fused step (:func:`seq2seq.models.decoder.recur`).

Each step multiplies by blocks of the RNN's and the attentional layer's weights: a
:class:`StepLinears` of plain ``F.linear`` calls on the parameters as they are now
(:func:`plain_step_linears`, training and fp32 decoding), or of copies packed once for
oneDNN (:func:`packed_step_linears`, bf16 decoding on a CPU: :mod:`seq2seq.models.packed`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from seq2seq.models.gemm import linear
from seq2seq.models.packed import Linear, linear_fn
from seq2seq.models.step_linear import step_linear

if TYPE_CHECKING:  # the decoder calls these; importing it here would close a circle
    from seq2seq.models.decoder import Decoder


class StepLinears(NamedTuple):
    """The products of a fused decoder step with the RNN's and the attentional layer's
    weights, each ``x -> x W^T (+ b)``: plain ``F.linear`` on the parameters
    (:func:`plain_step_linears`), or packed copies made once for bf16 CPU decoding
    (:func:`packed_step_linears`).

    Attributes:
        emb_gates: the first layer's input gates from the embeddings (``b_ih`` included).
        rest_gates: the first layer's input gates from ``[context (bahdanau); feed]``.
        comb_emb: bahdanau: the attentional layer's ``E y`` block (its bias included).
        comb_rest: bahdanau: its ``[s_t; c_t]`` block (luong calls ``combine`` itself).
        ih: per layer, the input gates from the layer below (``b_ih`` included); None for
            layer 0.
        hh: per layer, the hidden state's share of the gates (``b_hh`` included).
    """

    emb_gates: Linear
    rest_gates: Linear | None
    comb_emb: Linear | None
    comb_rest: Linear | None
    ih: tuple[Linear | None, ...]
    hh: tuple[Linear, ...]


def step_linears(decoder: Decoder) -> StepLinears:
    """The weights :func:`recur` multiplies by: packed ones when the model was packed for
    decoding and no gradient is wanted, else the parameters as they are now."""
    if decoder.packed_linears is not None and not decoder.training \
            and not torch.is_grad_enabled():
        return decoder.packed_linears
    return plain_step_linears(decoder)


def _step_linears(decoder: Decoder, make: Callable[[torch.Tensor, torch.Tensor | None], Linear],
                  per_step: Callable[[torch.Tensor, torch.Tensor | None], Linear]
                  ) -> StepLinears:
    """A :class:`StepLinears` of ``make(weight, bias)`` for each weight block, and of
    ``per_step`` for the slices of a weight that every step multiplies by."""
    rnn, emb_size, combine = decoder.rnn, decoder.embedding.embedding_dim, decoder.combine
    w_ih0 = rnn.weight_ih_l0
    bahdanau = decoder.style == "bahdanau"
    # Column blocks of the first layer's input weight: [emb | context (bahdanau) | feed];
    # bahdanau's h~ = tanh(W [s_t; c_t; E y]): the E y block is known for every step in advance.
    return StepLinears(
        emb_gates=make(w_ih0[:, :emb_size], rnn.bias_ih_l0),
        rest_gates=per_step(w_ih0[:, emb_size:], None) if w_ih0.size(1) > emb_size else None,
        comb_emb=make(combine.weight[:, -emb_size:], combine.bias) if bahdanau else None,
        comb_rest=per_step(combine.weight[:, :-emb_size], None) if bahdanau else None,
        ih=(None,) + tuple(per_step(getattr(rnn, f"weight_ih_l{layer}"),
                                    getattr(rnn, f"bias_ih_l{layer}"))
                           for layer in range(1, rnn.num_layers)),
        hh=tuple(per_step(getattr(rnn, f"weight_hh_l{layer}"),
                          getattr(rnn, f"bias_hh_l{layer}"))
                 for layer in range(rnn.num_layers)))


def plain_step_linears(decoder: Decoder) -> StepLinears:
    """Products with the decoder's parameters as they are now, for one forward pass: the
    embeddings' blocks multiplied once for all steps by :func:`~seq2seq.models.gemm.linear`,
    and the weights every step multiplies by through :func:`~seq2seq.models.step_linear.
    step_linear`, which casts each once under autocast (autocast caches its casts of whole
    parameters only: a slice of one would be cast again at each step, and its gradient cast
    back and summed at each step of the backward) and in bf16 CPU training computes each
    one's gradient as one product over all the steps.
    """
    def make(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        return functools.partial(linear, weight=weight, bias=bias)

    return _step_linears(decoder, make, step_linear)


def packed_step_linears(decoder: Decoder) -> StepLinears:
    """Packed copies of the decoder's bf16 step weights (:mod:`seq2seq.models.packed`)."""
    return _step_linears(decoder, linear_fn, linear_fn)

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
import torch.nn.functional as F

from seq2seq.models.packed import Linear, linear_fn

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


def _weight_blocks(decoder: Decoder) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The weight blocks (and biases) of a fused step, as :class:`StepLinears` names them;
    ``ih_L`` / ``hh_L`` per layer ``L``."""
    rnn, emb_size = decoder.rnn, decoder.embedding.embedding_dim
    w_ih0 = rnn.weight_ih_l0
    # Column blocks of the first layer's input weight: [emb | context (bahdanau) | feed].
    blocks = {"emb_gates": (w_ih0[:, :emb_size], rnn.bias_ih_l0)}
    if w_ih0.size(1) > emb_size:
        blocks["rest_gates"] = (w_ih0[:, emb_size:], None)
    if decoder.style == "bahdanau":
        # h~ = tanh(W [s_t; c_t; E y]): the E y block is known for every step in advance.
        w_comb = decoder.combine.weight
        blocks["comb_emb"] = (w_comb[:, -emb_size:], decoder.combine.bias)
        blocks["comb_rest"] = (w_comb[:, :-emb_size], None)
    for layer in range(rnn.num_layers):
        if layer > 0:
            blocks[f"ih_{layer}"] = (getattr(rnn, f"weight_ih_l{layer}"),
                                     getattr(rnn, f"bias_ih_l{layer}"))
        blocks[f"hh_{layer}"] = (getattr(rnn, f"weight_hh_l{layer}"),
                                 getattr(rnn, f"bias_hh_l{layer}"))
    return blocks


def _step_linears(decoder: Decoder,
                  make: Callable[[str, torch.Tensor, torch.Tensor | None], Linear]
                  ) -> StepLinears:
    """A :class:`StepLinears` of ``make(name, weight, bias)`` for each weight block."""
    blocks = {name: make(name, *weights) for name, weights in _weight_blocks(decoder).items()}
    layers = range(decoder.rnn.num_layers)
    return StepLinears(
        emb_gates=blocks["emb_gates"], rest_gates=blocks.get("rest_gates"),
        comb_emb=blocks.get("comb_emb"), comb_rest=blocks.get("comb_rest"),
        ih=tuple(blocks.get(f"ih_{layer}") for layer in layers),
        hh=tuple(blocks[f"hh_{layer}"] for layer in layers))


def plain_step_linears(decoder: Decoder) -> StepLinears:
    """``F.linear`` on the decoder's parameters. The slices of a weight that every step
    multiplies by are cast once here under autocast (:func:`autocast_once`); autocast casts
    whole parameters once itself, and the embeddings' blocks are multiplied once for all steps.
    """
    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        once = name in ("rest_gates", "comb_rest")
        return functools.partial(F.linear, weight=autocast_once(weight) if once else weight,
                                 bias=bias)

    return _step_linears(decoder, make)


def packed_step_linears(decoder: Decoder) -> StepLinears:
    """Packed copies of the decoder's bf16 step weights (:mod:`seq2seq.models.packed`)."""
    return _step_linears(decoder, lambda name, weight, bias: linear_fn(weight, bias))


def autocast_once(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the autocast dtype where autocast is on, cast here once for every step.

    Autocast caches its casts of parameters only: a slice of one would be cast again at each
    step, and its gradient cast back and summed at each step of the backward.
    """
    device = weight.device.type
    if not torch.is_autocast_enabled(device):
        return weight
    return weight.to(torch.get_autocast_dtype(device))

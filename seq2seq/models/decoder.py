"""The attentional decoder: one recurrent step at a time, or all steps at once when it can.

Two styles share one module:

- "bahdanau" (Bahdanau et al. 2015 §3.1, §A.2.2): attend with the previous top state
  ``s_{t-1}``, feed the context ``c_t`` into the RNN with the embedding, then read out
  ``h~_t = tanh(W [s_t; c_t; E y_{t-1}])``.
- "luong" (Luong et al. 2015 §3): run the RNN first, attend with the new top state ``h_t``,
  then ``h~_t = tanh(W_c [c_t; h_t])``.

Both predict ``softmax(W_s h~_t)`` from the attentional vector ``h~_t`` of size ``dec_hidden``, so
tying ``W_s`` to the target embeddings works whenever ``emb_size == dec_hidden``. With input
feeding (Luong et al. 2015 §3.3) ``h~_{t-1}`` joins the next RNN input.

The decoder state is a tuple of batch-first tensors: ``(h,)`` or ``(h, c)`` for LSTM, each
``(B, L, H)``, then ``(feed,)`` ``(B, H)`` with input feeding. Batch-first lets beam search reorder
any state with ``index_select(0, idx)`` without knowing its layout.

Two implementations compute the same function. The *plain* one (:meth:`Decoder.run`) calls the
``nn.GRU`` / ``nn.LSTM`` module one step at a time; it is the reference, and the path of an
int8 model (:mod:`seq2seq.quantize`), whose RNN and Linear layers are int8 modules. The *fused*
one (:func:`recur`, used when :attr:`Decoder.fused` is True) reads the same parameters
but does the cell arithmetic itself, so that everything not depending on the previous step is
done once for all steps: the embeddings, their share of the first layer's input gates and of the
attentional layer, and the output layer (one ``(B*T, H) x (H, V)`` matmul instead of ``T``, and
no ``(B, T, V)`` concatenation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seq2seq.models.attention import Attention
from seq2seq.models.cells import cell_update, tanh
from seq2seq.models.dropout import Dropout, dropout, word_dropout
from seq2seq.models.encoder import make_rnn, run_rnn
from seq2seq.models.gemm import apply_linear, linear
from seq2seq.models.packed import PackedLinear, pack_weight, packed_linear
from seq2seq.models.step_weights import StepLinears, packed_step_linears, step_linears

State = tuple[torch.Tensor, ...]


class OutputRows(NamedTuple):
    """The output layer restricted to target ids ``ids``: their weight and bias rows, and the
    weight rows packed for oneDNN when the model is (:mod:`seq2seq.models.packed`); for an
    output layer without float weights (int8), ``layer`` computes those rows instead."""

    ids: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None
    layer: nn.Module | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, U)`` logits of the ids from the output layer's input ``(B, H)``."""
        if self.layer is not None:
            return self.layer(hidden)
        if self.packed is not None and not torch.is_grad_enabled():
            return packed_linear(hidden, self.packed, self.bias)
        return linear(hidden, self.weight, self.bias)


class Decoder(nn.Module):
    """Embeddings, RNN, attention, attentional layer and output layer of the target side.

    Args:
        embedding: target embeddings ``(V, E)`` with ``padding_idx`` set.
        cell: "gru", "lstm" or "rnn".
        hidden: decoder hidden size ``H``.
        layers: stacked layers ``L``.
        attention: scores queries of size ``H`` against encoder outputs of size ``He``.
        enc_size: ``He``.
        final_size: ``F``, size of the encoder's ``final`` state fed to the bridge.
        style: "bahdanau" or "luong".
        input_feeding: feed ``h~_{t-1}`` into the RNN.
        init: "bridge" (``tanh(W final)``) or "zeros" for the initial state.
        dropout: on embeddings, between layers and on ``h~_t`` before the output layer.
        tie_output: share the output layer's weight with ``embedding`` (needs ``E == H``).

    Attributes:
        fused: compute with :func:`recur` (True) or with the RNN module, :meth:`run` (False).
        word_dropout: in training, the probability of dropping a whole input token (its
            embedding zeroed, :func:`~seq2seq.models.dropout.word_dropout`); set by
            :func:`~seq2seq.models.seq2seq.build_model` from ``model.word_dropout``.
    """

    fused = True
    word_dropout = 0.0
    packed_linears: StepLinears | None = None  # set by seq2seq.models.packed

    def __init__(self, embedding: nn.Embedding, cell: str, hidden: int, layers: int,
                 attention: Attention, enc_size: int, final_size: int, style: str,
                 input_feeding: bool, init: str, dropout: float, tie_output: bool):
        super().__init__()
        emb_size, vocab = embedding.embedding_dim, embedding.num_embeddings
        self.embedding = embedding
        self.cell, self.hidden, self.layers = cell, hidden, layers
        self.style, self.input_feeding = style, input_feeding
        rnn_input = emb_size + (enc_size if style == "bahdanau" else 0)
        rnn_input += hidden if input_feeding else 0
        self.rnn = make_rnn(cell, rnn_input, hidden, layers, dropout)
        self.attention = attention
        combine_input = hidden + enc_size + (emb_size if style == "bahdanau" else 0)
        self.combine = nn.Linear(combine_input, hidden)
        self.states = 2 if cell == "lstm" else 1
        self.bridge = nn.Linear(final_size, self.states * layers * hidden) \
            if init == "bridge" else None
        self.dropout = Dropout(dropout)
        self.output = nn.Linear(hidden, vocab)
        if tie_output:
            if emb_size != hidden:
                raise ValueError(f"tied output layer needs emb_size ({emb_size}) == "
                                 f"dec_hidden ({hidden})")
            self.output.weight = embedding.weight

    @property
    def parallel(self) -> bool:
        """Whether teacher forcing can run all target steps at once (luong, no input feeding)."""
        return self.style == "luong" and not self.input_feeding

    def init_state(self, final: torch.Tensor) -> State:
        """The state before the first target token.

        Args:
            final: ``(B, F)`` the encoder's final state(s).

        Returns:
            ``(h,)`` / ``(h, c)`` each ``(B, L, H)``, plus ``feed`` ``(B, H)`` of zeros with
            input feeding.
        """
        batch = final.size(0)
        shape = (batch, self.states * self.layers, self.hidden)
        if self.bridge is None:
            init = final.new_zeros(shape)
        else:
            init = tanh(apply_linear(self.bridge, final)).view(shape)
        state = tuple(init.chunk(self.states, dim=1))
        if self.input_feeding:
            state += (final.new_zeros(batch, self.hidden),)
        return state

    def step(self, prev_tokens: torch.Tensor, state: State, enc_out: torch.Tensor,
             keys: torch.Tensor, src_mask: torch.Tensor, rows: OutputRows | None = None
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoder step; no data-dependent control flow, so it can be graph-captured.

        Args:
            prev_tokens: ``(B,)`` the previous target tokens (BOS first).
            state: from :meth:`init_state` or the previous step.
            enc_out: ``(B, S, He)``; keys: ``(B, S, A)``; src_mask: ``(B, S)`` bool (or
                ``n`` rows for ``B = n * K``: see :meth:`Attention.forward`).
            rows: the output layer restricted to some target ids (:meth:`output_rows`), or
                None for every id.

        Returns:
            logits ``(B, V)`` (``(B, U)`` with rows), the new state, attention ``(B, S)``.
        """
        if not self.fused:
            out, state, attn = self.run(prev_tokens.unsqueeze(1), state, enc_out, keys,
                                        src_mask, features=rows is not None)
            out = out.squeeze(1)  # logits, or with rows the output layer's input
            return (out if rows is None else rows.logits(out)), state, attn.squeeze(1)
        emb = self._embed(prev_tokens.unsqueeze(1))
        att_vecs, state, attn = recur(self, emb, state, enc_out, keys, src_mask)
        hidden = self.dropout(att_vecs[:, 0])
        if rows is None:
            return apply_linear(self.output, hidden), state, attn
        return rows.logits(hidden), state, attn

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``tokens`` ``(B, T)`` with word dropout, then dropout: ``(B, T, E)``."""
        emb = word_dropout(self.embedding(tokens), self.word_dropout, self.training)
        return self.dropout(emb)

    def output_rows(self, ids: torch.Tensor) -> OutputRows:
        """The output layer's rows for target ids ``ids`` (a shortlist), copied once so that
        every step multiplies by ``(U, H)`` instead of ``(V, H)``; an int8 output layer
        (:class:`~seq2seq.quantize.Int8Linear`) is restricted by its ``select``."""
        weight = getattr(self.output, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return OutputRows(ids, None, None, layer=self.output.select(ids))
        bias = self.output.bias
        rows = weight.index_select(0, ids)
        return OutputRows(ids, rows, None if bias is None else bias.index_select(0, ids),
                          pack_weight(rows) if isinstance(self.output, PackedLinear) else None)

    def forward(self, trg_in: torch.Tensor, state: State, enc_out: torch.Tensor,
                keys: torch.Tensor, src_mask: torch.Tensor, features: bool = False
                ) -> torch.Tensor:
        """Teacher forcing over a whole target.

        Args:
            trg_in: ``(B, T)`` BOS followed by the target tokens, padded on the right.
            state, enc_out, keys, src_mask: as in :meth:`step`.
            features: return the output layer's inputs (``h~`` after dropout) instead of its
                outputs, for a loss fused with the output layer.

        Returns:
            logits: ``(B, T, V)`` (features: ``(B, T, H)``).
        """
        if self.parallel:
            # Without input feeding the luong RNN does not depend on attention: one cuDNN
            # call runs all T steps, then one batched attention covers every step.
            return self.run(trg_in, state, enc_out, keys, src_mask, features)[0]
        if self.fused:
            emb = self._embed(trg_in)  # (B, T, E), every step at once
            att_vecs = self.dropout(recur(self, emb, state, enc_out, keys, src_mask)[0])
            return att_vecs if features else apply_linear(self.output, att_vecs)
        logits = []
        for t in range(trg_in.size(1)):
            step_logits, state, _ = self.run(trg_in[:, t:t + 1], state, enc_out, keys,
                                             src_mask, features)
            logits.append(step_logits)
        return torch.cat(logits, dim=1)

    def run(self, tokens: torch.Tensor, state: State, enc_out: torch.Tensor,
            keys: torch.Tensor, src_mask: torch.Tensor, features: bool = False
            ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """``T`` steps given all their input tokens; ``T`` must be 1 unless :attr:`parallel`.

        Returns:
            logits ``(B, T, V)`` (features: ``h~`` after dropout, ``(B, T, H)``), the new
            state, attention weights ``(B, T, S)``.
        """
        emb = self._embed(tokens)  # (B, T, E)
        dtype = self.embedding.weight.dtype  # the state may come from autocast layers
        hx = tuple(s.transpose(0, 1).to(dtype).contiguous()
                   for s in state[:self.states])  # (L, B, H)
        rnn_hx = hx if self.cell == "lstm" else hx[0]
        feed = [state[-1].unsqueeze(1)] if self.input_feeding else []
        if self.style == "bahdanau":
            query = hx[0][-1].unsqueeze(1)  # previous top state s_{t-1}: (B, 1, H)
            context, attn = self.attention(query, keys, enc_out, src_mask)
            out, rnn_hx = self._rnn(torch.cat([emb, context] + feed, dim=-1), rnn_hx,
                                    tokens)
            readout = [out, context, emb]
        else:
            out, rnn_hx = self._rnn(torch.cat([emb] + feed, dim=-1), rnn_hx, tokens)
            context, attn = self.attention(out, keys, enc_out, src_mask)
            readout = [context, out]
        att_vec = tanh(apply_linear(self.combine, torch.cat(readout, dim=-1)))  # h~
        att_vec_out = self.dropout(att_vec)
        logits = att_vec_out if features else apply_linear(self.output, att_vec_out)
        hx = rnn_hx if self.cell == "lstm" else (rnn_hx,)
        new_state = tuple(h.transpose(0, 1) for h in hx)
        if self.input_feeding:
            new_state += (att_vec[:, -1],)
        return logits, new_state, attn

    def _rnn(self, x: torch.Tensor, hx: torch.Tensor | tuple[torch.Tensor, ...],
             tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...]]:
        """The RNN on ``x`` in the embeddings' dtype (a quantised RNN has no float weights), in
        bf16 under CPU bf16 autocast (:func:`~seq2seq.models.encoder.run_rnn`); an int8 RNN
        with an embedding table (:class:`seq2seq.quantize.Int8RNN`) also gets ``tokens``."""
        x = x.to(self.embedding.weight.dtype)
        if getattr(self.rnn, "token_gates", None) is not None:
            return self.rnn(x, hx, tokens)
        return run_rnn(self.rnn, x, hx)

    def pack_steps(self) -> None:
        """Pack the fused step's bf16 weight blocks (see :mod:`seq2seq.models.packed`)."""
        self.packed_linears = packed_step_linears(self)


def recur(decoder: Decoder, emb: torch.Tensor, state: State, enc_out: torch.Tensor,
          keys: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, State, torch.Tensor]:
    """The fused path: ``T`` steps of RNN, attention and attentional layer, given all inputs.

    Computes what :meth:`Decoder.run` computes step by step, minus the output layer, with the
    parameters of ``decoder.rnn`` and ``decoder.combine``. Whatever depends only on the target
    embeddings is computed once for all ``T`` steps before the loop.

    Args:
        decoder: the decoder whose modules and settings are used.
        emb: ``(B, T, E)`` target embeddings (dropout applied).
        state, enc_out, keys, src_mask: as in :meth:`Decoder.step`.

    Returns:
        attentional vectors ``h~`` ``(B, T, H)`` (before output dropout), the state after
        step ``T``, attention weights ``(B, S)`` of step ``T``.
    """
    lin = step_linears(decoder)
    emb_gates = lin.emb_gates(emb)  # (B, T, G)
    if decoder.style == "bahdanau":
        emb_comb = lin.comb_emb(emb)  # (B, T, H)
    # unbind, not [:, t] in the loop: the backward of T slices would write T zero-filled
    # (B, T, G) gradients, the backward of one unbind stacks T slices once.
    emb_gates = emb_gates.unbind(1)
    if decoder.style == "bahdanau":
        emb_comb = emb_comb.unbind(1)
    hs = list(state[0].unbind(1))  # each (B, H)
    cs = list(state[1].unbind(1)) if decoder.cell == "lstm" else None
    feed = state[-1]  # read only with input feeding
    attend = decoder.attention.over_steps(keys, enc_out)
    att_vecs = []
    for t in range(emb.size(1)):
        if decoder.style == "bahdanau":
            context, attn = attend(hs[-1].unsqueeze(1), src_mask)
            context = context.squeeze(1)
            extra = [context]
        else:
            extra = []
        if decoder.input_feeding:
            extra.append(feed)
        gates = emb_gates[t]
        if extra:  # one tensor is used as it is: a copy, and in backward a slice, saved
            gates = gates + lin.rest_gates(extra[0] if len(extra) == 1
                                           else torch.cat(extra, dim=-1))
        out = stacked_step(decoder.rnn, decoder.cell, gates, hs, cs, decoder.training, lin)
        if decoder.style == "bahdanau":
            att_vec = tanh(emb_comb[t] + lin.comb_rest(torch.cat([out, context], -1)))
        else:
            context, attn = attend(out.unsqueeze(1), src_mask)
            att_vec = tanh(apply_linear(decoder.combine,
                                        torch.cat([context.squeeze(1), out], -1)))
        att_vecs.append(att_vec)
        feed = att_vec
    new_state = (torch.stack(hs, dim=1),)
    if cs is not None:
        new_state += (torch.stack(cs, dim=1),)
    if decoder.input_feeding:
        new_state += (feed,)
    return torch.stack(att_vecs, dim=1), new_state, attn.squeeze(1)


def stacked_step(rnn: nn.RNNBase, cell: str, gates: torch.Tensor, hs: list[torch.Tensor],
                 cs: list[torch.Tensor] | None, training: bool, lin: StepLinears
                 ) -> torch.Tensor:
    """One step of the stacked RNN given the first layer's input gates; updates ``hs`` and
    ``cs`` (LSTM) in place and returns the top layer's new state ``(B, H)``.

    The cell equations and gate order are torch's (``nn.GRU``: r, z, n; ``nn.LSTM``: i, f,
    g, o), so the module's parameters mean the same in both paths.

    Args:
        rnn: the decoder's ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (its layers and dropout).
        cell: "gru", "lstm" or "rnn".
        gates: ``(B, G)`` the first layer's input gates.
        hs, cs: per layer, the hidden (and LSTM cell) states ``(B, H)``.
        training: apply the dropout between layers.
        lin: the products with the RNN's weights (:func:`step_linears`).
    """
    x = None
    for layer in range(rnn.num_layers):
        if layer > 0:
            # nn.GRU's dropout between layers (only in training, as the module does).
            x = dropout(x, rnn.dropout, training)
            gates = lin.ih[layer](x)
        h, c = cell_update(cell, gates, lin.hh[layer](hs[layer]), hs[layer],
                           None if cs is None else cs[layer])
        if cs is not None:
            cs[layer] = c
        hs[layer] = x = h
    return x

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
"""

from __future__ import annotations

import torch
from torch import nn

from seq2seq.models.attention import Attention
from seq2seq.models.encoder import make_rnn

State = tuple[torch.Tensor, ...]


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
    """

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
        self.dropout = nn.Dropout(dropout)
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
            init = torch.tanh(self.bridge(final)).view(shape)
        state = tuple(init.chunk(self.states, dim=1))
        if self.input_feeding:
            state += (final.new_zeros(batch, self.hidden),)
        return state

    def step(self, prev_tokens: torch.Tensor, state: State, enc_out: torch.Tensor,
             keys: torch.Tensor, src_mask: torch.Tensor
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoder step; no data-dependent control flow, so it can be graph-captured.

        Args:
            prev_tokens: ``(B,)`` the previous target tokens (BOS first).
            state: from :meth:`init_state` or the previous step.
            enc_out: ``(B, S, He)``; keys: ``(B, S, A)``; src_mask: ``(B, S)`` bool.

        Returns:
            logits ``(B, V)``, the new state, attention weights ``(B, S)``.
        """
        logits, state, attn = self.run(prev_tokens.unsqueeze(1), state, enc_out, keys,
                                       src_mask)
        return logits.squeeze(1), state, attn.squeeze(1)

    def forward(self, trg_in: torch.Tensor, state: State, enc_out: torch.Tensor,
                keys: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing over a whole target.

        Args:
            trg_in: ``(B, T)`` BOS followed by the target tokens, padded on the right.
            state, enc_out, keys, src_mask: as in :meth:`step`.

        Returns:
            logits: ``(B, T, V)``.
        """
        if self.parallel:
            # Without input feeding the luong RNN does not depend on attention: one cuDNN
            # call runs all T steps, then one batched attention covers every step.
            return self.run(trg_in, state, enc_out, keys, src_mask)[0]
        logits = []
        for t in range(trg_in.size(1)):
            step_logits, state, _ = self.run(trg_in[:, t:t + 1], state, enc_out, keys,
                                             src_mask)
            logits.append(step_logits)
        return torch.cat(logits, dim=1)

    def run(self, tokens: torch.Tensor, state: State, enc_out: torch.Tensor,
            keys: torch.Tensor, src_mask: torch.Tensor
            ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """``T`` steps given all their input tokens; ``T`` must be 1 unless :attr:`parallel`.

        Returns:
            logits ``(B, T, V)``, the new state, attention weights ``(B, T, S)``.
        """
        emb = self.dropout(self.embedding(tokens))  # (B, T, E)
        hx = tuple(s.transpose(0, 1).contiguous() for s in state[:self.states])  # (L, B, H)
        rnn_hx = hx if self.cell == "lstm" else hx[0]
        feed = [state[-1].unsqueeze(1)] if self.input_feeding else []
        if self.style == "bahdanau":
            query = hx[0][-1].unsqueeze(1)  # previous top state s_{t-1}: (B, 1, H)
            context, attn = self.attention(query, keys, enc_out, src_mask)
            out, rnn_hx = self.rnn(torch.cat([emb, context] + feed, dim=-1), rnn_hx)
            readout = [out, context, emb]
        else:
            out, rnn_hx = self.rnn(torch.cat([emb] + feed, dim=-1), rnn_hx)
            context, attn = self.attention(out, keys, enc_out, src_mask)
            readout = [context, out]
        att_vec = torch.tanh(self.combine(torch.cat(readout, dim=-1)))  # h~: (B, T, H)
        logits = self.output(self.dropout(att_vec))
        hx = rnn_hx if self.cell == "lstm" else (rnn_hx,)
        new_state = tuple(h.transpose(0, 1) for h in hx)
        if self.input_feeding:
            new_state += (att_vec[:, -1],)
        return logits, new_state, attn

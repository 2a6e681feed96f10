"""The source encoder: embeddings and a (bi)directional GRU / LSTM / tanh RNN over packed input.

Bahdanau et al. 2015 §3.2 read the source with a bidirectional RNN so that each annotation
``enc_out[:, j]`` summarises the words around position ``j``; Luong et al. 2015 §3 stack
unidirectional LSTMs. Both are one :class:`Encoder` with different settings.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def make_rnn(cell: str, input_size: int, hidden: int, layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    """A batch-first ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (tanh) with dropout between layers.

    Args:
        cell: "gru", "lstm" or "rnn".
        input_size: features of each input step.
        hidden: hidden size per direction.
        layers: stacked layers.
        dropout: dropout between layers (ignored for one layer, where torch would warn).
        bidirectional: also run right to left.
    """
    return RNN_CLASSES[cell](input_size, hidden, num_layers=layers, batch_first=True,
                             dropout=dropout if layers > 1 else 0.0,
                             bidirectional=bidirectional)


class Encoder(nn.Module):
    """Embeds the source and runs a stacked, optionally bidirectional RNN over it.

    Args:
        embedding: source embeddings ``(V_src, E)`` with ``padding_idx`` set (may be shared
            with the decoder when all embeddings are tied).
        cell: "gru", "lstm" or "rnn".
        hidden: hidden size per direction ``H``.
        layers: stacked layers ``L``.
        bidirectional: two directions, so ``He = 2H``; else ``He = H``.
        dropout: on the embeddings, between layers and on the outputs.
    """

    def __init__(self, embedding: nn.Embedding, cell: str, hidden: int, layers: int,
                 bidirectional: bool, dropout: float):
        super().__init__()
        self.embedding = embedding
        self.cell = cell
        self.directions = 2 if bidirectional else 1
        self.rnn = make_rnn(cell, embedding.embedding_dim, hidden, layers, dropout,
                            bidirectional)
        self.dropout = nn.Dropout(dropout)

    @property
    def output_size(self) -> int:
        """``He``: features of each ``enc_out`` position (both directions)."""
        return self.rnn.hidden_size * self.directions

    @property
    def final_size(self) -> int:
        """``F``: features of ``final`` (top layer, both directions; ``[h; c]`` for LSTM)."""
        return self.output_size * (2 if self.cell == "lstm" else 1)

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        Args:
            src: ``(B, S)`` token ids, padded with PAD on the right.
            src_lens: ``(B,)`` real lengths, each >= 1.

        Returns:
            enc_out: ``(B, S, He)``, exactly zero on padding positions (before dropout).
            final: ``(B, F)`` the top layer's final state of each direction (the forward
                direction at the last real token, the backward one at the first), with the
                LSTM cell state concatenated after the hidden state.
        """
        emb = self.dropout(self.embedding(src))
        # Packing skips the padding, so a sentence's states do not depend on how long its
        # batch mates are, the backward direction starts at its real last token, and cuDNN
        # runs the variable-length kernel. Packing needs the lengths on the host (one sync).
        packed = pack_padded_sequence(emb, src_lens.cpu(), batch_first=True,
                                      enforce_sorted=False)
        packed_out, hx = self.rnn(packed)
        enc_out, _ = pad_packed_sequence(packed_out, batch_first=True,
                                         total_length=src.size(1))
        states = hx if self.cell == "lstm" else (hx,)
        final = torch.cat([self._top_layer(state) for state in states], dim=-1)
        return self.dropout(enc_out), final

    def _top_layer(self, state: torch.Tensor) -> torch.Tensor:
        """``(L * D, B, H)`` final states -> ``(B, D * H)`` of the top layer, directions joined."""
        top = state[-self.directions:]  # torch orders layer-major, direction-minor
        return top.transpose(0, 1).reshape(state.size(1), -1)

"""The source encoder: embeddings and a (bi)directional GRU / LSTM / tanh RNN over packed input.

Bahdanau et al. 2015 §3.2 read the source with a bidirectional RNN so that each annotation
``enc_out[:, j]`` summarises the words around position ``j``; Luong et al. 2015 §3 stack
unidirectional LSTMs. Both are one :class:`Encoder` with different settings.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from seq2seq.models.cells import layer_weights, packed_rnn, padded, steps_packed
from seq2seq.models.dropout import Dropout, dropout, word_dropout
from seq2seq.models.gemm import linear

RNN_CLASSES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def full_precision(device_type: str) -> torch.autocast:
    """Autocast off, for the RNN calls (their inputs cast by the caller, see :func:`rnn_dtype`).

    Under autocast, torch runs cuDNN RNNs in fp16 whatever the autocast dtype, so a bf16 run
    (which has no loss scaler) would push small gradients through fp16 and lose them; and on a
    CPU, autocast runs LSTM and tanh-RNN in bf16 but leaves GRU in fp32. The Linear layers
    around the RNNs keep autocast.
    """
    return torch.autocast(device_type, enabled=False)


def rnn_dtype(device_type: str) -> torch.dtype | None:
    """bf16 when CPU autocast computes in bf16 (the RNNs then run in bf16 too, on weights
    cast for the call), else None: the RNN runs in its weights' dtype."""
    if (device_type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return torch.bfloat16
    return None


def run_rnn(rnn: nn.RNNBase, x: torch.Tensor | PackedSequence, hx: Any = None) -> Any:
    """``rnn(x, hx)`` with autocast off, in bf16 under CPU bf16 autocast (:func:`rnn_dtype`).

    In bf16 the module runs on a bf16 copy of its weights (``functional_call``), so the fp32
    parameters stay the master copy and receive fp32 gradients through the cast. Otherwise
    the call is the module's own, on inputs in its weights' dtype.
    """
    device_type = (x.data if isinstance(x, PackedSequence) else x).device.type
    dtype = rnn_dtype(device_type)
    with full_precision(device_type):
        if dtype is None:
            return rnn(x, hx)
        weights = {name: p.to(dtype) for name, p in rnn.named_parameters()}
        x = x._replace(data=x.data.to(dtype)) if isinstance(x, PackedSequence) else x.to(dtype)
        if hx is not None:
            hx = tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)
        return functional_call(rnn, weights, (x, hx))


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

    Attributes:
        packed: run the RNN over packed sequences (the default). False selects a path with no
            host synchronisation and no data-dependent shapes, for CUDA-graph capture; it
            gives the same results (see :meth:`_unpacked`).
        word_dropout: in training, the probability of dropping a whole source token (set
            from ``model.word_dropout``, as the decoder's).
    """

    packed = True
    word_dropout = 0.0

    def __init__(self, embedding: nn.Embedding, cell: str, hidden: int, layers: int,
                 bidirectional: bool, dropout: float):
        super().__init__()
        self.embedding = embedding
        self.cell = cell
        self.directions = 2 if bidirectional else 1
        self.rnn = make_rnn(cell, embedding.embedding_dim, hidden, layers, dropout,
                            bidirectional)
        self.dropout = Dropout(dropout)

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
        emb = self.embedding(src)
        emb = self.dropout(word_dropout(emb, self.word_dropout, self.training))
        if not self.packed:
            enc_out, final = self._unpacked(emb, src_lens)
            return self.dropout(enc_out), final
        # Packing skips the padding, so a sentence's states do not depend on how long its
        # batch mates are, the backward direction starts at its real last token, and cuDNN
        # runs the variable-length kernel. Packing needs the lengths on the host (one sync).
        # emb has the weights' dtype: autocast leaves embeddings alone.
        packed = pack_padded_sequence(emb, src_lens.cpu(), batch_first=True,
                                      enforce_sorted=False)
        if (emb.device.type == "cpu" and torch.is_grad_enabled() and self.training
                and steps_packed(self.rnn)):
            # Training on a CPU: the backward of torch's packed kernel and of its unpacking
            # fill and clone whole-sequence tensors step by step (seq2seq.models.cells);
            # without gradients torch's own calls are the faster ones.
            dtype = rnn_dtype("cpu")  # before autocast is turned off for the call
            with full_precision("cpu"):
                packed_out, hx = packed_rnn(self.rnn, packed, dtype)
            enc_out = padded(packed_out, src.size(1))
        else:
            packed_out, hx = run_rnn(self.rnn, packed)
            enc_out, _ = pad_packed_sequence(packed_out, batch_first=True,
                                             total_length=src.size(1))
        states = hx if self.cell == "lstm" else (hx,)
        final = torch.cat([self._top_layer(state) for state in states], dim=-1)
        return self.dropout(enc_out), final

    def _top_layer(self, state: torch.Tensor) -> torch.Tensor:
        """``(L * D, B, H)`` final states -> ``(B, D * H)`` of the top layer, directions joined."""
        top = state[-self.directions:]  # torch orders layer-major, direction-minor
        return top.transpose(0, 1).reshape(state.size(1), -1)

    def _unpacked(self, emb: torch.Tensor, src_lens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the packed path computes, layer by layer and direction by direction.

        The forward direction runs over the padded batch as it is: padding comes after the
        real tokens, so it cannot reach their states. The backward direction runs over each
        sentence reversed within its length (padding stays at the end), and its outputs are
        reversed back. GRU and tanh-RNN final states are outputs, read at the last real step;
        an LSTM's final cell state is not, so LSTM layers run as a step loop that holds each
        state still on padding (:func:`_masked_lstm`).

        Args:
            emb: ``(B, S, E)`` embedded source (dropout applied); src_lens: ``(B,)``.

        Returns:
            enc_out ``(B, S, He)`` (zero on padding), final ``(B, F)``: as :meth:`forward`.
        """
        rnn = self.rnn
        # x keeps the weights' dtype throughout (bf16 copies of them under CPU bf16 autocast):
        # autocast leaves embeddings alone, and every RNN call below runs with it off.
        steps = emb.size(1)
        positions = torch.arange(steps, device=emb.device)
        lens = src_lens.unsqueeze(1)
        real = positions < lens  # (B, S)
        # Reverses each sentence within its length and leaves padding in place; its own inverse.
        reverse = torch.where(real, lens - 1 - positions, positions)
        last = (src_lens - 1).view(-1, 1, 1).expand(-1, 1, rnn.hidden_size)
        dtype = rnn_dtype(emb.device.type)  # bf16 under CPU bf16 autocast, as run_rnn
        x = emb if dtype is None else emb.to(dtype)
        for layer in range(rnn.num_layers):
            if layer > 0:
                x = dropout(x, rnn.dropout, self.training)
            outputs, finals_h, finals_c = [], [], []
            for direction in range(self.directions):
                weights = layer_weights(rnn, layer, direction, dtype)
                inputs = _gather_steps(x, reverse) if direction else x
                if self.cell == "lstm":
                    with full_precision(inputs.device.type):  # as the other RNN calls
                        out, h, c = _masked_lstm(inputs, real, *weights)
                    finals_c.append(c)
                else:
                    out = self._one_layer(inputs, weights)
                    h = out.gather(1, last).squeeze(1)  # each direction ends at step len - 1
                finals_h.append(h)
                outputs.append(_gather_steps(out, reverse) if direction else out)
            x = torch.cat(outputs, dim=-1)
        enc_out = x.masked_fill(~real.unsqueeze(-1), 0.0)
        return enc_out, torch.cat(finals_h + finals_c, dim=-1)

    def _one_layer(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """One layer and direction of this GRU / tanh RNN over ``x`` ``(B, S, I)``, from zeros.

        Calls the op that ``nn.GRU`` / ``nn.RNN`` call, with the module's own weight tensors;
        not the module with swapped weights: on a GPU the module re-flattens whatever weights it
        is given into a new buffer and points them there, which would move the real parameters
        on every call (and, inside a graph capture, into memory only the graph writes).
        """
        h0 = x.new_zeros(1, x.size(0), self.rnn.hidden_size)
        run = torch.gru if self.cell == "gru" else torch.rnn_tanh
        with warnings.catch_warnings(), full_precision(x.device.type):
            # cuDNN copies weights that are not one flat buffer: cheap here and, under CUDA
            # graphs, recorded once.
            warnings.filterwarnings("ignore", message="RNN module weights")
            out, _ = run(x, h0, weights, True, 1, 0.0, self.training, False, True)
        return out


def _masked_lstm(x: torch.Tensor, real: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                 b_ih: torch.Tensor, b_hh: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer and direction, step by step, holding the state still on padding.

    The equations and gate order (i, f, g, o) are ``nn.LSTM``'s.

    Args:
        x: ``(B, S, I)`` inputs, padding after the real steps; real: ``(B, S)`` bool.

    Returns:
        outputs ``(B, S, H)``, and the hidden and cell states after the last real step,
        each ``(B, H)``.
    """
    batch, hidden = x.size(0), w_hh.size(1)
    gates_x = linear(x, w_ih, b_ih).unbind(1)  # every step's input part at once
    keep = real.unsqueeze(-1).unbind(1)
    h = c = x.new_zeros(batch, hidden)
    outputs = []
    for t, gates in enumerate(gates_x):
        i, f, g, o = (gates + linear(h, w_hh, b_hh)).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        h, c = torch.where(keep[t], h_new, h), torch.where(keep[t], c_new, c)
        outputs.append(h_new)
    return torch.stack(outputs, dim=1), h, c


def _gather_steps(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, order[b, t]]`` for every ``b, t``: ``(B, S, H)`` reordered along time."""
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.size(-1)))

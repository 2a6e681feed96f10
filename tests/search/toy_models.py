"""Small models with the search interface, for search tests only.

``ToyModel``: a random attentional GRU, peaked enough that search decisions are not near-ties.
``BigramModel``: next-token log-probabilities read from a table indexed by the previous token,
so a test can write down exactly the distribution search sees.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seq2seq.search import BOS, EOS, PAD


class ToyEncoding(NamedTuple):
    """enc_out ``(B, S, H)``, src_mask ``(B, S)`` bool, final ``(B, H)``."""

    enc_out: torch.Tensor
    src_mask: torch.Tensor
    final: torch.Tensor


def resize_source(enc: ToyEncoding, length: int) -> ToyEncoding:
    """``enc`` with ``length`` source positions, padding added (masked out) or cut (the search
    interface's ``resize_source``)."""
    short = length - enc.enc_out.size(1)
    if short < 0:
        return ToyEncoding(enc.enc_out[:, :length], enc.src_mask[:, :length], enc.final)
    return ToyEncoding(nn.functional.pad(enc.enc_out, (0, 0, 0, short)),
                       nn.functional.pad(enc.src_mask, (0, short), value=False), enc.final)


def per_row(enc: ToyEncoding, rows: int) -> ToyEncoding:
    """``enc`` with one row per decoder row: beam search passes one row per sentence for the
    ``K`` rows of its beams (see ``seq2seq.search.beam``)."""
    group = rows // enc.enc_out.size(0)
    return enc if group == 1 else ToyEncoding(*(t.repeat_interleave(group, 0) for t in enc))


def teacher_forced_score(model: nn.Module, src: torch.Tensor, src_lens: torch.Tensor,
                         trg_in: torch.Tensor, trg_out: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sum of ``log p(trg_out[t] | trg_in[:t+1])`` by calling ``step``, PAD excluded."""
    enc = model.encode(src, src_lens)
    state = model.init_state(enc)
    total = torch.zeros(src.size(0))
    for t in range(trg_in.size(1)):
        log_probs, state, _ = model.step(trg_in[:, t], state, enc)
        token = log_probs.gather(1, trg_out[:, t:t + 1]).squeeze(1)
        total += token.masked_fill(trg_out[:, t] == PAD, 0.0)
    return total


class ToyModel(nn.Module):
    """A one-layer GRU decoder with dot attention over embedded source tokens."""

    def __init__(self, vocab_size: int = 32, hidden: int = 16, eos_bias: float = 0.0,
                 seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.src_emb = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.trg_emb = nn.Embedding(vocab_size, hidden)
        self.cell = nn.GRUCell(hidden, hidden)
        self.bridge = nn.Linear(hidden, hidden)
        self.out = nn.Linear(2 * hidden, vocab_size)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
            self.src_emb.weight[PAD].zero_()
            self.out.bias[EOS] += eos_bias
        self.eval()

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> ToyEncoding:
        src_mask = torch.arange(src.size(1)).unsqueeze(0) < src_lens.unsqueeze(1)
        enc_out = torch.tanh(self.src_emb(src))
        final = (enc_out * src_mask.unsqueeze(2)).sum(1) / src_lens.unsqueeze(1)
        return ToyEncoding(enc_out, src_mask, final)

    def init_state(self, enc: ToyEncoding) -> tuple[torch.Tensor]:
        return (torch.tanh(self.bridge(enc.final)),)

    def resize_source(self, enc: ToyEncoding, length: int) -> ToyEncoding:
        return resize_source(enc, length)

    def step(self, prev_tokens: torch.Tensor, state: tuple[torch.Tensor], enc: ToyEncoding
             ) -> tuple[torch.Tensor, tuple[torch.Tensor], torch.Tensor]:
        enc = per_row(enc, prev_tokens.size(0))
        hidden = self.cell(self.trg_emb(prev_tokens), state[0])
        energy = torch.bmm(enc.enc_out, hidden.unsqueeze(2)).squeeze(2)
        attn = torch.softmax(energy.masked_fill(~enc.src_mask, float("-inf")), dim=1)
        context = torch.bmm(attn.unsqueeze(1), enc.enc_out).squeeze(1)
        logits = self.out(torch.cat([hidden, context], dim=1))
        return torch.log_softmax(logits, dim=-1), (hidden,), attn

    def score(self, src, src_lens, trg_in, trg_out) -> torch.Tensor:
        return teacher_forced_score(self, src, src_lens, trg_in, trg_out)


class BigramModel(nn.Module):
    """``p(y_t | y_<t, x) = table[y_{t-1}]``: the source only sets the attention mask.

    Args:
        probs: ``(V, V)`` rows of next-token probabilities (normalised here; zeros get 1e-6).
    """

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        probs = probs.float() + 1e-6
        self.register_buffer("table", (probs / probs.sum(1, keepdim=True)).log())

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> ToyEncoding:
        src_mask = torch.arange(src.size(1)).unsqueeze(0) < src_lens.unsqueeze(1)
        return ToyEncoding(src_mask.unsqueeze(2).float(), src_mask, src_lens.float().unsqueeze(1))

    def init_state(self, enc: ToyEncoding) -> tuple[torch.Tensor]:
        return (enc.final,)

    def resize_source(self, enc: ToyEncoding, length: int) -> ToyEncoding:
        return resize_source(enc, length)

    def step(self, prev_tokens, state, enc):
        enc = per_row(enc, prev_tokens.size(0))
        attn = enc.src_mask.float() / enc.src_mask.sum(1, keepdim=True)
        return self.table[prev_tokens], state, attn

    def score(self, src, src_lens, trg_in, trg_out) -> torch.Tensor:
        return teacher_forced_score(self, src, src_lens, trg_in, trg_out)


def bigram(vocab_size: int, rows: dict[int, dict[int, float]]) -> BigramModel:
    """A :class:`BigramModel` from ``{prev: {next: prob}}``; unlisted rows end at once (EOS)."""
    probs = torch.zeros(vocab_size, vocab_size)
    probs[:, EOS] = 1.0
    for prev, row in rows.items():
        probs[prev].zero_()
        for token, p in row.items():
            probs[prev, token] = p
    return BigramModel(probs)


__all__ = ["BOS", "EOS", "BigramModel", "ToyEncoding", "ToyModel", "bigram",
           "teacher_forced_score"]

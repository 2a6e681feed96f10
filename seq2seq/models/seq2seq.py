"""The encoder-decoder and ``build_model``: the interface training and search rely on.

Search knows only :meth:`Seq2Seq.encode`, :meth:`Seq2Seq.init_state` and :meth:`Seq2Seq.step`;
training knows :meth:`Seq2Seq.forward`. Every tensor in an :class:`EncoderOutput` and in a decoder
state has the batch in dim 0, so beam search reorders both with ``index_select(0, idx)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seq2seq import native
from seq2seq.config import ModelConfig
from seq2seq.models.attention import Attention
from seq2seq.models.decoder import Decoder, OutputRows, State
from seq2seq.models.encoder import Encoder

PAD = 0
INIT_RANGE = 0.1


class EncoderOutput(NamedTuple):
    """What the decoder reads from the source; every tensor is batch-first.

    Attributes:
        enc_out: ``(B, S, He)`` encoder outputs (the attention values).
        keys: ``(B, S, A)`` attention keys, projected once per sentence.
        src_mask: ``(B, S)`` bool, True on real source tokens.
        final: ``(B, F)`` the encoder's final state(s), input of the decoder's bridge.
    """

    enc_out: torch.Tensor
    keys: torch.Tensor
    src_mask: torch.Tensor
    final: torch.Tensor


class Seq2Seq(nn.Module):
    """An attentional RNN encoder-decoder (Bahdanau et al. 2015; Luong et al. 2015).

    Args:
        encoder: the source encoder.
        decoder: the attentional decoder (it owns the attention module).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def num_parameters(self) -> int:
        """Trainable parameters, each shared (tied) tensor counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> EncoderOutput:
        """Encode a padded source batch.

        Args:
            src: ``(B, S)`` token ids padded with PAD.
            src_lens: ``(B,)`` real lengths, each >= 1.
        """
        enc_out, final = self.encoder(src, src_lens)
        keys = self.decoder.attention.project_keys(enc_out)
        return EncoderOutput(enc_out, keys, src != PAD, final)

    def init_state(self, enc: EncoderOutput) -> State:
        """The decoder state before BOS: RNN states ``(B, L, H)`` (+ input feed ``(B, H)``)."""
        return self.decoder.init_state(enc.final)

    def step(self, prev_tokens: torch.Tensor, state: State, enc: EncoderOutput,
             rows: OutputRows | None = None) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoder step.

        Args:
            prev_tokens: ``(B,)`` previous target tokens.
            state: from :meth:`init_state` or the previous step.
            enc: from :meth:`encode`, with ``B`` rows or one row per ``K`` consecutive rows
                (a sentence's ``K`` beams share it, see :meth:`Attention.forward`).
            rows: score only these target ids (from :meth:`output_rows`); None: all.

        Returns:
            log_probs ``(B, V)`` float32 (``(B, U)`` over ``rows.ids``, normalised over them),
            the new state, attention weights ``(B, S)``.
        """
        logits, state, attn = self.decoder.step(prev_tokens, state, enc.enc_out, enc.keys,
                                                enc.src_mask, rows)
        return native.log_softmax(logits), state, attn

    def resize_source(self, enc: EncoderOutput, length: int) -> EncoderOutput:
        """``enc`` with ``length`` source positions, as if its sources had been padded to that
        length: padding is added (masked out; its values, zero, never reach the decoder) or cut
        (only padding: ``length`` is at least the longest source). Beam search uses this when
        longer sentences join a search in progress, and to drop padding the sentences left."""
        short = length - enc.enc_out.size(1)
        if short < 0:  # copied once, so that every later step reads contiguous memory
            return EncoderOutput(enc.enc_out[:, :length].contiguous(),
                                 enc.keys[:, :length].contiguous(),
                                 enc.src_mask[:, :length].contiguous(), enc.final)
        if short == 0:
            return enc
        pad = torch.nn.functional.pad
        return EncoderOutput(pad(enc.enc_out, (0, 0, 0, short)), pad(enc.keys, (0, 0, 0, short)),
                             pad(enc.src_mask, (0, short), value=False), enc.final)

    def output_rows(self, ids: torch.Tensor) -> OutputRows:
        """The output layer restricted to target ids ``ids``, for :meth:`step`."""
        return self.decoder.output_rows(ids)

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, trg_in: torch.Tensor,
                features: bool = False) -> torch.Tensor:
        """Teacher forcing.

        Args:
            src: ``(B, S)``; src_lens: ``(B,)``.
            trg_in: ``(B, T)`` BOS followed by the target, padded with PAD.
            features: return the output layer's inputs ``(B, T, H)`` instead (for
                :func:`seq2seq.training.loss.linear_cross_entropy`).

        Returns:
            logits: ``(B, T, V)``; ``log_softmax`` of step ``t`` equals :meth:`step`'s log_probs.
        """
        enc = self.encode(src, src_lens)
        return self.decoder(trg_in, self.init_state(enc), enc.enc_out, enc.keys, enc.src_mask,
                            features)

    def score(self, src: torch.Tensor, src_lens: torch.Tensor, trg_in: torch.Tensor,
              trg_out: torch.Tensor) -> torch.Tensor:
        """Sum of target-token log-probabilities under teacher forcing.

        Args:
            src: ``(B, S)``; src_lens: ``(B,)``.
            trg_in: ``(B, T)`` BOS + target; trg_out: ``(B, T)`` target + EOS, PAD excluded.

        Returns:
            ``(B,)`` float32 log-probabilities.
        """
        log_probs = torch.log_softmax(self.forward(src, src_lens, trg_in).float(), dim=-1)
        token = log_probs.gather(-1, trg_out.unsqueeze(-1)).squeeze(-1)
        return token.masked_fill(trg_out == PAD, 0.0).sum(dim=1)


def build_model(cfg: ModelConfig, src_vocab: int, trg_vocab: int) -> Seq2Seq:
    """Build the model a recipe describes, initialised from the current torch seed.

    Args:
        cfg: the recipe's model section.
        src_vocab: source vocabulary size.
        trg_vocab: target vocabulary size.

    Raises:
        ValueError: ``tie_embeddings: all`` with different vocabulary sizes, or tying with
            ``emb_size != dec_hidden``.
    """
    if cfg.tie_embeddings == "all" and src_vocab != trg_vocab:
        raise ValueError(f"tie_embeddings 'all' needs one joint vocabulary, got source "
                         f"{src_vocab} and target {trg_vocab}")
    trg_embedding = nn.Embedding(trg_vocab, cfg.emb_size, padding_idx=PAD)
    src_embedding = trg_embedding if cfg.tie_embeddings == "all" else \
        nn.Embedding(src_vocab, cfg.emb_size, padding_idx=PAD)
    encoder = Encoder(src_embedding, cfg.cell, cfg.enc_hidden, cfg.enc_layers,
                      cfg.bidirectional, cfg.dropout)
    attention = Attention(cfg.attention, cfg.dec_hidden, encoder.output_size,
                          cfg.attention_size)
    decoder = Decoder(trg_embedding, cfg.cell, cfg.dec_hidden, cfg.dec_layers, attention,
                      encoder.output_size, encoder.final_size, cfg.decoder, cfg.input_feeding,
                      cfg.init, cfg.dropout, tie_output=cfg.tie_embeddings != "none")
    encoder.word_dropout = decoder.word_dropout = cfg.word_dropout
    model = Seq2Seq(encoder, decoder)
    initialise(model)
    if cfg.forget_bias is not None:
        set_forget_bias(model, cfg.forget_bias)
    return model


def set_forget_bias(model: nn.Module, value: float) -> None:
    """Start every LSTM forget gate at bias ``value`` (Jozefowicz et al. 2015 §2.2): with a
    positive bias the cells remember by default early in training.

    PyTorch keeps the gates in the order (input, forget, cell, output) and adds ``bias_ih`` and
    ``bias_hh``; the forget slice of the first is set and of the second zeroed.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.LSTM):
                continue
            hidden = module.hidden_size
            for name, param in module.named_parameters():
                if name.startswith("bias_ih"):
                    param[hidden:2 * hidden].fill_(value)
                elif name.startswith("bias_hh"):
                    param[hidden:2 * hidden].zero_()


def initialise(model: nn.Module) -> None:
    """Every weight uniform in [-0.1, 0.1] (Sutskever et al. 2014 §3.4; Luong et al. 2015 §4.1),
    then the PAD embedding rows zeroed so padding contributes nothing."""
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-INIT_RANGE, INIT_RANGE)
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()

"""Attention over the encoder outputs: additive (Bahdanau) and multiplicative (Luong).

Every variant splits its score into a part that depends only on the source, the *keys*, which
:meth:`Attention.project_keys` computes once per sentence in ``encode``, and a cheap part per
decoder step. Padding is masked with ``-inf`` before the softmax, so its weights are exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from seq2seq import native
from seq2seq.models.gemm import apply_linear
from seq2seq.models.step_sources import StepSources

Attend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Elements of the additive attention's hidden layer made at once when decoding on a CPU (4 MB
# in fp32): :meth:`Attention._additive_scores`.
CHUNK_ELEMENTS = 1 << 20


class Attention(nn.Module):
    """Scores ``(B, T, S)`` between decoder queries and encoder positions.

    - "bahdanau": ``score(q, h_j) = v^T tanh(W q + U h_j)`` (Bahdanau et al. 2015 §A.1.2); the
      keys are ``2 U h_j`` of size ``attention_size``. It is computed as
      ``2 v^T sigmoid(2 W q + 2 U h_j) - sum(v)``, the same function (``tanh(z) = 2 sigmoid(2z)
      - 1``), because on CPUs torch's sigmoid is several times faster than its tanh, and this
      ``(B, T, S, A)`` element-wise pass was the largest cost of a beam-search step (issue 16).
    - "dot": ``score(q, h_j) = q^T h_j`` (Luong et al. 2015 §3.1); the keys are ``h_j`` and
      ``query_size`` must equal ``value_size``.
    - "general": ``score(q, h_j) = q^T W h_j`` (Luong et al. 2015 §3.1); the keys are ``W h_j``
      of size ``query_size``.

    Args:
        kind: "bahdanau", "dot" or "general".
        query_size: ``Hq``, the decoder state size.
        value_size: ``He``, the encoder output size.
        attention_size: hidden size ``A`` of the additive MLP (ignored by dot / general).
    """

    def __init__(self, kind: str, query_size: int, value_size: int, attention_size: int):
        super().__init__()
        if kind == "dot" and query_size != value_size:
            raise ValueError(f"dot attention needs query size {query_size} == encoder output "
                             f"size {value_size}")
        self.kind = kind
        if kind == "bahdanau":
            self.key_layer = nn.Linear(value_size, attention_size, bias=True)
            self.query_layer = nn.Linear(query_size, attention_size, bias=False)
            self.energy_layer = nn.Linear(attention_size, 1, bias=False)
        elif kind == "general":
            self.key_layer = nn.Linear(value_size, query_size, bias=False)

    def project_keys(self, enc_out: torch.Tensor) -> torch.Tensor:
        """The source-only part of the score, computed once per sentence.

        Args:
            enc_out: ``(B, S, He)``.

        Returns:
            keys: ``(B, S, A)`` with ``A`` = attention_size (bahdanau), ``He`` (dot) or ``Hq``
            (general).
        """
        if self.kind == "dot":
            return enc_out
        keys = apply_linear(self.key_layer, enc_out)
        return 2 * keys if self.kind == "bahdanau" else keys

    def forward(self, query: torch.Tensor, keys: torch.Tensor, enc_out: torch.Tensor,
                src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``T`` queries at once (``T = 1`` for one decoder step).

        The source side may hold one row per ``K`` consecutive query rows (``B = n * K``
        queries against ``n`` sentences: the ``K`` beams of each sentence in beam search). The
        ``K`` queries of a sentence then attend as ``K * T`` queries of one row, so the source
        is never copied ``K`` times and each score is one batched matmul per sentence.

        Args:
            query: ``(B, T, Hq)`` decoder states.
            keys: ``(n, S, A)`` from :meth:`project_keys`, ``n`` dividing ``B``.
            enc_out: ``(n, S, He)`` the values.
            src_mask: ``(n, S)`` bool, True on real source tokens (at least one per row).

        Returns:
            context: ``(B, T, He)`` weighted sums of ``enc_out``.
            weights: ``(B, T, S)`` attention distributions, exactly 0 on padding.
        """
        rows, steps = query.size(0), query.size(1)
        if keys.size(0) == rows:
            return self._attend(query, keys, enc_out, src_mask)
        query = query.reshape(keys.size(0), -1, query.size(-1))  # (n, K * T, Hq)
        context, weights = self._attend(query, keys, enc_out, src_mask)
        return context.reshape(rows, steps, -1), weights.reshape(rows, steps, -1)

    def over_steps(self, keys: torch.Tensor, enc_out: torch.Tensor) -> Attend:
        """``(query, src_mask) -> (context, weights)``: :meth:`forward` for the steps of one
        decoder pass over these keys and values.

        In CPU training, with one source row per query row, their gradients are summed over
        the steps in one place (:class:`~seq2seq.models.step_sources.StepSources`), the same
        values up to the order of the sums; elsewhere each step attends as :meth:`forward`.
        """
        sources = None
        if (keys.device.type == "cpu" and torch.is_grad_enabled()
                and (keys.requires_grad or enc_out.requires_grad)):
            dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                     else keys.dtype)
            sources = StepSources(keys, enc_out, dtype)
            keys, enc_out = sources.keys, sources.values

        def attend(query: torch.Tensor, src_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if sources is None or query.size(0) != keys.size(0):
                return self(query, keys, enc_out, src_mask)
            return self._attend(query, keys, enc_out, src_mask, sources)
        return attend

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, enc_out: torch.Tensor,
                src_mask: torch.Tensor, sources: StepSources | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with one source row per query row; with ``sources``, its products
        by the keys and values are those of :class:`StepSources`."""
        if self.kind == "bahdanau":
            scores = self._additive_scores(2 * apply_linear(self.query_layer, query), keys,
                                           None if sources is None else sources.keys_grad)
        elif sources is not None:
            scores = sources.product(query, "keys")
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~src_mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if sources is not None:
            return sources.product(weights, "values"), weights
        return torch.bmm(weights, enc_out), weights

    def _additive_scores(self, query: torch.Tensor, keys: torch.Tensor,
                         keys_grad: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Bahdanau's ``(B, T, S)`` scores from the projected ``2 W q`` (``(B, T, A)``) and keys.

        The ``(B, T, S, A)`` hidden layer is the one large tensor of a beam-search step. On a
        CPU, outside autograd, it is made for a few sentences at a time (at most
        :data:`CHUNK_ELEMENTS` elements each), so that each piece stays in the cache and comes
        from reused heap: in one piece, a batch of 100 sentences of 36 source tokens in beam 5
        is 37 MB, past glibc's largest mmap threshold (32 MB), so every step mapped it afresh
        and faulted its pages in twice (once for the sum, once for the sigmoid), 23 ms a step
        against 4 ms in pieces (one thread, Zen 5 EPYC). Each score is the same either way:
        every piece computes its rows with the same element-wise ops and products.

        On a CPU, C kernels compute the scores instead, each from the query and key rows in
        the cache, and in training their gradients likewise, without ever making the hidden
        layer (:func:`seq2seq.native.additive_scores`; the same function, rounded once). The
        code below is then left to int8 layers, GPUs and machines without a C compiler.
        """
        if isinstance(self.energy_layer, nn.Linear):  # not an int8 layer
            fused = native.additive_scores(query, keys, self.energy_layer.weight, keys_grad)
            if fused is not None:
                return fused
        # v^T 1 through the layer itself, whatever it stores (an int8 one packs v)
        v_sum = self.energy_layer(query.new_ones(1, query.size(-1))).squeeze()
        per_sentence = query.size(1) * keys.size(1) * keys.size(2)
        step = max(1, CHUNK_ELEMENTS // per_sentence)
        if torch.is_grad_enabled() or query.device.type != "cpu" or step >= query.size(0):
            step = query.size(0)
        # One piece is the tensors themselves, not slices of them: in training, the backward
        # of a slice would zero-fill and copy a whole (B, S, A) gradient at every step.
        pieces = [(query, keys)] if step >= query.size(0) else [
            (query[first:first + step], keys[first:first + step])
            for first in range(0, query.size(0), step)]
        scores = []
        for query_piece, keys_piece in pieces:
            # (b, T, 1, A) + (b, 1, S, A): every query against every key in one broadcast.
            hidden = torch.sigmoid(query_piece.unsqueeze(2) + keys_piece.unsqueeze(1))
            scores.append(apply_linear(self.energy_layer, hidden).squeeze(-1))
        return 2 * (scores[0] if len(scores) == 1 else torch.cat(scores)) - v_sum

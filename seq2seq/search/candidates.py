"""The candidates of a beam step: the best ``2K`` one-token extensions of each sentence's beams,
ranked in a fixed order (see :func:`candidates`)."""

from __future__ import annotations

import torch

RUN = 64  # tokens per run, the unit in which :func:`candidates` narrows the search


def best_first(values: torch.Tensor, count: int) -> torch.Tensor:
    """The columns ``(R, count)`` of the ``count`` largest values of each row of ``values``
    ``(R, W)``, largest first, equal values by lower column.

    ``topk`` leaves the order of equal values to its kernel, and bf16 logits make equal
    log-probabilities common, so the search ranks by a key of its own: the float's bits as an
    integer that orders as the float does, then the column reversed."""
    if values.dtype != torch.float32:  # float64 models (tests): a stable sort
        return values.sort(dim=1, descending=True, stable=True).indices[:, :count]
    bits = (values + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0, its equal
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reversed
    column = torch.arange(values.size(1), device=values.device)
    return (order * 2**32 + (2**32 - 1 - column)).topk(count, dim=1).indices


def candidates(scores: torch.Tensor, log_probs: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``2K`` one-token extensions of each sentence's beams, best first, equal scores
    by lower beam, then lower token (:func:`best_first`).

    Over a large vocabulary they are found in two passes instead of one ranking of the
    ``(n, K * V)`` sums: the largest log-probability of each run of :data:`RUN` tokens of each
    row (one cheap reduction), then the ``2K`` runs of each sentence whose largest value plus
    the beam's score rank first, then the best ``2K`` sums among those runs' tokens. Every one
    of the best ``2K`` sums lies in such a run (with equal values too, since runs rank as their
    tokens do), and each sum is the same addition of the same two numbers, so the candidates
    and their scores are those of one ranking over all sums. A ``topk`` over all sums, and the
    sums themselves, were a quarter of a bf16 beam step at ``V = 7000``.

    Args:
        scores: ``(n, K)`` beam log-probabilities.
        log_probs: ``(n * K, V)`` next-token log-probabilities.

    Returns:
        ``(n, C)`` candidate log-probabilities, the flat beam row each extends and the token it
        adds; ``C = min(2K, K * V)``.
    """
    n, beam_size = scores.shape
    vocab_size = log_probs.size(1)
    num_cands = min(2 * beam_size, beam_size * vocab_size)
    sentence_first_row = torch.arange(n, device=scores.device).unsqueeze(1) * beam_size
    if vocab_size < 4 * RUN:  # few tokens (a short shortlist): one ranking of every sum
        total = (scores.unsqueeze(2) + log_probs.view(n, beam_size, vocab_size)).view(n, -1)
        flat = best_first(total, num_cands)
        return (total.gather(1, flat), sentence_first_row + flat // vocab_size,
                flat % vocab_size)
    full = vocab_size // RUN
    maxima = log_probs[:, :full * RUN].unflatten(1, (full, RUN)).amax(2)  # (N, runs)
    if vocab_size > full * RUN:  # the shorter last run
        maxima = torch.cat([maxima, log_probs[:, full * RUN:].amax(1, keepdim=True)], dim=1)
    runs = maxima.size(1)
    best = best_first((scores.unsqueeze(2) + maxima.view(n, beam_size, runs)).view(n, -1),
                      num_cands).sort(dim=1).values  # (n, C) runs, in row and token order
    rows = sentence_first_row + best // runs  # (n, C) flat rows
    tokens = ((best % runs) * RUN).unsqueeze(2) + torch.arange(RUN, device=scores.device)
    outside = tokens >= vocab_size  # the last run's missing tokens
    tokens = tokens.clamp_(max=vocab_size - 1)  # (n, C, RUN)
    sums = scores.reshape(-1)[rows].unsqueeze(2) + log_probs[rows.unsqueeze(2), tokens]
    sums = sums.masked_fill_(outside, float("-inf")).view(n, -1)
    flat = best_first(sums, num_cands)
    return sums.gather(1, flat), rows.gather(1, flat // RUN), tokens.view(n, -1).gather(1, flat)

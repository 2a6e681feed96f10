"""Ensembles: several models decoded as one, by averaging their next-token probabilities."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class Ensemble(nn.Module):
    """Several models with the same target vocabulary behind the search interface.

    The next-token distribution is the mean of the members' probabilities,
    ``log(mean_m(exp(log_probs_m)))``, as in common NMT toolkits' ensembles (not the mean of
    log-probabilities, which would be a renormalisation-free product of experts). ``enc`` and
    ``state`` are tuples of the members' own, still batch-first, so
    :func:`seq2seq.search.common.reorder` reorders them like a single model's.

    Args:
        models: the members, each with ``encode``, ``init_state`` and ``step``.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> tuple[Any, ...]:
        """Each member's encoder output. src: ``(B, S)``, src_lens: ``(B,)``."""
        return tuple(model.encode(src, src_lens) for model in self.models)

    def init_state(self, enc: tuple[Any, ...]) -> tuple[Any, ...]:
        """Each member's initial decoder state."""
        return tuple(model.init_state(e) for model, e in zip(self.models, enc))

    def resize_source(self, enc: tuple[Any, ...], length: int) -> tuple[Any, ...]:
        """Each member's encoder output with ``length`` source positions (padding added or
        cut)."""
        return tuple(model.resize_source(e, length) for model, e in zip(self.models, enc))

    def output_rows(self, ids: torch.Tensor) -> tuple[Any, ...]:
        """Each member's output layer restricted to target ids ``ids``."""
        return tuple(model.output_rows(ids) for model in self.models)

    def step(self, prev_tokens: torch.Tensor, state: tuple[Any, ...], enc: tuple[Any, ...],
             rows: tuple[Any, ...] | None = None
             ) -> tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]:
        """One decoder step of every member.

        Args:
            prev_tokens: ``(B,)`` previous tokens.
            state: the members' states.
            enc: the members' encoder outputs.
            rows: from :meth:`output_rows` (a shortlist), or None for every target id.

        Returns:
            ``(B, V)`` log of the mean probability, the members' new states, and ``(B, S)``
            mean attention.
        """
        log_probs, states, attns = [], [], []
        for i, (model, s, e) in enumerate(zip(self.models, state, enc)):
            extra = () if rows is None else (rows[i],)  # members without shortlists take 3
            lp, new_state, attn = model.step(prev_tokens, s, e, *extra)
            log_probs.append(lp)
            states.append(new_state)
            attns.append(attn)
        mean_log_probs = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return mean_log_probs, tuple(states), torch.stack(attns).mean(dim=0)

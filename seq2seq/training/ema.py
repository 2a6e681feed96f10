"""An exponential moving average of the weights (``train.ema_decay``).

After every update the average moves towards the trained weights:
``average = decay * average + (1 - decay) * weights`` (Polyak averaging; Marian's
``--exponential-smoothing``). Validation scores the average, and every checkpoint's ``model``
holds it, so best.pt, the step checkpoints, averaged.pt, ``translate`` and ``evaluate`` all use
the average; the trained weights travel beside it as ``trained_model``, which is what a
resumed run continues from. The average is kept in fp32 whatever the training precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class WeightAverage:
    """The running average of ``model``'s floating-point parameters; with decay 0, none (every
    method then leaves the model and its checkpoints as they would be without one)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point() and decay]
        named = dict(model.named_parameters())
        self.params = [named[n] for n in self.names]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one update towards the weights."""
        if self.decay:
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside, the model holds the average (and this object the trained weights)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for param, average in zip(self.params, self.average):
            held = param.detach().clone()
            param.detach().copy_(average)
            average.copy_(held)

    def checkpoint_models(self, model: torch.nn.Module) -> dict[str, Any]:
        """``model`` (the average, for decoding) and ``trained_model`` (to resume from)."""
        trained = model.state_dict()
        if not self.decay:
            return {"model": trained}
        averaged = dict(trained)
        averaged.update({n: a.detach().clone() for n, a in zip(self.names, self.average)})
        return {"model": averaged, "trained_model": trained}

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore the average from a checkpoint written with it (else start it from the
        weights as they are)."""
        with torch.no_grad():  # nothing to do without an average
            for name, param, average in zip(self.names, self.params, self.average):
                average.copy_(checkpoint["model"][name] if "trained_model" in checkpoint
                              else param.detach())


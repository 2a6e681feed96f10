"""Where a run is: the counters a checkpoint restores besides its tensors."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Progress:
    """Where training is: everything besides tensors that a checkpoint must restore."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # steps of the current epoch already done
    best_value: float | None = None
    best_step: int = 0
    bad_validations: int = 0  # for early stopping
    bad_updates: int = 0  # non-finite updates in a row
    skipped_updates: int = 0
    # The best of the scheduled validations alone, which the schedule and patience compare
    # with: the validation a run adds at its end must not change what a longer run decides.
    scheduled_best: float | None = None
    validated_step: int = -1  # the step of the latest validation
    closed_step: int = -1  # the step at which the run's end (last validation, averaging) was done

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        """The progress a checkpoint holds. One written before ``scheduled_best`` compared
        with the best of all validations; one before ``closed_step`` had ended its run, if
        it was at its end."""
        defaults = {"scheduled_best": state.get("best_value"), "closed_step": state.get("step")}
        return cls(**{**defaults, **state})

    def position(self) -> str:
        """Where in the epochs the run is, in words (for the resume message)."""
        if self.epoch_step == 0:
            return f"after epoch {self.epoch}" if self.epoch else "before epoch 1"
        return f"epoch {self.epoch + 1}, {self.epoch_step} updates into it"

    def limit_reached(self, max_steps: int, max_epochs: int, metric: str,
                      patience: int) -> str | None:
        """Why the run is already done (a limit it has reached), or None; checked before
        each epoch, so that a finished run started again makes no update."""
        if max_epochs and self.epoch >= max_epochs:
            return f"reached train.max_epochs={max_epochs}"
        if max_steps and self.step >= max_steps:
            return f"reached train.max_steps={max_steps}"
        if patience and self.bad_validations >= patience:
            return early_stop_reason(metric, patience)
        return None

    def record_validation(self, metric: str, value: float, scheduled: bool,
                          patience: int) -> tuple[bool, bool, str | None]:
        """Note a validation's ``metric``: the best so far, and patience for scheduled ones.

        Returns:
            Whether it improved on the best (a new best.pt), whether it improved on the best
            scheduled one (for the schedule; False when not ``scheduled``), and a reason to
            stop early (or None).
        """
        self.validated_step = self.step
        improved = better(metric, value, self.best_value)
        if improved:
            self.best_value, self.best_step = value, self.step
        if not scheduled:
            return improved, False, None
        progressed = better(metric, value, self.scheduled_best)
        if progressed:
            self.scheduled_best = value
        self.bad_validations = 0 if progressed else self.bad_validations + 1
        if patience and self.bad_validations >= patience:
            return improved, progressed, early_stop_reason(metric, patience)
        return improved, progressed, None

    def epoch_label(self) -> int:
        """The epoch the latest update belongs to (1-based) for logged rows."""
        return self.epoch + (1 if self.epoch_step > 0 or self.epoch == 0 else 0)


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of validation ``metric`` improves on ``best`` (BLEU up, loss down)."""
    if best is None:
        return True
    return value > best if metric == "bleu" else value < best


def early_stop_reason(metric: str, patience: int) -> str:
    return f"early stopping: no {metric} improvement in {patience} validations"

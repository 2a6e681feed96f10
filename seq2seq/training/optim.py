"""The optimizer and the learning-rate schedule of a training run."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from seq2seq.config import Recipe
from seq2seq.training.graphs import fused_adam


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                   static: bool = False) -> torch.optim.Optimizer:
    """Adam / AdamW; ``static``: the fused kernel with a device learning rate (CUDA graphs).

    On a CPU the fused kernel too: torch's default there is a loop of about ten element-wise
    ops per parameter tensor, each a pass over it, where the fused kernel makes one."""
    cfg = recipe.train
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    if static:
        return fused_adam(model, kind, cfg.lr, cfg.betas, cfg.weight_decay, device)
    return kind(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                fused=True if device.type == "cpu" else None)


@dataclasses.dataclass
class Schedule:
    """Learning rate = lr * warmup * (inverse sqrt | linear decay) * plateau scale, >= min_lr.

    ``linear`` holds the rate (after any warmup) and then lowers it in a straight line to
    min_lr over the run's last ``decay_last`` fraction, measured by :meth:`at`'s ``done`` (the
    share of the run's epochs or steps already trained), so that it needs no count of updates
    in advance. Plain state (two numbers) so that it round-trips through a weights-only
    checkpoint.
    """

    lr: float
    kind: str
    warmup_steps: int
    min_lr: float
    factor: float
    patience: int
    decay_last: float = 1.0
    scale: float = 1.0
    bad_validations: int = 0

    def at(self, step: int, done: float = 0.0) -> float:
        """Learning rate for update number ``step`` (1-based), ``done`` of the run behind it."""
        rate = self.lr * self.scale
        if self.warmup_steps and step < self.warmup_steps:
            rate *= step / self.warmup_steps
        elif self.kind == "inverse_sqrt" and self.warmup_steps:
            rate *= math.sqrt(self.warmup_steps / step)
        if self.kind == "linear":
            rate *= min(1.0, max(0.0, (1.0 - done) / self.decay_last))
        return max(rate, self.min_lr)

    def validated(self, improved: bool) -> None:
        """Reduce-on-plateau bookkeeping, called after each scheduled validation."""
        if self.kind != "plateau":
            return
        self.bad_validations = 0 if improved else self.bad_validations + 1
        if self.bad_validations > self.patience:
            self.scale *= self.factor
            self.bad_validations = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.bad_validations = int(state["bad_validations"])


def run_done(cfg: Any, progress: Any, epoch_steps: int) -> float:
    """The share of the run trained before the next update, for the ``linear`` schedule.

    ``cfg`` is the recipe's train section, ``progress`` the run's position and ``epoch_steps``
    the current epoch's update count. The run's length is train.max_epochs, or train.max_steps
    when max_epochs is 0: with both set, max_steps only stops the run early (or lets it stop
    and resume), and the schedule stays the one of the whole run of max_epochs.
    """
    if cfg.max_epochs:
        return (progress.epoch + progress.epoch_step / max(epoch_steps, 1)) / cfg.max_epochs
    return progress.step / cfg.max_steps


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping how *this* run's optimizer computes.

    ``load_state_dict`` also restores each group's implementation flags, so a run resumed with
    ``train.cuda_graphs`` switched (an allowed change) would get the other path's optimizer: a
    non-fused Adam that ignores ``found_inf`` and cannot be captured, or the reverse. The
    moments, step counts and hyperparameters are loaded; ``fused``, ``foreach`` and
    ``capturable`` stay as built, and step counts move to the device when the kernel needs them
    there (fused or capturable) or to the host when it does not, as a fresh state would have
    them.
    """
    flags = [{key: group[key] for key in ("fused", "foreach", "capturable")}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
        on_device = group["fused"] or group["capturable"]
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            if "step" in param_state:
                device = param.device if on_device else torch.device("cpu")
                param_state["step"] = param_state["step"].to(device=device, dtype=torch.float32)

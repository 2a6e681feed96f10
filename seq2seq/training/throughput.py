"""How fast training goes: the window between two log lines, and the whole session."""

from __future__ import annotations

import sys
import time

import torch

from seq2seq import distributed as dist


class Window:
    """The training loss and target tokens summed since the last log line."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        """Add one update: its summed loss on this rank and the global batch's target tokens."""
        self.loss += loss
        self.tokens += tokens

    def summary(self) -> tuple[float, float]:
        """The loss per target token (summed over ranks) and the target tokens per second."""
        loss = dist.all_reduce_sum(self.loss.clone()).item() / self.tokens
        return loss, self.tokens / (time.perf_counter() - self.start)


class Session:
    """This session's training throughput: target tokens, and seconds spent validating."""

    def __init__(self) -> None:
        self.start, self.tokens, self.validation_s = time.perf_counter(), 0, 0.0

    def report(self, device: torch.device) -> None:
        """Print the target tokens per second outside validation (and the peak GPU memory)."""
        seconds = time.perf_counter() - self.start - self.validation_s
        if self.tokens and seconds > 0:
            print(f"trained on {self.tokens:,} target tokens in {seconds:,.1f} s "
                  f"outside validation: {self.tokens / seconds:,.0f} target "
                  "tokens/s", file=sys.stderr)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            print(f"peak GPU memory: {peak:,.0f} MiB (torch.cuda.max_memory_allocated)",
                  file=sys.stderr)

"""Ranges of numeric options: one :class:`Range` per recipe field, command-line flag and API
argument, so that the three accept the same values with the same messages.

A value outside its range is refused before any work: an upper bound keeps a typo (``1e9`` for
``1e3``) from ending in an out-of-memory kill hours later, and a float must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SEED_MAX = 2**32 - 1  # numpy's seeds are 32 bits; torch's would take more
STEPS_MAX = 10**9  # update counts and intervals: "never" is the option's 0, not a huge value


@dataclass(frozen=True)
class Range:
    """The interval ``[lo, hi]`` (``(lo`` or ``hi)`` when open) of an int or float option."""

    lo: float
    hi: float
    integer: bool = True
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        return (("(" if self.lo_open else "[") + _number(self.lo) + ", " + _number(self.hi)
                + (")" if self.hi_open else "]"))

    def expected(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        return f"{kind} in {self}"

    def type_problem(self, value: Any) -> str | None:
        """Why ``value`` is not of this range's type (``None`` when it is)."""
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"expected {self.expected()}, got {_show(value)}"
        return None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused: its type, a NaN or infinity, or its range (``None`` when
        it is accepted)."""
        wrong_type = self.type_problem(value)
        if wrong_type:
            return wrong_type
        if isinstance(value, float) and not math.isfinite(value):  # (an int of 400 digits is)
            return f"expected {self.expected()}, got {value}"
        above_lo = value > self.lo if self.lo_open else value >= self.lo
        below_hi = value < self.hi if self.hi_open else value <= self.hi
        return None if above_lo and below_hi else f"must be in {self}, got {_number(value)}"


def ints(lo: int, hi: int) -> Range:
    return Range(lo, hi)


def floats(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo, hi, integer=False, lo_open=lo_open, hi_open=hi_open)


def _number(value: float) -> str:
    if isinstance(value, int) and abs(value) >= 10**5:
        return f"{value:,}".replace(",", "_")  # Python and YAML both read 1_000_000
    return repr(value) if isinstance(value, float) else str(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

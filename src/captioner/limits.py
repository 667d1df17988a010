"""The allowed range of a setting, one definition for config files, command-line options and decoding
options, so that each says what it allows in the same words ("must be at least 1, got 0")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limit:
    """What a value may be: at least `low`, above `above`, at most `high`, below `below`, or one of
    `choices`. NaN is never allowed."""

    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()

    def allows(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        if isinstance(v, float) and v != v:  # NaN
            return False
        return not (
            (self.low is not None and v < self.low)
            or (self.above is not None and v <= self.above)
            or (self.high is not None and v > self.high)
            or (self.below is not None and v >= self.below)
        )

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        bounds = (
            ("at least", self.low),
            ("above", self.above),
            ("at most", self.high),
            ("below", self.below),
        )
        return " and ".join(f"{words} {bound:g}" for words, bound in bounds if bound is not None)

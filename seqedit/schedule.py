"""When probes run. A schedule answers `due(edit_index, signals)` after each editor call.

Spelled as short strings in configs: "every:100", "geometric:2" (1, 2, 4, 8, ...), "at:[1,10,500]",
"signal:norm_spike", "never", and unions joined with "|" ("every:100|signal:norm_spike").
`edit_index` is the number of edits applied so far; with batches, an "every:100" schedule fires on the first call
that crosses a multiple of 100, so batch sizes that do not divide 100 still get one check per 100 edits.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import yaml


class Schedule:
    def due(self, edit_index: int, signals: Collection[str] = (), previous_index: int | None = None) -> bool:
        raise NotImplementedError


def _crossed(prev: int, now: int, k: int) -> bool:
    """Some multiple of k lies in (prev, now]."""
    return now // k > prev // k


@dataclass(frozen=True)
class Every(Schedule):
    n: int

    def due(self, edit_index, signals=(), previous_index=None):
        prev = edit_index - 1 if previous_index is None else previous_index
        return _crossed(prev, edit_index, self.n)


@dataclass(frozen=True)
class Geometric(Schedule):
    base: float = 2.0

    def _points_upto(self, n: int) -> set[int]:
        pts, x = set(), 1.0
        while x <= n:
            pts.add(int(round(x)))
            x *= self.base
        return pts

    def due(self, edit_index, signals=(), previous_index=None):
        prev = edit_index - 1 if previous_index is None else previous_index
        return any(prev < p <= edit_index for p in self._points_upto(edit_index))


@dataclass(frozen=True)
class At(Schedule):
    points: frozenset[int]

    def due(self, edit_index, signals=(), previous_index=None):
        prev = edit_index - 1 if previous_index is None else previous_index
        return any(prev < p <= edit_index for p in self.points)


@dataclass(frozen=True)
class OnSignal(Schedule):
    signal: str

    def due(self, edit_index, signals=(), previous_index=None):
        return self.signal in signals


@dataclass(frozen=True)
class Never(Schedule):
    def due(self, edit_index, signals=(), previous_index=None):
        return False


@dataclass(frozen=True)
class Union(Schedule):
    parts: tuple[Schedule, ...]

    def due(self, edit_index, signals=(), previous_index=None):
        return any(p.due(edit_index, signals, previous_index) for p in self.parts)


KINDS = ("every:N", "geometric:B", "at:[i,j,...]", "signal:NAME", "never")


def parse_schedule(text: str) -> Schedule:
    parts = [p.strip() for p in str(text).split("|") if p.strip()]
    if not parts:
        raise ValueError(f"empty schedule {text!r}; allowed forms: {', '.join(KINDS)}")
    if len(parts) > 1:
        return Union(tuple(parse_schedule(p) for p in parts))
    kind, _, arg = parts[0].partition(":")
    try:
        if kind == "never" and not arg:
            return Never()
        if kind == "every":
            n = int(arg)
            if n < 1:
                raise ValueError
            return Every(n)
        if kind == "geometric":
            b = float(arg or 2)
            if not b > 1 or not math.isfinite(b):
                raise ValueError
            return Geometric(b)
        if kind == "at":
            pts = yaml.safe_load(arg)
            pts = [pts] if isinstance(pts, int) else pts
            if not isinstance(pts, list) or not all(isinstance(p, int) and p >= 0 for p in pts):
                raise ValueError
            return At(frozenset(pts))
        if kind == "signal" and arg:
            return OnSignal(arg)
    except (ValueError, yaml.YAMLError):
        pass
    raise ValueError(f"bad schedule {parts[0]!r}; allowed forms: {', '.join(KINDS)}")

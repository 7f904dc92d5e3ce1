"""Training budgets (time, steps, tokens, FLOPs) and the clock that measures them.

One short syntax for every kind: ``90s``, ``10min``, ``2h``, ``1d``, ``500steps``, ``20Mtok``,
``1e15flops``. Progress in [0, 1] is what every schedule reads, so a recipe means the same on a
laptop and on an H100.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import ConfigError

_TIME_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}
_KIND_WORDS = {
    "steps": "steps", "step": "steps",
    "tok": "tokens", "tokens": "tokens",
    "flops": "flops", "flop": "flops",
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGBT]?)\s*([a-zA-Z]+)\s*$")
_EXAMPLES = "90s, 10min, 2h, 500steps, 20Mtok, 1e15flops"


@dataclass(frozen=True)
class Budget:
    """A limit of one kind: ``seconds``, ``steps``, ``tokens`` or ``flops``."""

    kind: str
    limit: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse the short syntax; raises ConfigError with examples on anything else."""
        m = _PATTERN.match(str(text))
        if not m:
            raise ConfigError(f"budget '{text}' is not understood; use e.g. {_EXAMPLES}")
        number, scale, unit = m.groups()
        value = float(number)
        if unit in _TIME_UNITS and not scale:
            kind, limit = "seconds", value * _TIME_UNITS[unit]
        elif unit.lower() in _KIND_WORDS:
            kind, limit = _KIND_WORDS[unit.lower()], value * _SCALE[scale]
        else:
            raise ConfigError(f"budget '{text}' has an unknown unit '{unit}'; use e.g. {_EXAMPLES}")
        if limit <= 0:
            raise ConfigError(f"budget '{text}' must be positive")
        if not math.isfinite(limit):  # 1e400steps overflows to inf: a run that never stops
            raise ConfigError(f"budget '{text}' is too large")
        if kind == "steps" and not limit.is_integer():  # 1.5steps would silently run 2
            raise ConfigError(f"budget '{text}' is not a whole number of steps")
        return cls(kind, limit)

    def __str__(self) -> str:
        unit = {"seconds": "s", "steps": "steps", "tokens": "tok", "flops": "flops"}[self.kind]
        return f"{self.limit:g}{unit}"


class Clock:
    """Wall-clock time spent training, excluding anything run inside :meth:`paused`.

    Evaluation, checkpoint writing and compile warm-up are paused, so a time budget buys
    training steps only. The accumulated time survives checkpoints through ``state_dict``.
    """

    def __init__(self) -> None:
        self._accumulated = 0.0
        self._started: float | None = None
        self.paused_seconds = 0.0

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is not None:
            self._accumulated += time.perf_counter() - self._started
            self._started = None

    @property
    def elapsed(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._accumulated + running

    @contextmanager
    def paused(self) -> Iterator[None]:
        was_running = self._started is not None
        self.stop()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - t0
            if was_running:
                self.start()

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed, "paused": self.paused_seconds}

    def load_state_dict(self, state: dict) -> None:
        self._accumulated = float(state["elapsed"])
        self.paused_seconds = float(state.get("paused", 0.0))


@dataclass
class Usage:
    """What has been spent so far, in every unit a budget can be written in."""

    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    flops: float = 0.0

    def of(self, kind: str) -> float:
        return float(getattr(self, kind))


def progress(budget: Budget, usage: Usage) -> float:
    """Fraction of the budget spent, clipped to [0, 1]."""
    return min(1.0, max(0.0, usage.of(budget.kind) / budget.limit))


def exhausted(budget: Budget, usage: Usage) -> bool:
    return usage.of(budget.kind) >= budget.limit


# Periodic work is due at multiples of a fraction of the budget. Those multiples are rounded
# floats (3 * 0.1 = 0.30000000000000004 > 6/20), so without a tolerance an evaluation due at
# step 6 of 20 slipped to step 7, and floor(0.3 / 0.1) = 2 made the same point due again.
_DUE_TOLERANCE = 1e-9


def next_due(progress_now: float, every: float) -> float:
    """The first multiple of ``every`` after ``progress_now`` (which is itself a due point, or
    past one, when it is within rounding of a multiple)."""
    return (math.floor(progress_now / every + _DUE_TOLERANCE) + 1) * every


def is_due(progress_now: float, due: float) -> bool:
    """Whether the point ``due`` (from :func:`next_due`) has been reached, up to rounding."""
    return progress_now >= due - _DUE_TOLERANCE

"""Schedules as pure functions of budget progress p in [0, 1].

Learning-rate schedules return a multiplier of the peak learning rate. Batch size and other
quantities ramp through :func:`ramp`. Registries, not string dispatch, so a technique or a recipe
can add its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .errors import UnknownName
from .plugins import unknown_hint
from .utils import add_unique

LRSchedule = Callable[..., float]
LR_SCHEDULES: dict[str, LRSchedule] = {}


def register_lr(name: str) -> Callable[[LRSchedule], LRSchedule]:
    """Decorator: make ``fn(p, **options) -> multiplier of the peak`` available as
    ``schedule.name=NAME``; ``p`` is budget progress in [0, 1], and ``options`` are those of
    ``schedule.warmup/peak_at/start/final`` that are set (give each a default: an unset one is
    not passed, and config.json records the default as the run's value)."""

    def deco(fn: LRSchedule) -> LRSchedule:
        add_unique(LR_SCHEDULES, name, fn, "schedule")
        return fn

    return deco


def _warm(p: float, warmup: float) -> float | None:
    if warmup > 0 and p < warmup:
        return p / warmup
    return None


@register_lr("constant")
def constant(p: float, warmup: float = 0.0, **_: float) -> float:
    """Peak learning rate throughout, after an optional linear warm-up."""
    w = _warm(p, warmup)
    return 1.0 if w is None else w


@register_lr("linear")
def linear(p: float, warmup: float = 0.0, final: float = 0.0, **_: float) -> float:
    """Linear warm-up, then linear decay to ``final`` × peak at the end of the budget."""
    w = _warm(p, warmup)
    if w is not None:
        return w
    frac = (p - warmup) / max(1e-12, 1.0 - warmup)
    return 1.0 + (final - 1.0) * min(1.0, frac)


@register_lr("cosine")
def cosine(p: float, warmup: float = 0.0, final: float = 0.0, **_: float) -> float:
    """Linear warm-up, then half a cosine down to ``final`` × peak."""
    w = _warm(p, warmup)
    if w is not None:
        return w
    frac = min(1.0, (p - warmup) / max(1e-12, 1.0 - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))


@register_lr("one-cycle")
def one_cycle(p: float, peak_at: float = 0.3, start: float = 0.04, final: float = 0.0, **_: float) -> float:
    """Linear rise from ``start`` to the peak at ``peak_at``, then linear fall to ``final``."""
    if p < peak_at:
        return start + (1.0 - start) * p / peak_at
    return 1.0 + (final - 1.0) * (p - peak_at) / max(1e-12, 1.0 - peak_at)


@register_lr("budget-triangle")
def budget_triangle(p: float, peak_at: float = 0.75, start: float = 0.25, final: float = 0.0, **_: float) -> float:
    """Cramming's schedule: from 25 % of peak up to the peak at 75 % of the budget, then to 0."""
    return one_cycle(p, peak_at=peak_at, start=start, final=final)


def lr_factor(name: str, p: float, **options: float) -> float:
    """The learning-rate multiplier of schedule ``name`` at progress ``p``."""
    try:
        fn = LR_SCHEDULES[name]
    except KeyError:
        raise UnknownName(
            f"unknown lr schedule '{name}'{unknown_hint(name, LR_SCHEDULES)}; "
            f"known: {', '.join(sorted(LR_SCHEDULES))}"
        ) from None
    return fn(min(1.0, max(0.0, p)), **options)


def ramp(p: float, start: float, end: float, fraction: float) -> float:
    """Linear ramp from ``start`` to ``end`` over the first ``fraction`` of the budget."""
    if fraction <= 0 or p >= fraction:
        return end
    return start + (end - start) * p / fraction


def accumulation_steps(p: float, batch_size: int, micro_batch: int, ramp_fraction: float) -> int:
    """Micro-batches per optimizer step so the global batch follows the linear batch ramp.

    The micro-batch stays fixed (a big GPU is never under-filled) and accumulation grows, as in
    cramming; the ramp starts at one micro-batch.
    """
    target_max = max(1, math.ceil(batch_size / micro_batch))
    return max(1, round(ramp(p, 1.0, float(target_max), ramp_fraction)))


def ramp_accumulation(p: float, batch_size: int, micro_batch: int, unit: int, ramp_fraction: float) -> int:
    """Micro-batches of ``micro_batch`` sequences per optimizer step when the batch ramp grows in
    steps of ``unit`` sequences (all counted over every rank).

    The unit is the global micro-batch a run started with, which :func:`accumulation_steps` ramps
    in; a run resumed with another micro-batch keeps it, so each step keeps the batch of the
    uninterrupted run (``unit`` a multiple of ``micro_batch`` while the ramp lasts). With
    ``unit == micro_batch`` this is :func:`accumulation_steps`. After the ramp, the whole batch;
    on it, never more (a resume that also changed the batch may leave a unit that does not
    divide it).
    """
    if ramp_fraction <= 0 or p >= ramp_fraction or unit == micro_batch:
        return accumulation_steps(p, batch_size, micro_batch, ramp_fraction)
    sequences = min(accumulation_steps(p, batch_size, unit, ramp_fraction) * unit,
                    max(batch_size, micro_batch))
    if sequences % micro_batch:
        raise ValueError(f"the batch ramp's batch of {sequences} sequences (in steps of {unit}) is not a "
                         f"whole number of micro-batches of {micro_batch}")
    return sequences // micro_batch

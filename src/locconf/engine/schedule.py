"""The learning-rate schedule of :func:`locconf.engine.train.train`: linear warm-up, then step or cosine decay.

:func:`lr_factor` is the multiplier of the base rate at one iteration; :func:`build_lr_scheduler`
wraps it in a per-iteration ``LambdaLR``. :func:`check_schedule` validates the settings (bools are
never numbers here), so :func:`~locconf.engine.train.train` refuses a bad schedule before it
writes anything.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Sequence

import torch

__all__ = ["SCHEDULES", "lr_factor", "check_schedule", "build_lr_scheduler", "is_int", "is_number"]

SCHEDULES = ("step", "cosine")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def lr_factor(
    iteration: int,
    *,
    iterations: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    steps: Sequence[float] = (0.7, 0.9),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate for (0-based) ``iteration``.

    ``factor = warmup(i) * decay(i)`` where

    - ``warmup(i) = warmup_factor + (1 - warmup_factor) * i / warmup_iters`` for
      ``i < warmup_iters``, else 1 (linear ramp from ``warmup_factor`` to 1);
    - step decay: ``gamma ** k``, ``k`` the number of milestones ``floor(s * iterations)``
      (``s`` in ``steps``) that are ``<= i``;
    - cosine decay: ``0.5 * (1 + cos(pi * i / iterations))`` (1 at the start, 0 at the end).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "step":
        decay = gamma ** sum(1 for s in steps if iteration >= math.floor(s * iterations))
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * min(iteration, iterations) / iterations))
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return (warmup_factor * (1.0 - alpha) + alpha) * decay
    return decay


def check_schedule(
    iterations: int, warmup_iters: int, warmup_factor: float, schedule: str, steps: Sequence[float], gamma: float
) -> None:
    """Raise ``ValueError`` naming the first bad setting of :func:`lr_factor`."""
    if not is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if not is_int(warmup_iters) or warmup_iters < 0:
        raise ValueError(f"warmup_iters must be an int >= 0, got {warmup_iters!r}")
    if not is_number(warmup_factor) or not 0.0 < warmup_factor <= 1.0:
        raise ValueError(f"warmup_factor must be a number in (0, 1], got {warmup_factor!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if (not isinstance(steps, (list, tuple)) or not all(is_number(s) and 0.0 < s < 1.0 for s in steps)
            or list(steps) != sorted(steps)):
        raise ValueError(f"steps must be increasing fractions of iterations in (0, 1), got {steps!r}")
    if not is_number(gamma) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    steps: Sequence[float] = (0.7, 0.9),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` of :func:`lr_factor` (call ``scheduler.step()`` after every update)."""
    check_schedule(iterations, warmup_iters, warmup_factor, schedule, steps, gamma)
    fn = partial(
        lr_factor, iterations=iterations, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
        schedule=schedule, steps=tuple(steps), gamma=gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

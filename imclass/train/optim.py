"""Optimizers by name and learning-rate schedules stepped once per batch.

A schedule is a plain callable ``step -> factor``: the learning rate of a step is the
optimizer's base learning rate times the factor. ``Classifier`` wraps it in a
``torch.optim.lr_scheduler.LambdaLR`` so its state is saved in checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "cosine", "onecycle", "linear")


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Build a torch optimizer from its course name: ``sgd`` (with momentum / Nesterov), ``adam``,
    ``adamw`` (decoupled weight decay) or ``rmsprop``."""
    if lr <= 0:
        raise ValueError(f"expected lr > 0, received lr={lr}")
    if weight_decay < 0:
        raise ValueError(f"expected weight_decay >= 0, received weight_decay={weight_decay}")
    key = name.lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum if momentum else 0.0, weight_decay=weight_decay)
    raise ValueError(f"expected optimizer in {OPTIMIZERS} or a torch.optim.Optimizer, received {name!r}")


@dataclass
class Schedule:
    """Learning-rate factor per step: a warm-up ramp times one decay shape.

    Parameters
    ----------
    name:
        ``constant``; ``step`` (times ``gamma`` every ``step_size`` epochs); ``exponential``
        (times ``gamma`` per epoch, smoothly per step); ``cosine`` (half cosine from 1 to
        ``min_factor``); ``linear`` (straight line from 1 to ``min_factor``); ``onecycle``
        (linear up from ``start_factor`` to 1 over ``pct_start`` of the run, then cosine down to
        ``min_factor``).
    total_steps, steps_per_epoch:
        length of the run and of one epoch, in optimizer steps.
    warmup_steps:
        linear ramp ``(step + 1) / warmup_steps`` multiplied into the first steps (any shape).
    """

    name: str = "constant"
    total_steps: int = 1
    steps_per_epoch: int = 1
    warmup_steps: int = 0
    step_size: float = 30
    gamma: float = 0.1
    min_factor: float = 0.0
    pct_start: float = 0.25
    start_factor: float = 0.04

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"expected schedule in {SCHEDULES}, received {self.name!r}")
        if self.total_steps < 1 or self.steps_per_epoch < 1:
            raise ValueError(
                f"expected total_steps >= 1 and steps_per_epoch >= 1, received {self.total_steps} and {self.steps_per_epoch}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"expected warmup_steps >= 0, received {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        factor = self._shape(step)
        if self.warmup_steps and step < self.warmup_steps:
            factor *= (step + 1) / self.warmup_steps
        return factor

    def _shape(self, step: int) -> float:
        t = min(step / self.total_steps, 1.0)  # progress of the run, 0 at the first step
        lo = self.min_factor
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.gamma ** math.floor(step / (self.step_size * self.steps_per_epoch))
        if self.name == "exponential":
            return self.gamma ** (step / self.steps_per_epoch)
        if self.name == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
        if self.name == "linear":
            return 1 + (lo - 1) * t
        # onecycle
        if t < self.pct_start:
            return self.start_factor + (1 - self.start_factor) * t / self.pct_start
        u = (t - self.pct_start) / (1 - self.pct_start)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * u))


def make_schedule(
    spec: str | dict | Callable[[int], float] | None,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
) -> Callable[[int], float]:
    """Resolve a schedule: ``None`` (constant), a name, a dict of :class:`Schedule` fields
    (``{"name": "step", "step_size": 10, "gamma": 0.5}``) or a callable ``step -> factor``.

    A callable is used as given, with the warm-up (if any) multiplied in.
    """
    if spec is None:
        spec = "constant"
    if isinstance(spec, str):
        return Schedule(spec, total_steps, steps_per_epoch, warmup_steps)
    if isinstance(spec, dict):
        options = dict(spec)
        options.setdefault("warmup_steps", warmup_steps)
        return Schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch, **options)
    if callable(spec):
        return spec if not warmup_steps else _Warmup(spec, warmup_steps)
    raise ValueError(f"expected schedule None, a name in {SCHEDULES}, a dict or a callable, received {spec!r}")


@dataclass
class _Warmup:
    """A user schedule with a linear warm-up multiplied in."""

    inner: Callable[[int], float]
    warmup_steps: int

    def __call__(self, step: int) -> float:
        return self.inner(step) * min(1.0, (step + 1) / self.warmup_steps)

"""Keras's learning-rate schedules: ``step -> learning rate``, usable as an optimizer's ``learning_rate``.

    lr = ExponentialDecay(1e-2, decay_steps=1000, decay_rate=0.9)
    model.compile(optimizer=SGD(learning_rate=lr, momentum=0.9), loss="sparse_categorical_crossentropy")

``step`` counts optimizer updates from 0 (Keras's ``optimizer.iterations``). The engine turns a schedule
into a factor of the base learning rate ``schedule(0)`` applied before every batch.
"""
from __future__ import annotations

import bisect
import math
import numbers
from typing import Any, Sequence

__all__ = ["CosineDecay", "ExponentialDecay", "LearningRateSchedule", "PiecewiseConstantDecay"]


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a number >= 0" if allow_zero else "a positive number"
        raise ValueError(f"expected {kind} for {name}, received {name}={value!r}")
    return float(value)


class LearningRateSchedule:
    """Base class: ``schedule(step)`` is the learning rate of optimizer update ``step`` (from 0)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The ``__init__`` arguments."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (``staircase``: the exponent
    rounded down, so the rate drops in steps every ``decay_steps`` updates)."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False):
        self.initial_learning_rate = _positive("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.decay_rate = _positive("decay_rate", decay_rate)
        self.staircase = bool(staircase)

    def __call__(self, step: int) -> float:
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate ** p

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase}


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` while ``step <= boundaries[0]``, ``values[1]`` while ``step <= boundaries[1]``, ...,
    ``values[-1]`` after the last boundary (``len(values) == len(boundaries) + 1``)."""

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]):
        boundaries, values = list(boundaries), list(values)
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"expected one more value than boundaries, received {len(boundaries)} boundaries "
                             f"and {len(values)} values")
        if boundaries != sorted(boundaries):
            raise ValueError(f"expected increasing boundaries, received {boundaries}")
        self.boundaries = boundaries
        self.values = [_positive("values", v) for v in values]

    def __call__(self, step: int) -> float:
        return self.values[bisect.bisect_left(self.boundaries, step)]

    def get_config(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "values": list(self.values)}


class CosineDecay(LearningRateSchedule):
    """Half a cosine from ``initial_learning_rate`` down to ``alpha * initial_learning_rate`` over
    ``decay_steps`` updates, then constant: ``lr0 * ((1 - alpha) * 0.5 * (1 + cos(pi * t)) + alpha)``
    with ``t = min(step, decay_steps) / decay_steps``."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, alpha: float = 0.0):
        self.initial_learning_rate = _positive("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.alpha = _positive("alpha", alpha, allow_zero=True)

    def __call__(self, step: int) -> float:
        t = min(step, self.decay_steps) / self.decay_steps
        return self.initial_learning_rate * ((1 - self.alpha) * 0.5 * (1 + math.cos(math.pi * t)) + self.alpha)

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "alpha": self.alpha}

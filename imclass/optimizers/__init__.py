"""Keras-style optimizer objects, built into ``torch.optim`` optimizers when a model is compiled.

    from imclass.optimizers import SGD, Adam
    model.compile(loss="categorical_crossentropy", optimizer=Adam(lr=0.001))
    model.compile(loss=..., optimizer=SGD(learning_rate=0.01, momentum=0.9, nesterov=True, decay=1e-4))

Arguments follow Keras: ``learning_rate`` (or the course's older ``lr``; a float or an
``imclass.optimizers.schedules`` schedule), Keras 2's ``decay`` (time-based decay: the rate of update
``t`` is ``learning_rate / (1 + decay * t)``), ``weight_decay``, ``clipnorm`` and each update rule's own
constants (Keras defaults). The object holds settings only; ``build(params)`` makes the torch optimizer
and :attr:`Optimizer.lr_factor` the per-step factor the engine applies to its base rate.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from imclass.optimizers import schedules
from imclass.optimizers.schedules import LearningRateSchedule

__all__ = ["Adadelta", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop", "SGD", "get", "schedules"]


def _number(name: str, value: Any, low: float = 0.0, strict: bool = False, high: float | None = None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        bound += f" and < {high}" if high is not None else ""
        raise ValueError(f"expected a number {bound} for {name}, received {name}={value!r}")
    return float(value)


@dataclass
class KerasLRFactor:
    """Factor of the base rate at optimizer update ``step``: ``schedule(step) / base / (1 + decay * step)``."""

    base: float
    decay: float = 0.0
    schedule: Callable[[int], float] | None = None

    def __call__(self, step: int) -> float:
        lr = self.schedule(step) if self.schedule is not None else self.base
        return lr / self.base / (1.0 + self.decay * step)


class Optimizer:
    """Settings of one update rule; subclasses say how to build it (:meth:`_torch`)."""

    name = "optimizer"
    default_lr = 0.001

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None, *, lr: float | None = None,
                 decay: float = 0.0, weight_decay: float | None = None, clipnorm: float | None = None) -> None:
        if learning_rate is not None and lr is not None:
            raise ValueError("give learning_rate or lr (its older Keras name), not both")
        rate = lr if lr is not None else learning_rate
        rate = self.default_lr if rate is None else rate
        if callable(rate) and not isinstance(rate, numbers.Real):
            self.schedule: Callable[[int], float] | None = rate
            self.learning_rate = _number("learning_rate (the schedule's value at step 0)", float(rate(0)), strict=True)
        else:
            self.schedule = None
            self.learning_rate = _number("learning_rate", rate, strict=True)
        self.decay = _number("decay", decay)
        if self.decay and self.schedule is not None:
            raise ValueError("decay and a learning-rate schedule both change the rate; give one of them")
        self.weight_decay = 0.0 if weight_decay is None else _number("weight_decay", weight_decay)
        self.clipnorm = None if clipnorm is None else _number("clipnorm", clipnorm, strict=True)

    @property
    def lr(self) -> float:
        """The base learning rate (Keras 2's name)."""
        return self.learning_rate

    @property
    def lr_factor(self) -> KerasLRFactor | None:
        """The per-step factor of the base rate (``None`` for a constant rate)."""
        if self.schedule is None and not self.decay:
            return None
        return KerasLRFactor(self.learning_rate, self.decay, self.schedule)

    def build(self, params: Iterable[torch.nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer:
        """The torch optimizer of these settings over ``params``."""
        return self._torch(params)

    def _torch(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The settings as plain values."""
        config = {"name": self.name, "learning_rate": self.learning_rate, "decay": self.decay,
                  "weight_decay": self.weight_decay}
        if self.schedule is not None:
            config["learning_rate"] = repr(self.schedule)
        return config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_config().items() if k != 'name')})"


class SGD(Optimizer):
    """Stochastic gradient descent, with ``momentum`` and ``nesterov`` (Keras: ``learning_rate=0.01``)."""

    name = "sgd"
    default_lr = 0.01

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None, momentum: float = 0.0,
                 nesterov: bool = False, **kw: Any) -> None:
        super().__init__(learning_rate, **kw)
        self.momentum = _number("momentum", momentum, high=1.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov=True needs momentum > 0")

    def _torch(self, params):
        return torch.optim.SGD(params, lr=self.learning_rate, momentum=self.momentum, nesterov=self.nesterov,
                               weight_decay=self.weight_decay)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (Kingma & Ba): ``beta_1``, ``beta_2``, ``epsilon``, ``amsgrad`` (Keras defaults)."""

    name = "adam"

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, **kw: Any) -> None:
        super().__init__(learning_rate, **kw)
        self.beta_1 = _number("beta_1", beta_1, high=1.0)
        self.beta_2 = _number("beta_2", beta_2, high=1.0)
        self.epsilon = _number("epsilon", epsilon, strict=True)
        self.amsgrad = bool(amsgrad)

    def _torch(self, params):
        return torch.optim.Adam(params, lr=self.learning_rate, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                                amsgrad=self.amsgrad, weight_decay=self.weight_decay)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
                "amsgrad": self.amsgrad}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter; Keras: ``weight_decay=0.004``)."""

    name = "adamw"

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None, weight_decay: float = 0.004,
                 **kw: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **kw)

    def _torch(self, params):
        return torch.optim.AdamW(params, lr=self.learning_rate, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                                 amsgrad=self.amsgrad, weight_decay=self.weight_decay)


class RMSprop(Optimizer):
    """RMSprop (Hinton): running mean of squared gradients with weight ``rho``; ``momentum``, ``centered``."""

    name = "rmsprop"

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None, rho: float = 0.9,
                 momentum: float = 0.0, epsilon: float = 1e-7, centered: bool = False, **kw: Any) -> None:
        super().__init__(learning_rate, **kw)
        self.rho = _number("rho", rho, high=1.0)
        self.momentum = _number("momentum", momentum, high=1.0)
        self.epsilon = _number("epsilon", epsilon, strict=True)
        self.centered = bool(centered)

    def _torch(self, params):
        return torch.optim.RMSprop(params, lr=self.learning_rate, alpha=self.rho, eps=self.epsilon,
                                   momentum=self.momentum, centered=self.centered, weight_decay=self.weight_decay)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rho": self.rho, "momentum": self.momentum, "epsilon": self.epsilon,
                "centered": self.centered}


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.): each weight's rate divided by the root of its summed squared gradients."""

    name = "adagrad"

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None,
                 initial_accumulator_value: float = 0.1, epsilon: float = 1e-7, **kw: Any) -> None:
        super().__init__(learning_rate, **kw)
        self.initial_accumulator_value = _number("initial_accumulator_value", initial_accumulator_value)
        self.epsilon = _number("epsilon", epsilon, strict=True)

    def _torch(self, params):
        return torch.optim.Adagrad(params, lr=self.learning_rate, initial_accumulator_value=self.initial_accumulator_value,
                                   eps=self.epsilon, weight_decay=self.weight_decay)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon}


class Adadelta(Optimizer):
    """Adadelta (Zeiler): updates scaled by running means of squared updates and gradients (``rho``)."""

    name = "adadelta"

    def __init__(self, learning_rate: float | LearningRateSchedule | None = None, rho: float = 0.95,
                 epsilon: float = 1e-7, **kw: Any) -> None:
        super().__init__(learning_rate, **kw)
        self.rho = _number("rho", rho, high=1.0)
        self.epsilon = _number("epsilon", epsilon, strict=True)

    def _torch(self, params):
        return torch.optim.Adadelta(params, lr=self.learning_rate, rho=self.rho, eps=self.epsilon,
                                    weight_decay=self.weight_decay)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


_OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta)
}


def get(optimizer: str | Optimizer) -> Optimizer:
    """An optimizer object from a Keras name (``"adam"``, ``"sgd"``, ...; Keras defaults) or the object itself."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in _OPTIMIZERS:
        return _OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(_OPTIMIZERS)} or an "
                     "imclass.optimizers object such as Adam(learning_rate=1e-3)")

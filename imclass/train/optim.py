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
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # quintic coefficients of Muon (Keller Jordan)
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


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix ``U V^T`` of a 2-D ``g = U S V^T``.

    A few quintic Newton-Schulz iterations push every singular value of ``g / |g|`` towards
    1 (to roughly 0.7-1.2, which is all Muon needs), using only matrix products. Runs in
    bfloat16 on CUDA and float32 elsewhere; returns ``g``'s dtype and shape.
    """
    if g.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, received shape {tuple(g.shape)}")
    a, b, c = NEWTON_SCHULZ
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Muon for weight kernels and SGD for everything else, in one optimizer.

    Param groups with ``muon=True`` (conv kernels or weight matrices) take Muon steps: Nesterov
    momentum, then the update is orthogonalised (:func:`orthogonalize` of the kernel flattened
    to ``(out, fan_in)``) so every direction moves by the same amount, whatever the gradient's
    scale. With ``normalize=True`` each kernel is first rescaled to the Frobenius norm
    ``sqrt(out)`` (airbench94_muon: the scale of a kernel followed by batch norm is irrelevant,
    so fixing it makes ``lr`` an angle). Other groups (``muon=False``: biases, norms, the
    classifier) take plain SGD steps with momentum, Nesterov and coupled ``weight_decay``
    exactly as ``torch.optim.SGD``. ``torch.optim.Muon`` only takes 2-D parameters; this one
    also takes conv kernels and the rest of the model, so one optimizer serves the engine.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon: bool = True,
        ns_steps: int = 5,
        normalize: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"expected lr >= 0, received lr={lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"expected 0 <= momentum < 1, received momentum={momentum}")
        if weight_decay < 0:
            raise ValueError(f"expected weight_decay >= 0, received weight_decay={weight_decay}")
        if ns_steps < 1:
            raise ValueError(f"expected ns_steps >= 1, received ns_steps={ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, muon=muon,
                        ns_steps=ns_steps, normalize=normalize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            flat = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
            if group["muon"] and flat:
                raise ValueError(f"Muon groups take kernels/matrices (2-D or more), received shapes {flat}; "
                                 "put biases and norms in a group with muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(momentum).add_(g)
                update = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["muon"]:
                    if group["normalize"]:
                        p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    elif group["weight_decay"]:
                        p.mul_(1 - lr * group["weight_decay"])  # decoupled, as torch.optim.Muon
                    update = orthogonalize(update.reshape(len(p), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-lr)
        return loss

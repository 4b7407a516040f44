"""Search spaces of ``imclass tune``: ``parse_space`` / ``load_space`` read them, ``suggest`` draws one
set of values from an Optuna trial.

Search spaces are dicts, one entry per parameter (YAML, TOML or JSON files hold the same):

    {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
     "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
     "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
     "batch_size": 64}                                  # a plain value is fixed, not searched

Names: the training options ``optimizer lr momentum nesterov weight_decay l2 schedule lr_decay
step_size warmup_epochs label_smoothing batch_size augment`` and ``model`` (the architecture);
``width`` and ``depth`` build an MLP's ``hidden = [width] * depth``; any other name is a keyword
option of the model factory (``dropout``, ``drop_rate``, ``dense_units``, ...). For ``model="knn"``:
``k``, ``metric`` and ``weights``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imclass.config_file import read_config_file

__all__ = ["DEFAULT_SPACES", "KNN_KEYS", "Param", "TRAIN_KEYS", "load_space", "parse_space", "suggest"]

TRAIN_KEYS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "l2", "schedule", "lr_decay", "step_size",
              "warmup_epochs", "label_smoothing", "batch_size", "augment")
KNN_KEYS = ("k", "metric", "weights")

DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "knn": {
        "k": {"type": "int", "low": 1, "high": 20, "log": True},
        "metric": {"type": "categorical", "choices": ["l1", "l2", "cosine"]},
    },
    "mlp": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "width": {"type": "int", "low": 32, "high": 512, "log": True},
        "depth": {"type": "int", "low": 1, "high": 3},
    },
    "default": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "schedule": {"type": "categorical", "choices": ["none", "cosine"]},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    },
}


@dataclass
class Param:
    """One searched parameter: ``float``/``int`` in ``[low, high]`` (``log`` scale, ``step``), a
    ``categorical`` among ``choices``, or a ``fixed`` ``value``; ``when`` = {other: value(s)}
    suggests it only when earlier parameters took those values (conditional spaces)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    value: Any = None
    when: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"search space parameter {self.name!r}"
        if self.type not in ("float", "int", "categorical", "fixed"):
            raise ValueError(f"{where}: expected type float, int or categorical, received type={self.type!r}")
        if self.type in ("float", "int"):
            if self.low is None or self.high is None:
                raise ValueError(f"{where}: expected low and high for type {self.type}")
            if not self.low <= self.high:
                raise ValueError(f"{where}: expected low <= high, received low={self.low}, high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"{where}: a log scale needs low > 0, received low={self.low}")
        if self.type == "categorical" and not self.choices:
            raise ValueError(f"{where}: expected a non-empty list of choices")
        if not isinstance(self.when, dict):
            raise ValueError(f"{where}: expected when as a table of parameter: value(s), received {self.when!r}")


_PARAM_KEYS = {f.name for f in dataclasses.fields(Param)} - {"name"}


def parse_space(spec: dict[str, Any]) -> dict[str, Param]:
    """A search-space dict (the schema in this module's docstring) -> ``{name: Param}``, checked."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"expected a search space as a non-empty table of parameters, received {spec!r}")
    params = {}
    for name, entry in spec.items():
        if isinstance(entry, Param):
            params[name] = entry
        elif isinstance(entry, dict):
            unknown = sorted(set(entry) - _PARAM_KEYS)
            if unknown:
                raise ValueError(f"search space parameter {name!r}: unknown key(s) {unknown}; known: {sorted(_PARAM_KEYS)}")
            if "type" not in entry:
                raise ValueError(f"search space parameter {name!r}: expected a type (float, int, categorical)")
            params[name] = Param(name=name, **entry)
        else:
            params[name] = Param(name=name, type="fixed", value=entry)
    for p in params.values():
        for other in p.when:
            if other not in params or list(params).index(other) > list(params).index(p.name):
                raise ValueError(f"search space parameter {p.name!r}: 'when' names {other!r}, "
                                 "which must be a parameter listed before it")
    return params


def load_space(path: str | Path) -> dict[str, Param]:
    """Read a search space from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    spec = read_config_file(path, what="search space file", kinds=(".yaml", ".toml", ".json"),
                            missing=FileNotFoundError)
    try:
        return parse_space(spec)
    except ValueError as err:
        raise ValueError(f"search space file {path}: {err}") from None


def suggest(space: dict[str, Param], trial: Any) -> dict[str, Any]:
    """Draw one set of values from ``space`` through an Optuna ``trial`` (define-by-run)."""
    values: dict[str, Any] = {}
    for p in space.values():
        if not all(_matches(values.get(k), v) for k, v in p.when.items()):
            continue
        if p.type == "fixed":
            values[p.name] = p.value
        elif p.type == "float":
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return values


def _matches(value: Any, wanted: Any) -> bool:
    return value in wanted if isinstance(wanted, (list, tuple)) else value == wanted

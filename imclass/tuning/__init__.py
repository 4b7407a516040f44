"""Hyperparameter search with Optuna (``imclass tune``): ``tune(TuneConfig(...))``, search spaces
(``parse_space``, ``load_space``) and the pruning callback. A floor above the engine and the models;
the code lives in ``imclass.tuning.search``."""
from __future__ import annotations

from imclass.tuning.search import (
    DEFAULT_SPACES,
    Param,
    PruningCallback,
    TuneConfig,
    load_space,
    parse_space,
    suggest,
    tune,
)

__all__ = ["DEFAULT_SPACES", "Param", "PruningCallback", "TuneConfig", "load_space", "parse_space", "suggest", "tune"]

"""``TuneConfig``: what one ``imclass tune`` search runs on, with its checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imclass.tuning.space import DEFAULT_SPACES, Param, load_space, parse_space

__all__ = ["PRUNERS", "SAMPLERS", "STUDY_FILE", "TuneConfig"]

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
STUDY_FILE = "study.db"


@dataclass
class TuneConfig:
    """A search: what to train, on which data, how many trials, where the study lives."""

    model: str = "mlp"  # registry name, or "knn"
    dataset: str = "cifar10"
    data_root: str | None = None
    image_size: int | None = None
    limit: int | None = None  # a seeded, stratified sample of N training (and N test) images
    data_mode: str | None = None  # where a folder's images live: memory or cache (None: chosen, said aloud)
    epochs: int = 3
    trials: int = 20  # finished (complete or pruned) trials the study should hold
    space: dict | str | None = None  # a dict, a file path, or None for DEFAULT_SPACES
    storage: str | None = None  # database URL; None: sqlite:///OUT/study.db
    study_name: str = "imclass-tune"
    out: str = "runs/tune"
    workers: int = 1  # processes on this machine working on the study
    sampler: str = "tpe"
    pruner: str = "median"
    val_fraction: float = 0.2  # held out of the training split for selection (when cv == 0)
    cv: int = 0  # k-fold cross-validation instead of one validation split (k >= 2)
    seed: int = 0
    device: str = "auto"
    heartbeat: float = 10.0  # seconds; a trial silent for 3 heartbeats is failed and retried
    final: bool = True  # retrain the best parameters on the whole training split, evaluate on test
    report: str | None = None  # a folder: the final model's evaluation report on the test split, with the tuning section
    model_options: dict = field(default_factory=dict)  # fixed options of the model factory
    progress: bool = True  # a progress line per trial and for the final retraining, and each trial's result, on stderr

    def __post_init__(self) -> None:
        checks = [
            (self.trials >= 1, f"expected trials >= 1, received trials={self.trials}"),
            (self.epochs >= 1, f"expected epochs >= 1, received epochs={self.epochs}"),
            (self.workers >= 1, f"expected workers >= 1, received workers={self.workers}"),
            (self.limit is None or self.limit >= 2, f"expected limit >= 2, received limit={self.limit}"),
            (self.data_mode in (None, "memory", "cache"), "tune reads a folder in the memory or cache tier (its folds "
             f"are row subsets of one tensor), received data_mode={self.data_mode!r}"),
            (self.cv == 0 or self.cv >= 2, f"expected cv = 0 (a validation split) or >= 2 folds, received cv={self.cv}"),
            (0 < self.val_fraction < 1, f"expected 0 < val_fraction < 1, received val_fraction={self.val_fraction}"),
            (self.pruner in PRUNERS, f"expected pruner in {list(PRUNERS)}, received {self.pruner!r}"),
            (self.sampler in SAMPLERS, f"expected sampler in {list(SAMPLERS)}, received {self.sampler!r}"),
            (self.heartbeat > 0, f"expected heartbeat > 0 seconds, received {self.heartbeat}"),
            (self.report is None or self.final, "a report evaluates the final model: drop --no-final (final=False)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def storage_url(self) -> str:
        """The study's database URL."""
        return self.storage or f"sqlite:///{(Path(self.out) / STUDY_FILE).resolve()}"

    def resolved_space(self) -> dict[str, Param]:
        """The search space: the given dict or file, else the default one for the model."""
        if isinstance(self.space, (str, Path)):
            return load_space(self.space)
        if self.space is not None:
            return parse_space(self.space)
        return parse_space(DEFAULT_SPACES.get(self.model, DEFAULT_SPACES["default"]))

"""Hyperparameter search with Optuna on the training engine: ``tune(TuneConfig(...))``.

    result = tune(TuneConfig(model="mlp", dataset="cifar10", limit=2000, epochs=3, trials=20, out="runs/tune"))
    result["best_params"], result["val_accuracy"]

Every trial trains through :meth:`Classifier.fit` (or fits a :class:`imclass.KNN` for ``model="knn"``)
on the training split only: a validation part held out of it (``val_fraction``) or k-fold
cross-validation (``cv``). The test split is read once, after the search, to evaluate the best
parameters retrained on the whole training split. A :class:`PruningCallback` reports each epoch's
validation accuracy to the trial and stops hopeless trials (median or Hyperband pruner).

The study lives in Optuna storage: ``sqlite:///OUT/study.db`` unless ``storage`` names another
database URL (PostgreSQL for workers on several machines). Running the same command again resumes
it: finished trials count towards ``trials``; a trial whose process died is failed after its
heartbeat stops and its parameters are tried again. Several processes (``workers``, or the same
command started on other terminals or machines) share one study.

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

import csv
import dataclasses
import json
import multiprocessing
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "DEFAULT_SPACES", "Param", "PruningCallback", "TuneConfig", "load_space", "parse_space", "suggest", "tune",
]

TRAIN_KEYS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "l2", "schedule", "lr_decay", "step_size",
              "warmup_epochs", "label_smoothing", "batch_size", "augment")
KNN_KEYS = ("k", "metric", "weights")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
STUDY_FILE = "study.db"

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


# --------------------------------------------------------------------------------------------
# search spaces

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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space file {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            spec = yaml.safe_load(text)
        elif path.suffix == ".toml":
            import tomllib

            spec = tomllib.loads(text)
        elif path.suffix == ".json":
            spec = json.loads(text)
        else:
            raise ValueError(f"expected a .yaml, .toml or .json search space file, received {path.name!r}")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - yaml/toml parse errors of several types
        raise ValueError(f"search space file {path}: cannot parse it: {err}") from None
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


# --------------------------------------------------------------------------------------------
# configuration

@dataclass
class TuneConfig:
    """A search: what to train, on which data, how many trials, where the study lives."""

    model: str = "mlp"  # registry name, or "knn"
    dataset: str = "cifar10"
    data_root: str | None = None
    image_size: int | None = None
    limit: int | None = None  # first N training (and test) images
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

    def __post_init__(self) -> None:
        checks = [
            (self.trials >= 1, f"expected trials >= 1, received trials={self.trials}"),
            (self.epochs >= 1, f"expected epochs >= 1, received epochs={self.epochs}"),
            (self.workers >= 1, f"expected workers >= 1, received workers={self.workers}"),
            (self.limit is None or self.limit >= 2, f"expected limit >= 2, received limit={self.limit}"),
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


# --------------------------------------------------------------------------------------------
# pruning

class PruningCallback:
    """Engine callback: report each epoch's ``monitor`` to the Optuna trial; when the pruner says
    so, stop training (``state.stop_training``) and remember it, so that the caller raises
    ``optuna.TrialPruned`` once ``fit`` has returned cleanly. ``step_offset`` numbers the steps of
    later cross-validation folds after the earlier ones."""

    order = 60

    def __init__(self, trial: Any, monitor: str = "val_accuracy", step_offset: int = 0,
                 last_step: int | None = None) -> None:
        self.trial = trial
        self.monitor = monitor
        self.step_offset = step_offset
        self.last_step = last_step  # a trial that reached its last step is finished, not pruned
        self.pruned_at: int | None = None
        self.value: float | None = None

    def on_epoch_end(self, state) -> None:
        if self.monitor not in state.logs:
            raise KeyError(f"pruning monitors {self.monitor!r}, not in the epoch logs {sorted(state.logs)}")
        step = self.step_offset + state.epoch + 1
        self.value = float(state.logs[self.monitor])
        self.trial.report(self.value, step)
        if (self.last_step is None or step < self.last_step) and self.trial.should_prune():
            self.pruned_at = step
            state.stop_training = True

    def raise_if_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` (naming the step and value) when the trial was pruned."""
        import optuna

        if self.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {self.pruned_at} with {self.monitor} {self.value:.4f}")


# --------------------------------------------------------------------------------------------
# one trial

def _load_train(cfg: TuneConfig):
    from imclass import data as imdata

    # --limit: a seeded, stratified sample of the split (imclass.data.split.limit_indices)
    return imdata.load(cfg.dataset, split="train", root=cfg.data_root, image_size=cfg.image_size, limit=cfg.limit,
                       seed=cfg.seed or 0)


def _load_test(cfg: TuneConfig):
    """The test split: read only by the final evaluation, never during the search."""
    from imclass import data as imdata

    return imdata.load(cfg.dataset, split="test", root=cfg.data_root, image_size=cfg.image_size, limit=cfg.limit,
                       seed=cfg.seed or 0)


def _folds(cfg: TuneConfig, train_set) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train indices, validation indices) pairs: one seeded stratified split, or ``cv`` folds."""
    if cfg.cv:
        from sklearn.model_selection import StratifiedKFold

        labels = train_set.labels.numpy()
        kfold = StratifiedKFold(n_splits=cfg.cv, shuffle=True, random_state=cfg.seed)
        return [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in kfold.split(labels, labels)]
    from imclass.data.split import split_indices

    return [split_indices(train_set.labels, cfg.val_fraction, seed=cfg.seed)]


def _split_params(params: dict[str, Any], cfg: TuneConfig) -> tuple[str, dict, dict]:
    """Trial values -> (architecture, model options, training options)."""
    model = params.get("model", cfg.model)
    options = dict(cfg.model_options)
    train = {}
    for key, value in params.items():
        if key == "model":
            continue
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in ("width", "depth"):
            continue
        else:
            options[key] = value
    if "width" in params or "depth" in params:
        options["hidden"] = [int(params.get("width", 100))] * int(params.get("depth", 1))
    return model, options, train


def _schedule(train: dict) -> str | dict | None:
    name = train.get("schedule")
    if name in (None, "none", "constant"):
        return None
    if "lr_decay" in train or "step_size" in train:
        spec = {"name": name}
        if "lr_decay" in train:
            spec["gamma"] = float(train["lr_decay"])
        if "step_size" in train:
            spec["step_size"] = float(train["step_size"])
        return spec
    return name


def train_classifier(cfg: TuneConfig, params: dict[str, Any], train_set, validation=None, callbacks: Sequence = ()):
    """Build the model ``params`` describe and train it with ``Classifier.fit`` (the one engine)."""
    from imclass.train import Classifier
    from imclass.workflows.training import _create_model

    model_name, options, train = _split_params(params, cfg)
    if model_name == "knn":
        raise ValueError("model 'knn' cannot be searched together with neural networks in one space")
    model = _create_model(model_name, train_set, options)
    clf = Classifier(model, classes=train_set.classes, device=cfg.device)
    optimizer = train.get("optimizer", "adam")
    clf.compile(
        optimizer, lr=float(train.get("lr", 1e-3)), weight_decay=float(train.get("weight_decay", 0.0)),
        momentum=float(train.get("momentum", 0.9)), nesterov=bool(train.get("nesterov", False)),
        l2=float(train.get("l2", 0.0)), label_smoothing=float(train.get("label_smoothing", 0.0)),
        schedule=_schedule(train), warmup_epochs=float(train.get("warmup_epochs", 0)),
    )
    augment = train.get("augment", "none")
    clf.fit(train_set, epochs=cfg.epochs, batch_size=int(train.get("batch_size", 32)), validation=validation,
            augment=None if augment == "none" else augment, callbacks=list(callbacks), seed=cfg.seed, verbose=False)
    return clf


def _knn(params: dict[str, Any]):
    from imclass.knn import KNN

    unknown = sorted(set(params) - set(KNN_KEYS))
    if unknown:
        raise ValueError(f"k-NN searches {list(KNN_KEYS)}, received parameter(s) {unknown}")
    return KNN(k=int(params.get("k", 1)), metric=params.get("metric", "l2"), weights=params.get("weights", "uniform"))


class _Objective:
    """The value of one trial: mean validation accuracy over the folds (training split only)."""

    def __init__(self, cfg: TuneConfig, space: dict[str, Param]) -> None:
        self.cfg = cfg
        self.space = space
        self.train_set = _load_train(cfg)
        self.folds = _folds(cfg, self.train_set)

    def __call__(self, trial) -> float:
        params = suggest(self.space, trial)
        start = time.perf_counter()
        scores = []
        for i, (tr, va) in enumerate(self.folds):
            train_part, val_part = self.train_set.subset(tr), self.train_set.subset(va)
            if self.cfg.model == "knn":
                knn = _knn(params).fit(train_part.images, train_part.labels)
                scores.append(float(knn.score(val_part.images, val_part.labels)))
                trial.report(sum(scores) / len(scores), i + 1)
                if i + 1 < len(self.folds) and trial.should_prune():
                    raise _pruned(trial, i + 1, scores)
                continue
            pruning = PruningCallback(trial, "val_accuracy", step_offset=i * self.cfg.epochs,
                                      last_step=len(self.folds) * self.cfg.epochs)
            clf = train_classifier(self.cfg, params, train_part, validation=(val_part.images, val_part.labels),
                                   callbacks=[pruning])
            scores.append(float(clf.history["val_accuracy"][-1]))
            trial.set_user_attr("val_accuracy_folds", scores)
            pruning.raise_if_pruned()
        trial.set_user_attr("val_accuracy_folds", scores)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return sum(scores) / len(scores)


def _pruned(trial, step: int, scores: list[float]):
    import optuna

    trial.set_user_attr("val_accuracy_folds", scores)
    return optuna.TrialPruned(f"pruned after fold {step}")


# --------------------------------------------------------------------------------------------
# the study

def _storage(cfg: TuneConfig):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = cfg.storage_url
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # several workers write to one file
    import sqlalchemy.exc

    try:
        for attempt in range(3):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, heartbeat_interval=max(1, round(cfg.heartbeat)),
                                      grace_period=max(2, round(3 * cfg.heartbeat)),
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                                      **kwargs)
            except sqlalchemy.exc.IntegrityError:  # another worker created the tables at the same moment
                if attempt == 2:
                    raise
                time.sleep(1.0)
    except (ImportError, ModuleNotFoundError) as err:
        raise ImportError(f"storage {url!r} needs a database driver that is not installed: {err}") from None
    except optuna.exceptions.StorageInternalError as err:
        raise ValueError(f"cannot open the study storage {url!r}: {err}") from None


def _pruner(cfg: TuneConfig):
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    steps = cfg.epochs * max(1, cfg.cv) if cfg.model != "knn" else max(1, cfg.cv)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, steps))
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def open_study(cfg: TuneConfig, worker: int = 0):
    """Create or load the study ``cfg`` names (direction: maximise validation accuracy)."""
    import optuna
    from imclass.data.loader import derive_seed

    storage = _storage(cfg)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="maximize",
                                load_if_exists=True, pruner=_pruner(cfg))
    # a sampler seed of its own per worker and per restart: a resumed study draws new values
    seed = derive_seed(cfg.seed, worker, len(study.trials)) % 2**31
    study.sampler = optuna.samplers.TPESampler(seed=seed) if cfg.sampler == "tpe" else \
        optuna.samplers.RandomSampler(seed=seed)
    return study


def fail_orphaned_trials(study, grace: float) -> list[int]:
    """Fail (and retry, through the storage's stale-trial callback) the trials a killed process left
    RUNNING: Optuna's heartbeat check covers those with a heartbeat; a process killed between creating
    a trial and its first heartbeat leaves one with none, which only its age (over ``grace`` s) betrays.
    Returns the numbers of the trials failed."""
    import copy
    from datetime import datetime

    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # the RDB storage under Optuna's cache
    try:
        from optuna.storages._rdb import models
    except ImportError:  # another Optuna layout: its heartbeat check is all there is
        return []
    if not isinstance(rdb, optuna.storages.RDBStorage):
        return []
    with rdb.scoped_session() as session:
        beating = {tid for (tid,) in session.query(models.TrialHeartbeatModel.trial_id)}
    now, failed = datetime.now(), []
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if trial._trial_id in beating or started is None or (now - started).total_seconds() <= grace:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                if callback is not None:
                    callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it first
            pass
    return failed


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _optimize(cfg: TuneConfig, worker: int = 0, threads: int | None = None) -> None:
    """One worker: run trials until the study holds ``cfg.trials`` finished ones."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from imclass.train.state import TrainingDiverged

    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, worker)
    fail_orphaned_trials(study, grace=max(2, round(3 * cfg.heartbeat)))
    if _finished(study) >= cfg.trials:
        return
    objective = _Objective(cfg, cfg.resolved_space())
    stop = MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=cfg.trials - _finished(study) + 2 * cfg.workers, callbacks=[stop],
                       catch=(TrainingDiverged,), gc_after_trial=False)


def _worker_main(cfg: TuneConfig, worker: int, threads: int) -> None:
    _optimize(cfg, worker, threads)


def tune(cfg: TuneConfig) -> dict[str, Any]:
    """Run (or resume) the search ``cfg`` describes; write its outputs to ``cfg.out``; return the summary.

    Outputs in ``cfg.out``: ``study.db`` (unless ``storage``), ``best.json``, ``trials.csv``, PNG plots
    (``history.png``, ``importances.png``, ``params.png``) and, with ``final``, ``model.safetensors``:
    the best parameters retrained on the whole training split, with its test accuracy in the summary.
    With ``report`` (a folder), the final model's evaluation report on the test split is written there
    (``imclass.evaluate.report``; ``report.html`` with the tuning section: best parameters, top trials,
    these plots), as ``imclass evaluate OUT DATASET --report DIR`` would write it.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.resolved_space()  # a bad space fails before any worker starts
    procs = []
    if cfg.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, torch.get_num_threads() // cfg.workers)
        open_study(cfg)  # created once, before workers race to create it
        procs = [ctx.Process(target=_worker_main, args=(cfg, w, threads), daemon=False) for w in range(1, cfg.workers)]
        for p in procs:
            p.start()
        _optimize(cfg, 0, threads)
    else:
        _optimize(cfg)
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    study = open_study(cfg)
    fail_orphaned_trials(study, grace=max(2, round(3 * cfg.heartbeat)))
    summary = _summarise(study, cfg)
    if failed:
        summary["worker_errors"] = f"{len(failed)} worker process(es) ended with an error (exit codes {failed})"
    summary["files"] = {"trials": str(out / "trials.csv"), **_plots(study, out)}
    if cfg.final and summary["best_params"] is not None:
        summary.update(_final(cfg, summary["best_params"], out))
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    if cfg.report is not None and "model_file" in summary:
        summary["files"]["report"] = _report(cfg, Path(summary["model_file"]))
        (out / "best.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def _report(cfg: TuneConfig, model_file: Path) -> str:
    """The evaluation report of the final model on the test split (read again, after the search)."""
    from imclass.evaluate.report import report

    numbers = report(model_file, _load_test(cfg), cfg.report, tuning=model_file.parent, progress=False)
    return str(Path(cfg.report) / numbers["files"]["html"])


def _summarise(study, cfg: TuneConfig) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    _write_trials_csv(trials, Path(cfg.out) / "trials.csv")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study": cfg.study_name,
        "storage": cfg.storage_url,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "selection": f"{cfg.cv}-fold cross-validation" if cfg.cv else f"validation split {cfg.val_fraction:g}",
        "trials": counts,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else None,
        "val_accuracy": float(best.value) if best else None,
    }


def _write_trials_csv(trials, path: Path) -> None:
    names = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "val_accuracy", "seconds", *names])
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
                if t.datetime_complete and t.datetime_start else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.6f}",
                             f"{seconds:.2f}" if seconds != "" else "", *[t.params.get(n, "") for n in names]])


def _plots(study, out: Path) -> dict[str, str]:
    """Optimisation history, parameter importances, accuracy against each parameter (Optuna's
    matplotlib plots); a plot that cannot be drawn yet (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    files = {}
    plots = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
             "params": ovm.plot_slice}
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of fewer than 2 trials
                continue
        axes = ax.ravel().tolist() if hasattr(ax, "ravel") else [ax]
        if not axes or not axes[0].has_data():
            plt.close(axes[0].figure if axes else "all")
            continue
        fig = axes[0].figure
        if name != "importances":
            axes[0].set_ylabel("validation accuracy")
        if name != "params":  # the slice plot's colour bar keeps Optuna's own layout
            fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        files[name] = str(out / f"{name}.png")
    return files


def _final(cfg: TuneConfig, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Retrain the best parameters on the whole training split; the one read of the test split."""
    from imclass.model_file.save import save

    train_set = _load_train(cfg)
    test_set = _load_test(cfg)
    start = time.perf_counter()
    if cfg.model == "knn":
        predictor = _knn(params).fit(train_set.images, train_set.labels)
        test_accuracy = float(predictor.score(test_set.images, test_set.labels))
        model_file = save(predictor, out / "model.safetensors", classes=train_set.classes,
                          input_size=list(train_set.image_shape), metrics={"test_accuracy": test_accuracy})
    else:
        clf = train_classifier(cfg, params, train_set)
        test_accuracy = float(clf.evaluate(test_set)["accuracy"])
        model_file = save(clf, out / "model.safetensors", input_size=list(train_set.image_shape),
                          train_config={"tune": dataclasses.asdict(cfg) | {"space": None}, "params": params},
                          metrics={"test_accuracy": test_accuracy, "epochs": cfg.epochs})
    return {"test_accuracy": test_accuracy, "test_images": len(test_set), "final_seconds": time.perf_counter() - start,
            "model_file": str(model_file)}

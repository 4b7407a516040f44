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

Search spaces (dicts, or YAML/TOML/JSON files) and the names they may use are described in
:mod:`imclass.tuning.space`.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imclass import data as imdata
from imclass.data.catalog import scratch_image_size
from imclass.data.progress import Progress
from imclass.data.split import split_indices
from imclass.evaluate.report import report
from imclass.evaluate.tune_folder import SUMMARY_FILE, TRIALS_FILE, plot_file, write_trials_csv
from imclass.knn import KNN
from imclass.model_file.save import save
from imclass.train import Classifier
from imclass.train.state import TrainingDiverged
from imclass.tuning.config import TuneConfig
from imclass.tuning.space import DEFAULT_SPACES, KNN_KEYS, TRAIN_KEYS, Param, load_space, parse_space, suggest
from imclass.tuning.study import fail_orphaned_trials, finished_trials, open_study
from imclass.visualize.plots import pyplot
from imclass.workflows.training import create_model

# Deferred imports (inside functions), for start-up time: matplotlib.ticker, optuna, optuna.study, optuna.trial, optuna.visualization, sklearn.model_selection
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = [
    "DEFAULT_SPACES", "Param", "PruningCallback", "TuneConfig", "load_space", "parse_space", "suggest", "tune",
]


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


class EpochTicks:
    """Engine callback: one step of a :class:`~imclass.data.progress.Progress` per finished epoch."""

    order = 70

    def __init__(self, bar: Progress) -> None:
        self.bar = bar

    def on_epoch_end(self, state) -> None:
        self.bar.update(1)


# --------------------------------------------------------------------------------------------
# one trial

def _load_train(cfg: TuneConfig):
    # --limit: a seeded, stratified sample of the split (imclass.data.split.limit_indices)
    return imdata.load(cfg.dataset, split="train", root=cfg.data_root, limit=cfg.limit,
                       image_size=scratch_image_size(cfg.dataset, cfg.image_size),
                       seed=cfg.seed or 0, mode=cfg.data_mode)


def _load_test(cfg: TuneConfig):
    """The test split: read only by the final evaluation, never during the search."""
    return imdata.load(cfg.dataset, split="test", root=cfg.data_root, limit=cfg.limit,
                       image_size=scratch_image_size(cfg.dataset, cfg.image_size),
                       seed=cfg.seed or 0, mode=cfg.data_mode)


def _folds(cfg: TuneConfig, train_set) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train indices, validation indices) pairs: one seeded stratified split, or ``cv`` folds."""
    if cfg.cv:
        from sklearn.model_selection import StratifiedKFold

        labels = train_set.labels.numpy()
        kfold = StratifiedKFold(n_splits=cfg.cv, shuffle=True, random_state=cfg.seed)
        return [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in kfold.split(labels, labels)]
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
    model_name, options, train = _split_params(params, cfg)
    if model_name == "knn":
        raise ValueError("model 'knn' cannot be searched together with neural networks in one space")
    model = create_model(model_name, len(train_set.classes), train_set.image_shape, options)
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
        knn = self.cfg.model == "knn"
        with Progress(len(self.folds) * (1 if knn else self.cfg.epochs), f"trial {trial.number}",
                      unit="folds" if knn else "epochs", verbose=self.cfg.progress) as bar:
            scores = self._scores(trial, params, bar)
        trial.set_user_attr("val_accuracy_folds", scores)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return sum(scores) / len(scores)

    def _scores(self, trial, params: dict[str, Any], bar: Progress) -> list[float]:
        """Validation accuracy per fold (raises ``optuna.TrialPruned`` when the pruner stops the trial)."""
        scores: list[float] = []
        for i, (tr, va) in enumerate(self.folds):
            train_part, val_part = self.train_set.subset(tr), self.train_set.subset(va)
            if self.cfg.model == "knn":
                knn = _knn(params).fit(train_part.images, train_part.labels)
                scores.append(float(knn.score(val_part.images, val_part.labels)))
                bar.update(1)
                trial.report(sum(scores) / len(scores), i + 1)
                if i + 1 < len(self.folds) and trial.should_prune():
                    raise _pruned(trial, i + 1, scores)
                continue
            pruning = PruningCallback(trial, "val_accuracy", step_offset=i * self.cfg.epochs,
                                      last_step=len(self.folds) * self.cfg.epochs)
            clf = train_classifier(self.cfg, params, train_part, validation=(val_part.images, val_part.labels),
                                   callbacks=[pruning, EpochTicks(bar)])
            scores.append(float(clf.history["val_accuracy"][-1]))
            trial.set_user_attr("val_accuracy_folds", scores)
            pruning.raise_if_pruned()
        return scores


def _pruned(trial, step: int, scores: list[float]):
    import optuna

    trial.set_user_attr("val_accuracy_folds", scores)
    return optuna.TrialPruned(f"pruned after fold {step}")




def _optimize(cfg: TuneConfig, worker: int = 0, threads: int | None = None) -> None:
    """One worker: run trials until the study holds ``cfg.trials`` finished ones."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, worker)
    fail_orphaned_trials(study, grace=max(2, round(3 * cfg.heartbeat)))
    if finished_trials(study) >= cfg.trials:
        return
    objective = _Objective(cfg, cfg.resolved_space())
    stop = MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    callbacks = [stop, say_trial] if cfg.progress else [stop]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=cfg.trials - finished_trials(study) + 2 * cfg.workers, callbacks=callbacks,
                       catch=(TrainingDiverged,), gc_after_trial=False)


def say_trial(study, trial) -> None:
    """Optuna callback: one line on stderr per finished trial (its validation accuracy or why it stopped,
    its parameters, the best so far)."""
    from optuna.trial import TrialState

    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        what = f"validation accuracy {trial.value:.2%} (best {best.value:.2%}, trial {best.number})"
    else:
        what = trial.state.name.lower()
    print(f"trial {trial.number}: {what}; {params}", file=sys.stderr, flush=True)


def _worker_main(cfg: TuneConfig, worker: int, threads: int) -> None:
    _optimize(cfg, worker, threads)


def tune(cfg: TuneConfig) -> dict[str, Any]:
    """Run (or resume) the search ``cfg`` describes; write its outputs to ``cfg.out``; return the summary.

    Outputs in ``cfg.out``: ``study.db`` (unless ``storage``), ``best.json``, ``trials.csv``, PNG plots
    (``history.png``, ``importances.png``, ``params.png``) and, with ``final``, ``model.safetensors``:
    the best parameters retrained on the whole training split, with its test accuracy in the summary.
    With ``report`` (a folder), the final model's evaluation report on the test split is written there
    (``imclass.evaluate.report``; ``report.html`` with the tuning section: best parameters, top trials,
    these plots), as ``imclass evaluate OUT DATA --report DIR`` would write it.
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
    summary["files"] = {"trials": str(out / TRIALS_FILE), **_plots(study, out)}
    if cfg.final and summary["best_params"] is not None:
        summary.update(_final(cfg, summary["best_params"], out))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    if cfg.report is not None and "model_file" in summary:
        summary["files"]["report"] = _report(cfg, Path(summary["model_file"]))
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def _report(cfg: TuneConfig, model_file: Path) -> str:
    """The evaluation report of the final model on the test split (read again, after the search)."""
    numbers = report(model_file, _load_test(cfg), cfg.report, tuning=model_file.parent, progress=False)
    return str(Path(cfg.report) / numbers["files"]["html"])


def _summarise(study, cfg: TuneConfig) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    write_trials_csv(trials, Path(cfg.out) / TRIALS_FILE)
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


def _plots(study, out: Path) -> dict[str, str]:
    """Optimisation history, parameter importances, accuracy against each parameter (Optuna's
    matplotlib plots); a plot that cannot be drawn yet (too few trials) is skipped."""
    plt = pyplot()
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
        if name == "params":
            _readable_slices(fig, axes, study)
        if name == "importances":
            _importance_caveat(axes[0], study)
        if name != "params":  # the slice plot's colour bar keeps Optuna's own layout
            fig.tight_layout()
        fig.savefig(plot_file(out, name), dpi=100, bbox_inches="tight")
        plt.close(fig)
        files[name] = str(plot_file(out, name))
    return files


IMPORTANCE_TRIALS = 20  # fewer complete trials: the importances are a rough guess, and the plot says so


def _complete(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _readable_slices(fig, axes: list, study) -> None:
    """Optuna's slice plot made readable: at most 4 labelled ticks per axis (no overlapping minor labels
    on log axes), whole numbers on integer parameters and on the trial colour bar, a plain title."""
    from matplotlib.ticker import MaxNLocator, NullLocator

    kinds: dict[str, set] = {}
    for t in study.get_trials(deepcopy=False):
        for name, v in t.params.items():
            kinds.setdefault(name, set()).add(type(v))
    for ax in fig.axes:
        if ax not in axes:  # the colour bar: trial numbers are whole
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            continue
        kind = kinds.get(ax.get_xlabel(), set())
        if str in kind or bool in kind:  # a categorical parameter: Optuna's category ticks stay
            continue
        if ax.get_xscale() == "log":  # three ticks spread over the range, short labels, no minor labels
            lo, hi = ax.get_xlim()
            ticks = np.geomspace(lo, hi, 5)[1:-1]
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ticks, [str(round(t)) if kind == {int} else f"{t:.2g}" for t in ticks])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(3, integer=kind == {int}))  # 3 bins: at most 4 ticks
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"validation accuracy against each parameter ({len(study.trials)} trials; colour: trial number)")


def _importance_caveat(ax, study) -> None:
    """Importances from few trials are noise: say so on the plot."""
    n = _complete(study)
    title = f"parameter importances (fANOVA, {n} complete trials)"
    if n < IMPORTANCE_TRIALS:
        title += f"\nfewer than {IMPORTANCE_TRIALS} trials: a rough guess, not a ranking to trust"
    ax.set_title("", loc="left")  # Optuna's own title
    if ax.get_legend() is not None:  # "Objective Value": one series, and it covered the lowest bar
        ax.get_legend().remove()
    ax.set_title(title, loc="left", fontsize=10, color="tab:red" if n < IMPORTANCE_TRIALS else "black")


def _final(cfg: TuneConfig, params: dict[str, Any], out: Path) -> dict[str, Any]:
    """Retrain the best parameters on the whole training split; the one read of the test split."""
    train_set = _load_train(cfg)
    test_set = _load_test(cfg)
    start = time.perf_counter()
    if cfg.model == "knn":
        predictor = _knn(params).fit(train_set.images, train_set.labels)
        test_accuracy = float(predictor.score(test_set.images, test_set.labels))
        model_file = save(predictor, out / "model.safetensors", classes=train_set.classes,
                          input_size=list(train_set.image_shape), metrics={"test_accuracy": test_accuracy})
    else:
        with Progress(cfg.epochs, "final retraining on the whole training split", unit="epochs",
                      verbose=cfg.progress) as bar:
            clf = train_classifier(cfg, params, train_set, callbacks=[EpochTicks(bar)])
        test_accuracy = float(clf.evaluate(test_set)["accuracy"])
        model_file = save(clf, out / "model.safetensors", input_size=list(train_set.image_shape),
                          train_config={"tune": dataclasses.asdict(cfg) | {"space": None}, "params": params},
                          metrics={"test_accuracy": test_accuracy, "epochs": cfg.epochs})
    return {"test_accuracy": test_accuracy, "test_images": len(test_set), "final_seconds": time.perf_counter() - start,
            "model_file": str(model_file)}
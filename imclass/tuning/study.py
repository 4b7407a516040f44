"""The Optuna study behind ``imclass tune``: its storage (SQLite beside the outputs, or a database URL
shared by workers on several machines), pruner and sampler, and the trials a killed process left."""
from __future__ import annotations

import copy
import time
import warnings
from datetime import datetime
from typing import Any

from imclass.data.loader import derive_seed
from imclass.tuning.config import TuneConfig

# Deferred imports (inside functions), for start-up time: optuna, optuna.storages, optuna.trial
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["fail_orphaned_trials", "finished_trials", "open_study"]


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


def finished_trials(study) -> int:
    """How many trials of ``study`` are over (complete or pruned)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

"""``imclass tune``: hyperparameter search with Optuna (``imclass.tuning.search``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import (
    DATA_HELP,
    USER_ERRORS,
    DataRoot,
    data_argument,
    data_mode_option,
    dataset_alias,
    fail,
    limit_option,
    pick_data,
    plain_warnings,
    print_json,
)
from imclass.data.catalog import FOLDER_IMAGE_SIZE

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``tune`` to ``app``."""
    app.command("tune")(tune)


def tune(
    model: str = typer.Option("mlp", "--model", help="Architecture to tune (imclass models list), or knn."),
    data: Optional[str] = data_argument(help=DATA_HELP + " Default: cifar10."),
    dataset: Optional[str] = dataset_alias(),
    data_root: Optional[str] = DataRoot,
    limit: Optional[int] = limit_option(),
    data_mode: Optional[str] = data_mode_option(
        help="Where a folder's images live: memory or cache (a memory-mapped file of the resized images on disk, "
        "reused by later runs; each fold's rows are read from it). Default: chosen and said on stderr."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to N x N (default for a "
                                             f"folder: {FOLDER_IMAGE_SIZE}; a named data set keeps its size)."),
    epochs: int = typer.Option(3, "--epochs", help="Epochs per trial (and for the final retraining)."),
    trials: int = typer.Option(20, "--trials", help="Finished trials the study should hold (a rerun adds the rest)."),
    space: Optional[Path] = typer.Option(None, "--space", help="Search space file (.yaml, .toml, .json)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)."),
    study_name: str = typer.Option("imclass-tune", "--study", help="Study name inside the storage."),
    workers: int = typer.Option(1, "--workers", help="Worker processes on this machine sharing the study."),
    search: str = typer.Option("tpe", "--search", help="How Optuna picks the next trial: tpe (default) or random. "
                               "(Class balancing is `imclass train --sampler`.)"),
    sampler: Optional[str] = typer.Option(None, "--sampler", hidden=True, help="Deprecated spelling of --search."),
    pruner: str = typer.Option("median", "--pruner", help="median (default), hyperband or none."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation part of the training split."),
    cv: int = typer.Option(0, "--cv", help="k-fold cross-validation with this many folds instead of one split."),
    model_option: Optional[List[str]] = typer.Option(None, "--model-option", help="Fixed model option KEY=VALUE."),
    seed: int = typer.Option(0, "--seed", help="Seed of the splits, the sampler and the training runs."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda."),
    heartbeat: float = typer.Option(10.0, "--heartbeat", help="Seconds between a trial's heartbeats; a trial "
                                    "silent for 3 is failed and its parameters retried."),
    final: bool = typer.Option(True, "--final/--no-final", help="Retrain the best parameters and test them."),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="Folder of the study, tables, plots and best model."),
    report_dir: Optional[Path] = typer.Option(
        None, "--report", help="Also write the final model's evaluation report on the test split into DIR "
        "(report.html with a tuning section: best params, top 10 trials, the plots); needs --final."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (best params, val accuracy, ...)."),
) -> None:
    """Search hyperparameters on a validation split (or k-fold CV) with Optuna; the test split is read
    only to evaluate the best parameters at the end. Rerunning the same command resumes the study.

    --report DIR (or `imclass evaluate OUT DATA --report DIR` later) writes
    the final model's evaluation report, with a tuning section: best params,
    top trials, plots.
    """
    dataset = pick_data(data, dataset, "cifar10")
    from imclass.cli.train import parse_model_options
    from imclass.tuning.search import TuneConfig
    from imclass.tuning.search import tune as run_tune

    try:
        cfg = TuneConfig(
            model=model, dataset=dataset, data_root=data_root, limit=limit, image_size=image_size, data_mode=data_mode,
            epochs=epochs, trials=trials,
            space=str(space) if space is not None else None, storage=storage, study_name=study_name,
            out=str(out), workers=workers, sampler=_search(search, sampler), pruner=pruner, val_fraction=val_fraction, cv=cv,
            seed=seed, device=device, heartbeat=heartbeat, final=final,
            report=str(report_dir) if report_dir is not None else None,
            model_options=parse_model_options(model_option or []), progress=not as_json,
        )
        with plain_warnings():
            result = run_tune(cfg)
    except KeyboardInterrupt:
        fail(f"interrupted; the study in {out} keeps its finished trials: run the same command to resume", code=130)
    except USER_ERRORS as err:
        fail(str(err))
    if as_json:
        print_json(result)
        return
    if result["best_params"] is None:
        fail(f"no trial completed ({result['trials']}); see {out / 'trials.csv'}", code=1)
    typer.echo(f"best trial {result['best_trial']}: validation accuracy {result['val_accuracy']:.2%} "
               f"({result['selection']}); trials {json.dumps(result['trials'])}")
    typer.echo(f"best params {json.dumps(result['best_params'])}")
    if "test_accuracy" in result:
        typer.echo(f"test accuracy {result['test_accuracy']:.2%} on {result['test_images']:,} test images "
                   f"(best params retrained on the whole training split); saved {result['model_file']}")
    typer.echo(f"study, trials.csv and plots in {out}")
    if "report" in result["files"]:
        typer.echo(f"report: {result['files']['report']}")


def _search(search: str, sampler: Optional[str]) -> str:
    """``--search`` (the Optuna sampler); the old spelling ``--sampler`` still works, with a note."""
    if sampler is None:
        return search
    typer.secho("warning: `imclass tune --sampler` is now --search (--sampler means class balancing in train)",
                fg=typer.colors.YELLOW, err=True)
    return sampler

"""The folder ``imclass tune --out DIR`` leaves, in one place: what is written (``best.json``, the
summary; ``trials.csv``, one row per trial; the study's plots) and how the evaluation report reads
it back (``tuning_folder``, ``read_tuning``). ``imclass.tuning`` writes it; ``imclass.evaluate.report``
reads it."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "SUMMARY_FILE", "TOP_TRIALS", "TRIALS_FILE", "TRIAL_COLUMNS", "param_value", "plot_file",
           "read_tuning", "top_trials", "tuning_folder", "write_trials_csv"]

SUMMARY_FILE = "best.json"  # the search's summary (best parameters, accuracies, files), beside the model file
TRIALS_FILE = "trials.csv"
TRIAL_COLUMNS = ("number", "state", "val_accuracy", "seconds")  # then one column per parameter
PLOTS = {"history": "optimisation history", "importances": "parameter importances",
         "params": "validation accuracy against each parameter"}
TOP_TRIALS = 10


def plot_file(folder: Path, name: str) -> Path:
    """Where the study's plot ``name`` (a key of ``PLOTS``) lives in a tune folder."""
    return Path(folder) / f"{name}.png"


def write_trials_csv(trials: Any, path: Path) -> None:
    """``trials.csv``: one row per trial (Optuna ``FrozenTrial``s): number, state, validation accuracy,
    seconds, then one column per parameter."""
    names = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*TRIAL_COLUMNS, *names])
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
                if t.datetime_complete and t.datetime_start else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.6f}",
                             f"{seconds:.2f}" if seconds != "" else "", *[t.params.get(n, "") for n in names]])


def tuning_folder(run: str | os.PathLike) -> Path | None:
    """The ``imclass tune`` out folder a run folder or model file belongs to, or ``None``.

    ``imclass tune --out DIR`` writes ``DIR/model.safetensors`` beside ``DIR/best.json``: a run folder
    holding ``best.json``, or a model file whose folder holds one naming it (``model_file``), is a tune's.
    """
    run = Path(run)
    folder = run if run.is_dir() else run.parent
    summary = folder / SUMMARY_FILE
    if not summary.is_file():
        return None
    if not run.is_dir():
        try:
            named = json.loads(summary.read_text()).get("model_file")
        except (json.JSONDecodeError, AttributeError):
            return None
        if named and Path(named).name != run.name:
            return None  # another model file of the same folder
    return folder


def read_tuning(folder: Path, out: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tuning numbers (from ``best.json`` and ``trials.csv``) and its plots copied into ``out``."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: expected the {SUMMARY_FILE} that `imclass tune` writes, found none")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    trials = top_trials(folder / TRIALS_FILE, TOP_TRIALS)
    plots = {}
    for name in PLOTS:
        source = plot_file(folder, name)
        if source.is_file() and source.stat().st_size > 0:
            plots[f"tune_{name}"] = shutil.copyfile(source, out / f"tune_{name}.png").name
    keys = ("model", "dataset", "selection", "trials", "best_trial", "best_params", "val_accuracy",
            "test_accuracy", "test_images", "study", "storage")
    numbers = {k: summary.get(k) for k in keys}
    numbers.update({"folder": str(folder), "top_trials": trials["top"], "trials_listed": trials["listed"]})
    return numbers, plots


def top_trials(path: Path, n: int) -> dict[str, Any]:
    """The ``n`` trials of ``trials.csv`` with the highest validation accuracy (ties: the earlier trial)."""
    if not path.is_file():
        return {"top": [], "listed": 0}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fixed = TRIAL_COLUMNS
    scored = []
    for row in rows:
        if row.get("val_accuracy") in (None, ""):
            continue
        params = {k: param_value(v) for k, v in row.items() if k not in fixed and v not in (None, "")}
        scored.append({"number": int(row["number"]), "state": row["state"], "val_accuracy": float(row["val_accuracy"]),
                       "seconds": float(row["seconds"]) if row.get("seconds") else None, "params": params})
    scored.sort(key=lambda t: (-t["val_accuracy"], t["number"]))
    return {"top": scored[:n], "listed": len(rows)}


def param_value(text: str) -> Any:
    """A trials.csv cell as the number it holds, else the text (a categorical choice)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

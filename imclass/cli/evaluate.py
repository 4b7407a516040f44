"""``imclass evaluate``: accuracy, loss and per-class figures of a saved model on a data set split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from imclass.cli._common import (
    USER_ERRORS,
    data_mode_option,
    DataRoot,
    TTAOption,
    data_argument,
    dataset_alias,
    fail,
    limit_option,
    load_saved,
    pick_data,
    plain_warnings,
    print_json,
)

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``evaluate`` to ``app``."""
    app.command("evaluate")(evaluate)


def evaluate(
    run: Path = typer.Argument(..., help="Run folder or .safetensors model file."),
    data: Optional[str] = data_argument(),
    dataset: Optional[str] = dataset_alias(),
    split: str = typer.Option("test", "--split", help="Which split to evaluate on."),
    data_root: Optional[str] = DataRoot,
    limit: Optional[int] = limit_option(),
    data_mode: Optional[str] = data_mode_option(),
    confusion: bool = typer.Option(False, "--confusion", help="Also print the confusion matrix."),
    tta: Optional[bool] = TTAOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    mistakes: Optional[Path] = typer.Option(
        None, "--mistakes", help="Write every misclassified image to this CSV file: path, given, predicted, "
        "probability (of the predicted class), loss (-log of the given class's probability); worst first."),
    report_dir: Optional[Path] = typer.Option(
        None, "--report", help="Also write the evaluation report into DIR (report.html, report.json, PNGs); "
        "for a model of `imclass tune` (RUN holds best.json) it has a tuning section: best params, top trials, plots."),
) -> None:
    """Accuracy, loss and per-class accuracy of a saved model on a data set split.

    The test-time augmentation recorded in the model file is applied unless --no-tta says
    otherwise, so the figure equals the one `imclass train` printed; the output names it.

    With --report, a model of `imclass tune` (its --out folder, or the model
    file in it) gets a tuning section: best parameters, the 10 best trials and
    the optimisation plots.
    """
    dataset = pick_data(data, dataset, required=True)
    from imclass import data as imdata

    try:
        if limit is not None and limit < 1:
            raise ValueError(f"expected --limit >= 1, received {limit}")
        saved = load_saved(run)
        size = saved.input_size
        pre = getattr(saved.predictor, "preprocessing", None)  # a pretrained backbone's resize + centre crop
        with plain_warnings():
            if pre is not None:
                from imclass.transfer.workflow import load_for

                data = load_for(dataset, pre, split=split, root=data_root, limit=limit, mode=data_mode)
            else:
                data = imdata.load(dataset, split=split, root=data_root, image_size=tuple(size[1:]) if size else None,
                                   limit=limit, mode=data_mode, reserve=saved.memory_reserve())
        if saved.classes is not None and len(saved.classes) != data.num_classes:
            raise ValueError(
                f"{run}: the model knows {len(saved.classes)} classes but {dataset} has {data.num_classes}"
            )
        tta_used = saved.resolve_tta(tta)
        if report_dir is not None:  # one pass gives the report and the figures below
            report = _from_report(saved, data, tta_used, run, report_dir)
        else:
            report = _evaluate(saved.predictor, data, tta_used)
        if mistakes is not None:
            report["mistakes_file"] = str(mistakes)
            report["mistakes"] = write_mistakes(saved, data, tta_used, mistakes)
    except USER_ERRORS as err:
        fail(str(err))
    report.update({"dataset": dataset, "split": split, "images": len(data), "tta": tta_used,
                   "data_mode": getattr(data, "mode", "memory")})
    if not confusion:
        report.pop("confusion_matrix")
    if as_json:
        print_json(report)
        return
    loss = f"  loss {report['loss']:.4f}" if report.get("loss") is not None else ""
    from imclass.data.folder import HELD_OUT, HELD_OUT_NOTE, split_word

    word = split_word(dataset, split)
    typer.echo(f"{dataset} {word} ({len(data):,} images): accuracy {report['accuracy']:.2%}{loss}  (tta: {tta_used})")
    if word == HELD_OUT:
        typer.echo(f"({HELD_OUT_NOTE})")
    width = max(len(c) for c in data.classes)
    for name, acc in report["per_class_accuracy"].items():
        typer.echo(f"  {name:<{width}}  {acc:>7.2%}" if acc is not None else f"  {name:<{width}}  (no images)")
    if confusion:
        typer.echo("confusion matrix (rows: true class, columns: predicted class):")
        cell = max(5, *(len(c) for c in data.classes))  # full class names as column headers, never cut
        typer.echo(f"  {'':<{width}}  " + " ".join(f"{c:>{cell}}" for c in data.classes))
        for name, row in zip(data.classes, report["confusion_matrix"]):
            typer.echo(f"  {name:<{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))
    if mistakes is not None:
        typer.echo(f"wrote {report['mistakes']} misclassified images to {mistakes}")


def write_mistakes(saved: Any, data, tta: str, path: Path) -> int:
    """Every misclassified image of ``data`` as a CSV row (path, given, predicted, probability, loss), highest
    loss first; returns how many. ``path`` is the image file (relative to the folder) when the data came from
    files, else ``<data set>/<split>/<index>``."""
    import csv

    import torch

    predictor = saved.predictor
    if hasattr(predictor, "predict_logits"):
        probs = predictor.predict_logits(data.images, tta=None if tta == "none" else tta).float().softmax(1)
        names = list(saved.classes or data.classes)
    else:  # a KNN: its probability columns follow its sorted training labels
        probs = torch.as_tensor(predictor.predict_proba(data.images)).float()
        names = saved.class_names(probs.shape[1])
        columns = [int(v) for v in predictor.classes_]
        full = torch.zeros(len(probs), data.num_classes)
        full[:, columns] = probs
        probs, names = full, list(saved.classes or data.classes)
    predicted = probs.argmax(1)
    given_p = probs[torch.arange(len(probs)), data.labels].clamp_min(1e-12)
    loss = -given_p.log()
    wrong = torch.nonzero(predicted != data.labels).flatten()
    order = wrong[torch.argsort(loss[wrong], descending=True)]
    paths = data.paths if getattr(data, "paths", None) is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "given", "predicted", "probability", "loss"])
        for i in order.tolist():
            where = paths[i] if paths is not None else f"{data.name or 'data'}/{data.split or 'test'}/{i}"
            out.writerow([where, names[int(data.labels[i])], names[int(predicted[i])],
                          f"{float(probs[i, predicted[i]]):.6f}", f"{float(loss[i]):.6f}"])
    return len(order)


def _from_report(saved: Any, data, tta: str, run: Path, out: Path) -> dict[str, Any]:
    """Write the evaluation report (imclass.evaluate.report) and return this command's figures from it."""
    from imclass.evaluate import report
    from imclass.evaluate.report import tuning_folder

    folder = run if run.is_dir() else run.parent
    history = folder / "history.csv"
    numbers = report(saved.predictor, data, out, classes=saved.classes or data.classes, tta=tta,
                     history=history if history.is_file() else None, title=folder.name, tuning=tuning_folder(run))
    typer.echo(f"report: {Path(out) / numbers['files']['html']}", err=True)
    return {
        "accuracy": numbers["accuracy"],
        "loss": numbers["loss"],
        "per_class_accuracy": {c: (v["recall"] if v["support"] else None) for c, v in numbers["per_class"].items()},
        "confusion_matrix": numbers["confusion_matrix"],
        "report": str(Path(out) / numbers["files"]["html"]),
    }


def _evaluate(predictor: Any, data, tta: str = "none") -> dict[str, Any]:
    import torch
    from sklearn.metrics import confusion_matrix

    loss = None
    if hasattr(predictor, "predict_logits"):  # a Classifier: one pass gives the loss and the predictions
        logits = predictor.predict_logits(data, tta=None if tta == "none" else tta).float().cpu()  # a batch at a time
        loss = torch.nn.functional.cross_entropy(logits, data.labels).item()
        predicted = logits.argmax(1)
    else:  # a KNN
        predicted = torch.as_tensor(predictor.predict(data.images)).cpu()
    n = data.num_classes
    cm = confusion_matrix(data.labels.numpy(), predicted.numpy(), labels=list(range(n)))
    support = cm.sum(axis=1)
    per_class = {
        name: (float(cm[i, i] / support[i]) if support[i] else None) for i, name in enumerate(data.classes)
    }
    return {
        "accuracy": (predicted == data.labels).double().mean().item(),
        "loss": loss,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }

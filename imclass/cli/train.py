"""``imclass train``, ``imclass evaluate`` and ``imclass predict``: the run-folder commands."""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import typer

from imclass.cli._common import DataRoot, fail, print_json
from imclass.data.download import DownloadError

# what bad input raises (an unknown name, a missing or corrupt file, data that cannot be fetched):
# reported as one `error: ...` line; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, DownloadError)


@contextlib.contextmanager
def plain_warnings():
    """Show Python warnings (e.g. "cifar10 test split has 1,000 of the official 10,000 images") as one
    `warning: ...` line on stderr, without the file and source line."""

    def show(message, category, filename, lineno, file=None, line=None):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def register(app: typer.Typer) -> None:
    """Add the top-level commands ``train``, ``evaluate`` and ``predict`` to ``app``."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)


# --------------------------------------------------------------------------------------------
# train


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML or JSON file of options (flags win)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture name (`imclass models list`)."),
    model_option: Optional[List[str]] = typer.Option(
        None, "--model-option", "-o", help="Extra model option KEY=VALUE (JSON value), repeatable."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", help="Fine-tune the model of this file or run folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="cifar10, mnist, fashion-mnist or a folder."),
    data_root: Optional[str] = DataRoot,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to SIZE x SIZE."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training and test images."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="Passes over the training set (default 10)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per step (default 32)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, adamw, sgd or rmsprop (default adam)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 1e-3)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default 0.9)."),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum (SGD)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="L2 weight decay (default 0)."),
    schedule: Optional[str] = typer.Option(
        None, "--schedule", help="Learning-rate schedule: step, exponential, cosine, onecycle, linear (default none)."
    ),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up epochs (default 0)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing (default 0)."),
    augment: Optional[str] = typer.Option(
        None, "--augment", help="none, flip, crop, crop_flip, crop_flip_cutout (default none)."
    ),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Hold out this fraction for validation."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<model>-<dataset>)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, mps (default auto)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'fast': the fast CIFAR-10 recipe."),
    target: Optional[int] = typer.Option(None, "--target", help="Fast recipe accuracy target: 90, 94 or 95."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (accuracy, loss, seconds, ...)."),
) -> None:
    """Train a model and save it to a run folder (model.safetensors, config.json, history, curves).

    With --dataset cifar10 and no --model, the fast CIFAR-10 recipe runs. `--out DIR --resume`
    alone continues the run in DIR with the config it saved (other flags override it).
    """
    from imclass.train.run import CONFIG_FILE, load_config, train_from_config

    if resume and config is None and out is not None and (Path(out) / CONFIG_FILE).is_file():
        config = Path(out) / CONFIG_FILE  # continue the run with its own config
    try:
        options = _parse_model_options(model_option or [])
        cfg = load_config(
            config,
            model=model,
            weights=weights,
            dataset=dataset,
            data_root=data_root,
            image_size=image_size,
            limit=limit,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing,
            augment=augment,
            val_fraction=val_fraction,
            seed=seed,
            out=out,
            resume=resume,
            device=device,
            recipe=recipe,
            target=target,
            verbose=False if as_json else None,
        )
        if options:
            cfg.model_options = {**cfg.model_options, **options}
        with plain_warnings():
            result = train_from_config(cfg)
    except KeyboardInterrupt:
        fail("interrupted; the run folder keeps the last checkpoint: add --resume to continue", code=130)
    except FloatingPointError as err:  # TrainingDiverged: a NaN or infinite loss
        fail(f"{err} (try a smaller --lr)")
    except USER_ERRORS as err:
        fail(str(err))
    if as_json:
        print_json(result)
    else:
        typer.echo(
            f"test accuracy {result['accuracy']:.2%} on {result['test_images']:,} test images, "
            f"loss {result['loss']:.4f}, {result['seconds']:.1f} s (training + evaluation); "
            f"saved {result['model_file']}"
        )


def _parse_model_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected --model-option KEY=VALUE, received {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare word: keep it as a string
    return options


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    run: Path = typer.Argument(..., help="Run folder or .safetensors model file."),
    dataset: str = typer.Argument(..., help="cifar10, mnist, fashion-mnist or an image folder."),
    split: str = typer.Option("test", "--split", help="Which split to evaluate on."),
    data_root: Optional[str] = DataRoot,
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N images."),
    confusion: bool = typer.Option(False, "--confusion", help="Also print the confusion matrix."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Accuracy, loss and per-class accuracy of a saved model on a data set split."""
    from imclass import data as imdata

    try:
        if limit is not None and limit < 1:
            raise ValueError(f"expected --limit >= 1, received {limit}")
        saved = load_saved(run)
        size = saved.input_size
        with plain_warnings():
            data = imdata.load(dataset, split=split, root=data_root, image_size=tuple(size[1:]) if size else None)
        if limit is not None:
            data = data.subset(slice(0, limit))
        if saved.classes is not None and len(saved.classes) != data.num_classes:
            raise ValueError(
                f"{run}: the model knows {len(saved.classes)} classes but {dataset} has {data.num_classes}"
            )
        report = _evaluate(saved.predictor, data)
    except USER_ERRORS as err:
        fail(str(err))
    report.update({"dataset": dataset, "split": split, "images": len(data)})
    if not confusion:
        report.pop("confusion_matrix")
    if as_json:
        print_json(report)
        return
    loss = f"  loss {report['loss']:.4f}" if report.get("loss") is not None else ""
    typer.echo(f"{dataset} {split} ({len(data)} images): accuracy {report['accuracy']:.4f}{loss}")
    width = max(len(c) for c in data.classes)
    for name, acc in report["per_class_accuracy"].items():
        typer.echo(f"  {name:<{width}}  {acc:.4f}" if acc is not None else f"  {name:<{width}}  (no images)")
    if confusion:
        typer.echo("confusion matrix (rows: true class, columns: predicted class):")
        for name, row in zip(data.classes, report["confusion_matrix"]):
            typer.echo(f"  {name:<{width}}  " + " ".join(f"{v:5d}" for v in row))


def _evaluate(predictor: Any, data) -> dict[str, Any]:
    import torch
    from sklearn.metrics import confusion_matrix

    loss = None
    if hasattr(predictor, "predict_logits"):  # a Classifier: one pass gives the loss and the predictions
        logits = predictor.predict_logits(data.images).float().cpu()
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


@dataclass
class Saved:
    """A loaded model file: the predictor, its class names and the input size (C, H, W) it expects."""

    predictor: Any
    classes: list[str] | None
    input_size: list[int] | None

    def class_names(self, n_columns: int) -> list[str]:
        """Names of the probability columns: a Classifier's are its classes; a KNN's are its sorted labels."""
        labels = getattr(self.predictor, "classes_", None)  # a KNN: columns follow its label values
        if labels is not None:
            labels = [int(v) for v in labels]
            return [self.classes[v] if self.classes and v < len(self.classes) else str(v) for v in labels]
        return list(self.classes) if self.classes else [str(i) for i in range(n_columns)]


def load_saved(run: Path) -> Saved:
    """Load a model file or run folder with the metadata the commands need (errors name the file)."""
    from imclass.io import load, read_metadata

    header = read_metadata(run)
    predictor = load(run)
    return Saved(predictor, header.get("classes"), (header.get("preprocessing") or {}).get("input_size"))


# --------------------------------------------------------------------------------------------
# predict


def predict(
    run: Path = typer.Argument(..., help="Run folder or .safetensors model file."),
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...)."),
    top: int = typer.Option(3, "--top", "-k", help="How many classes to show per image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Class names and probabilities for image files, using a saved model.

    An image that is missing or unreadable is reported and skipped; the others are still
    predicted (exit code 1 when any failed).
    """
    import torch

    from imclass.data import read_image

    if top < 1:
        fail(f"expected --top >= 1, received --top {top}")
    try:
        saved = load_saved(run)
    except USER_ERRORS as err:
        fail(str(err))
    size = saved.input_size
    results, errors = [], []
    batch, names = [], []
    for path in images:
        try:
            batch.append(read_image(path, size=tuple(size[1:]) if size else None, channels=size[0] if size else 3))
            names.append(str(path))
        except ValueError as err:
            errors.append({"image": str(path), "error": str(err)})
    if batch:
        try:
            if len({t.shape for t in batch}) == 1:
                probs = _probabilities(saved.predictor, torch.stack(batch))
            else:  # a model without a fixed input size, images of several sizes: one at a time
                probs = torch.cat([_probabilities(saved.predictor, t.unsqueeze(0)) for t in batch])
        except USER_ERRORS as err:
            fail(f"{run}: cannot predict these images: {err}")
        classes = saved.class_names(probs.shape[1])
        k = min(top, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for name, v, i in zip(names, values.tolist(), indices.tolist()):
            results.append({"image": name, "top": [{"class": classes[c], "probability": p} for p, c in zip(v, i)]})
    if as_json:
        print_json({"predictions": results, "errors": errors})
    else:
        for r in results:
            typer.echo(r["image"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
        for e in errors:
            typer.secho(f"error: {e['error']}", fg=typer.colors.RED, err=True)
    if errors:
        raise typer.Exit(1)


def _probabilities(predictor: Any, x):
    import torch

    if hasattr(predictor, "predict_proba"):
        return torch.as_tensor(predictor.predict_proba(x)).float().cpu()
    raise TypeError(f"expected a model with predict_proba, received {type(predictor).__name__}")

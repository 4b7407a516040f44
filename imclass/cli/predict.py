"""``imclass predict``: class names and probabilities for image files with a saved model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from imclass.cli._common import USER_ERRORS, TTAOption, fail, load_saved, print_json


def register(app: typer.Typer) -> None:
    """Add the top-level command ``predict`` to ``app``."""
    app.command("predict")(predict)


def predict(
    run: Path = typer.Argument(..., help="Run folder or .safetensors model file."),
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...)."),
    top: int = typer.Option(3, "--top", "-k", help="How many classes to show per image."),
    tta: Optional[bool] = TTAOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Class names and probabilities for image files, using a saved model (with the test-time
    augmentation its model file records, unless --no-tta).

    An image that is missing or unreadable is reported and skipped; the others are still
    predicted (exit code 1 when any failed).
    """
    import torch

    from imclass.data import read_image

    if top < 1:
        fail(f"expected --top >= 1, received --top {top}")
    try:
        saved = load_saved(run)
        tta_used = saved.resolve_tta(tta)
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
                probs = _probabilities(saved.predictor, torch.stack(batch), tta_used)
            else:  # a model without a fixed input size, images of several sizes: one at a time
                probs = torch.cat([_probabilities(saved.predictor, t.unsqueeze(0), tta_used) for t in batch])
        except USER_ERRORS as err:
            fail(f"{run}: cannot predict these images: {err}")
        classes = saved.class_names(probs.shape[1])
        k = min(top, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for name, v, i in zip(names, values.tolist(), indices.tolist()):
            results.append({"image": name, "top": [{"class": classes[c], "probability": p} for p, c in zip(v, i)]})
    if as_json:
        print_json({"predictions": results, "errors": errors, "tta": tta_used})
    else:
        for r in results:
            typer.echo(r["image"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
        typer.echo(f"(tta: {tta_used})", err=True)
        for e in errors:
            typer.secho(f"error: {e['error']}", fg=typer.colors.RED, err=True)
    if errors:
        raise typer.Exit(1)


def _probabilities(predictor: Any, x, tta: str = "none"):
    import torch

    if hasattr(predictor, "predict_logits"):  # a Classifier: softmax of the (TTA-averaged) logits
        return predictor.predict_proba(x, tta=None if tta == "none" else tta).float().cpu()
    if hasattr(predictor, "predict_proba"):
        return torch.as_tensor(predictor.predict_proba(x)).float().cpu()
    raise TypeError(f"expected a model with predict_proba, received {type(predictor).__name__}")

"""Transfer learning on the command line: ``imclass weights`` (the known pretrained weights and
where they are), and the helpers behind ``imclass train FOLDER [--backbone NAME]`` and
``imclass predict --backbone NAME IMAGE...``."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from imclass.cli._common import USER_ERRORS, fail, plain_warnings, print_json, time_line
from imclass.data.folder import HELD_OUT, HELD_OUT_NOTE, split_word

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

WeightsDir = typer.Option(None, "--weights-dir", help="Weights root (default: $IMCLASS_WEIGHTS, else ~/.cache/imclass/weights).")


def register(app: typer.Typer) -> None:
    """Add the top-level command ``weights`` to ``app``."""
    app.command("weights")(weights_command)


def weights_command(
    weights_dir: Optional[str] = WeightsDir,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The pretrained weights imclass knows by name, their files under the weights root, and their preprocessing."""
    from imclass.models.weights import KNOWN_WEIGHTS, find_known_weights, resolve_weights_root

    root = resolve_weights_root(weights_dir)
    rows = []
    for name, known in KNOWN_WEIGHTS.items():
        path = find_known_weights(name, weights_dir)
        rows.append({"backbone": name, "family": known.family, "file": str(root / known.path), "present": path is not None,
                     "preprocessing": known.preprocessing.to_dict(), "options": known.options})
    if as_json:
        print_json({"weights_root": str(root), "weights": rows})
        return
    typer.echo(f"weights root: {root}")
    for r in rows:
        pre = r["preprocessing"]
        typer.echo(f"  {r['backbone']:<16} {'found  ' if r['present'] else 'missing'} {r['file']}  "
                   f"(resize {pre['resize']}, crop {pre['crop']}, mean {pre['mean']}, std {pre['std']})")


# --------------------------------------------------------------------------------------------
# imclass train FOLDER [--backbone NAME]


def wants_transfer(*, dataset: str | None, model: str | None, weights: str | None, recipe: str | None,
                   backbone: str | None, config: Path | None) -> bool:
    """Whether ``imclass train`` should transfer: ``--backbone`` given, or a folder with no other choice."""
    if backbone is not None:
        return True
    if dataset is None or model is not None or weights is not None or recipe is not None or config is not None:
        return False
    return Path(dataset).expanduser().is_dir()


def run_transfer(*, dataset: str | None, backbone: str | None, weights: str | None, weights_dir: str | None,
                 head: str | None, image_size: int | None, freeze_epochs: int | None, epochs: int | None,
                 unfreeze: str | None, lr: float | None, batch_size: int | None, val_fraction: float | None,
                 seed: int | None, limit: int | None, out: str | None, cache_dir: str | None, as_json: bool,
                 fallback: Any = None, class_weight: Any = None, sampler: str | None = None,
                 pool_stages: int | None = None, feature_augment: str | None = None,
                 batch_norm: str | None = None, exist_ok: bool = False, data_mode: str | None = None) -> None:
    """``imclass train`` for transfer learning; ``fallback()`` trains a small network from scratch
    when no ``--backbone`` was asked for and no pretrained weights are found."""
    from imclass.transfer.workflow import TransferConfig, no_weights_advice, pick_backbone, train_transfer

    if dataset is None:
        fail("expected DATA: a folder of photos, one sub-folder per class, to transfer to")
    if backbone is None and pick_backbone(weights_dir) is None:
        typer.secho(f"warning: no pretrained weights found; training a small network from scratch. "
                    f"{no_weights_advice(weights_dir)}", fg=typer.colors.YELLOW, err=True)
        if fallback is not None:
            return fallback()
        fail("no pretrained backbone found: " + no_weights_advice(weights_dir))
    values = {"dataset": dataset, "backbone": backbone, "weights_dir": weights_dir, "head": head,
              "image_size": image_size, "freeze_epochs": freeze_epochs, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "val_fraction": val_fraction, "seed": seed, "limit": limit, "out": out,
              "cache_dir": cache_dir, "class_weight": class_weight, "sampler": sampler, "pool_stages": pool_stages,
              "feature_augment": None if feature_augment in (None, "none") else feature_augment,
              "batch_norm": batch_norm, "exist_ok": exist_ok, "data_mode": data_mode}
    if weights is not None:
        values["weights"] = None if weights.lower() in ("none", "random") else weights
    if unfreeze is not None:
        values["unfreeze"] = unfreeze if unfreeze == "all" else _int(unfreeze, "--unfreeze")
    from imclass.train import distributed

    try:
        cfg = TransferConfig(**{k: v for k, v in values.items() if v is not None or k == "weights"},
                             verbose=not as_json)
        # under torchrun: each rank extracts its share of the features, rank 0 writes the run folder and reports
        with plain_warnings(), distributed.session("cpu"):
            began = time.perf_counter()
            result = train_transfer(cfg)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except USER_ERRORS as err:
        fail(str(err))
    if distributed.env_rank() != 0:
        return
    if as_json:
        print_json(result)
        return
    kept = {"frozen head": " (the frozen head: fine-tuning ended below it)", "fine-tuned": " (fine-tuned)"}
    word = split_word(dataset, "val")  # a plain folder's seeded hold-out: "held-out", as `imclass evaluate` says
    typer.echo(f"{word} accuracy {result['accuracy']:.2%} of the saved model{kept.get(result['model_selected'], '')} "
               f"on {result['val_images']:,} {word} images ({result['backbone']}, {result['train_images']:,} training "
               "images)")
    if word == HELD_OUT:
        typer.echo(f"({HELD_OUT_NOTE}; they also chose the saved model: frozen head or fine-tuned)")
    typer.echo(time_line(result["seconds"], result["seconds_per_stage"], began=began))
    typer.echo(f"saved {result['model_file']} (best), {Path(result['out']) / 'last.safetensors'} (last), history.csv, "
               f"curves.png, confusion_matrix.png")
    if result.get("suspected_label_errors"):
        typer.echo(f"{result['suspected_label_errors']} of the {result['val_images']:,} {word} images look "
                   f"mislabelled (confident learning on the held-out predictions); see them: "
                   f"imclass review {dataset} --out review/")


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        fail(f"expected {flag} 'all' or a number of stages, received {text!r}")
        raise


# --------------------------------------------------------------------------------------------
# imclass predict --backbone NAME IMAGE...


def predict_backbone(backbone: str, images: list[Path], *, weights: str | None, weights_dir: str | None, top: int,
                     fmt: str) -> None:
    """ImageNet top-k of each image by a pretrained backbone (zero-shot: "what the computer sees")."""
    import torch

    from imclass.models.weights import create_backbone, imagenet_classes
    from imclass.serve.predictor import ImageError, decode_image, find_images
    from imclass.transfer.features import prepare_batch

    try:
        with plain_warnings(), warnings.catch_warnings():
            names = imagenet_classes(weights_dir)
            model, report = create_backbone(backbone, num_classes=1000, weights=weights or "imagenet",
                                            weights_dir=weights_dir)
    except USER_ERRORS as err:
        fail(str(err))
    if report.dropped_head:
        fail(f"{report.source}: its classifier is not ImageNet's 1,000 classes ({report.dropped_head[0]}); "
             "zero-shot prediction needs an ImageNet classifier")
    pre = report.preprocessing
    paths = find_images(images)
    if not paths:
        fail(f"no image files found in {', '.join(map(str, images))}")
    model.eval()
    rows, errors = [], []
    for path in paths:
        try:
            x = decode_image(path, channels=3, resize=pre.resize, crop=pre.crop, name=str(path))
        except ImageError as err:
            errors.append({"image": str(path), "error": str(err)})
            continue
        with torch.no_grad():
            probs = model(prepare_batch(x.unsqueeze(0), pre)).softmax(1)[0]
        p, idx = probs.topk(min(top, 1000))
        rows.append({"image": str(path), "top": [{"class": names[i], "index": int(i), "probability": float(v)}
                                                 for v, i in zip(p.tolist(), idx.tolist())]})
    if fmt == "json":
        print_json({"backbone": backbone, "weights": report.source, "predictions": rows, "errors": errors})
    else:
        for r in rows:
            typer.echo(r["image"])
            for j, t in enumerate(r["top"], 1):
                typer.echo(f"  {j}. {t['class']:<40} {t['probability']:.3f}")
    for e in errors:
        typer.secho(f"error: {e['error']}", fg=typer.colors.RED, err=True)
    if errors:
        raise typer.Exit(1)

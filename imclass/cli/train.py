"""``imclass train``: train a model and save it to a run folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from imclass.cli._common import USER_ERRORS, DataMode, DataRoot, fail, limit_option, plain_warnings, print_json, write_error

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``train`` to ``app``."""
    app.command("train")(train)


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
    limit: Optional[int] = limit_option(),
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
        None, "--augment", help="none, flip, crop, crop_flip, crop_flip_cutout (default none), and/or challenge names "
        "for robustness training: challenge (all), illumination, viewpoint, deformation, occlusion, clutter "
        "(e.g. crop_flip,challenge)."
    ),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Hold out this fraction for validation."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<model>-<dataset>)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, mps (default auto)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'fast': the fast CIFAR-10 recipe."),
    target: Optional[int] = typer.Option(None, "--target", help="Fast recipe accuracy target: 90, 94 or 95."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (accuracy, loss, seconds, ...)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Transfer from this pretrained backbone (timm/torchvision name); --weights then "
        "means its weights: imagenet (default), a file, or none."),
    weights_dir: Optional[str] = typer.Option(
        None, "--weights-dir", help="Weights root (default: $IMCLASS_WEIGHTS, else ~/.cache/imclass/weights)."),
    freeze_epochs: Optional[int] = typer.Option(
        None, "--freeze-epochs", help="Transfer: head epochs on the frozen backbone's cached features (default 15)."),
    head: Optional[str] = typer.Option(None, "--head", help="Transfer: course (default) or linear."),
    unfreeze: Optional[str] = typer.Option(
        None, "--unfreeze", help="Transfer: what --epochs fine-tunes: all (default) or the last N stages."),
    pool_stages: Optional[int] = typer.Option(
        None, "--pool-stages", help="Transfer: also pool the backbone's last N feature stages for the head "
        "(default 2 on timm backbones, else 0; 0 = the course's global average pooling only)."),
    feature_augment: Optional[str] = typer.Option(
        None, "--feature-augment", help="Transfer: flip = the head also trains on mirrored photos' features "
        "(twice the feature time), none (default)."),
    batch_norm: Optional[str] = typer.Option(
        None, "--batch-norm", help="Transfer: what fine-tuning does with the backbone's batch norm: eval (default: "
        "keep its pretrained running statistics, train scale and shift) or train (batch statistics)."),
    feature_cache: Optional[str] = typer.Option(
        None, "--feature-cache", help="Transfer: cache the frozen features in this folder (reused while nothing changes)."),
    class_weight: Optional[str] = typer.Option(
        None, "--class-weight", help='Class imbalance: balanced, one weight per class (1,5,1) or JSON ({"cat": 3}).'),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="balanced: draw every class about equally often."),
    data_mode: Optional[str] = DataMode,
) -> None:
    """Train a model and save it to a run folder (model.safetensors, config.json, history, curves).

    With --dataset cifar10 and no --model, the fast CIFAR-10 recipe runs. `--out DIR --resume`
    alone continues the run in DIR with the config it saved (other flags override it).
    """
    from imclass.cli.transfer import run_transfer, wants_transfer
    from imclass.train.imbalance import parse_class_weight
    from imclass.workflows.training import CONFIG_FILE, load_config, train_from_config

    try:
        class_weight = parse_class_weight(class_weight) if isinstance(class_weight, str) else class_weight
    except ValueError as err:
        fail(str(err))

    if wants_transfer(dataset=dataset, model=model, weights=weights, recipe=recipe, backbone=backbone, config=config):
        def from_scratch() -> None:  # no pretrained weights: the course CNN, augmented
            train(config=None, model="keras_cnn", model_option=model_option, weights=None, dataset=dataset,
                  data_root=data_root, image_size=image_size or 32, limit=limit, epochs=epochs,
                  batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                  weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                  label_smoothing=label_smoothing, augment=augment or "crop_flip", val_fraction=val_fraction,
                  seed=seed, out=out, resume=resume, device=device, recipe=None, target=None, as_json=as_json,
                  backbone=None, weights_dir=None, freeze_epochs=None, head=None, unfreeze=None, feature_cache=None,
                  class_weight=class_weight, sampler=sampler, pool_stages=None, feature_augment=None,
                  batch_norm=None, data_mode=data_mode)

        return run_transfer(dataset=dataset, backbone=backbone, weights=weights, weights_dir=weights_dir, head=head,
                            image_size=image_size, freeze_epochs=freeze_epochs, epochs=epochs, unfreeze=unfreeze,
                            lr=lr, batch_size=batch_size, val_fraction=val_fraction, seed=seed, limit=limit, out=out,
                            cache_dir=feature_cache, as_json=as_json, fallback=from_scratch,
                            class_weight=class_weight, sampler=sampler, pool_stages=pool_stages,
                            feature_augment=feature_augment, batch_norm=batch_norm, data_mode=data_mode)
    if resume and config is None and out is not None and (Path(out) / CONFIG_FILE).is_file():
        config = Path(out) / CONFIG_FILE  # continue the run with its own config
    try:
        options = parse_model_options(model_option or [])
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
            class_weight=class_weight,
            sampler=sampler,
            data_mode=data_mode,
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
    except OSError as err:  # a full disk or a file size limit while writing the run folder
        fail(write_error(err))
    from imclass.train.distributed import env_rank

    if env_rank() != 0:  # under torchrun rank 0 reports for all
        return
    if as_json:
        print_json(result)
    else:
        typer.echo(
            f"test accuracy {result['accuracy']:.2%} on {result['test_images']:,} test images, "
            f"loss {result['loss']:.4f}, {result['seconds']:.1f} s (training + evaluation); "
            f"saved {result['model_file']}"
        )


def parse_model_options(items: list[str]) -> dict[str, Any]:
    """``["depth=3", "drop_rate=0.2"]`` (``--model-option``, repeatable) -> ``{"depth": 3, "drop_rate": 0.2}``."""
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

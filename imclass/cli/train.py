"""``imclass train``: train a model and save it to a run folder."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from imclass.cli._common import (
    USER_ERRORS,
    data_argument,
    data_mode_option,
    dataset_alias,
    fail,
    limit_option,
    pick_data,
    plain_warnings,
    print_json,
    time_line,
    write_error,
)
from imclass.data.catalog import FOLDER_IMAGE_SIZE
from imclass.data.folder import DEFAULT_SIZE as FOLDER_DEFAULT_SIZE
from imclass.transfer.workflow import DEFAULT_POOL_STAGES, PREFERRED_BACKBONES, TransferConfig
from imclass.workflows.recipes import fast_config
from imclass.workflows.training import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_TARGET, RunConfig


# `imclass train --help` panels
DATA, MODEL, RECIPE, TRANSFER_PANEL, OUTPUT = "Data", "Model", "Recipe", "Transfer (a folder of photos)", "Output"
RUN = RunConfig()  # the help texts show the real defaults
FAST = fast_config(DEFAULT_TARGET)
TRANSFER = TransferConfig(dataset=".")
FALLBACK_AUGMENT = "crop_flip"  # a folder without pretrained weights: the course CNN, augmented


def register(app: typer.Typer) -> None:
    """Add the top-level command ``train`` to ``app``."""
    app.command("train")(train)


# --------------------------------------------------------------------------------------------
# train


def train(
    # data
    data: Optional[str] = data_argument(help="cifar10, mnist, fashion-mnist or a folder of images, one sub-folder "
                                        "per class (a folder: transfer learning when pretrained weights are found).",
                                        rich_help_panel=DATA),
    dataset: Optional[str] = dataset_alias(),
    data_root: Optional[str] = typer.Option(None, "--data", help="Data root folder (default: $IMCLASS_DATA, else "
                                            "~/.cache/imclass).", rich_help_panel=DATA),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to SIZE x SIZE (default: a "
                                             f"named data set its own size; a folder with --model its most common "
                                             f"size up to {FOLDER_DEFAULT_SIZE}; a folder without pretrained weights "
                                             f"{FOLDER_IMAGE_SIZE}; transfer: the backbone's).",
                                             rich_help_panel=DATA),
    limit: Optional[int] = limit_option(rich_help_panel=DATA),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help=f"Hold out this fraction of each class for validation (default {RUN.val_fraction:g}; "
        f"a folder: {TRANSFER.val_fraction:g}). The best epoch by validation accuracy becomes the saved model.",
        rich_help_panel=DATA),
    class_weight: Optional[str] = typer.Option(
        None, "--class-weight", help='Class imbalance: balanced, one weight per class (1,5,1) or JSON ({"cat": 3}).',
        rich_help_panel=DATA),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Class balancing: balanced draws every class "
                                          "about equally often.", rich_help_panel=DATA),
    data_mode: Optional[str] = data_mode_option(rich_help_panel=DATA),
    # model
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture name (`imclass models list`); "
                                        "none with cifar10: the fast recipe; none with a folder: transfer.",
                                        rich_help_panel=MODEL),
    model_option: Optional[List[str]] = typer.Option(
        None, "--model-option", "-o", help="Extra model option KEY=VALUE (JSON value), repeatable.",
        rich_help_panel=MODEL),
    from_model: Optional[str] = typer.Option(None, "--from-model", help="Fine-tune the model of this model file or "
                                             "run folder (a new head when the classes differ).", rich_help_panel=MODEL),
    # recipe
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML or JSON file of options (flags win).",
                                          rich_help_panel=RECIPE),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", "-e", help=f"Passes over the training set (default {DEFAULT_EPOCHS}; the fast "
        f"recipe: {FAST.epochs:g} for --target {DEFAULT_TARGET}; transfer: fine-tuning epochs after --freeze-epochs, "
        f"default {TRANSFER.epochs}).", rich_help_panel=RECIPE),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help=f"Images per step (default "
                                             f"{DEFAULT_BATCH_SIZE}).", rich_help_panel=RECIPE),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=f"adam, adamw, sgd or rmsprop (default "
                                            f"{RUN.optimizer}).", rich_help_panel=RECIPE),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Learning rate (default {RUN.lr:g}; --lr-find suggests "
                                       "one).", rich_help_panel=RECIPE),
    lr_find: bool = typer.Option(False, "--lr-find", help="Run the learning-rate range test instead of training: "
                                 "print the suggested --lr and write OUT-lr_find.png.", rich_help_panel=RECIPE),
    momentum: Optional[float] = typer.Option(None, "--momentum", help=f"SGD momentum (default {RUN.momentum:g}).",
                                             rich_help_panel=RECIPE),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum (SGD).",
                                            rich_help_panel=RECIPE),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=f"L2 weight decay (default "
                                                 f"{RUN.weight_decay:g}).", rich_help_panel=RECIPE),
    schedule: Optional[str] = typer.Option(
        None, "--schedule", help="Learning-rate schedule: step, exponential, cosine, onecycle, linear (default none).",
        rich_help_panel=RECIPE),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help=f"Linear warm-up epochs (default "
                                                  f"{RUN.warmup_epochs:g}).", rich_help_panel=RECIPE),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help=f"Label smoothing (default "
                                                    f"{RUN.label_smoothing:g}).", rich_help_panel=RECIPE),
    augment: Optional[str] = typer.Option(
        None, "--augment", help=f"none, flip, crop, crop_flip, crop_flip_cutout (default {RUN.augment}; a folder "
        f"without pretrained weights: {FALLBACK_AUGMENT}; the fast recipe: its own flip + {FAST.translate}-pixel "
        "translate), and/or challenge names for robustness training: challenge "
        "(all), illumination, viewpoint, deformation, occlusion, clutter (e.g. crop_flip,challenge).",
        rich_help_panel=RECIPE),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Random seed (default {RUN.seed}).", rich_help_panel=RECIPE),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'fast': the fast CIFAR-10 recipe.",
                                         rich_help_panel=RECIPE),
    target: Optional[int] = typer.Option(None, "--target", help=f"Fast recipe accuracy target: 90, 94 or 95 (default "
                                         f"{DEFAULT_TARGET}).", rich_help_panel=RECIPE),
    device: Optional[str] = typer.Option(None, "--device", help=f"auto, cpu, cuda, mps (default {RUN.device}).",
                                         rich_help_panel=RECIPE),
    # transfer
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Transfer from this pretrained backbone (timm/torchvision name; default with a "
        "folder: the first found of " + ", ".join(PREFERRED_BACKBONES) + ").", rich_help_panel=TRANSFER_PANEL),
    weights: Optional[str] = typer.Option(None, "--weights", help="The backbone's weights: imagenet (default), a file, "
                                          "or none (random).", rich_help_panel=TRANSFER_PANEL),
    weights_dir: Optional[str] = typer.Option(
        None, "--weights-dir", help="Weights root (default: $IMCLASS_WEIGHTS, else ~/.cache/imclass/weights).",
        rich_help_panel=TRANSFER_PANEL),
    freeze_epochs: Optional[int] = typer.Option(
        None, "--freeze-epochs", help=f"Head epochs on the frozen backbone's cached features (default "
        f"{TRANSFER.freeze_epochs}).", rich_help_panel=TRANSFER_PANEL),
    head: Optional[str] = typer.Option(None, "--head", help=f"course or linear (default {TRANSFER.head}).",
                                       rich_help_panel=TRANSFER_PANEL),
    unfreeze: Optional[str] = typer.Option(
        None, "--unfreeze", help=f"What --epochs fine-tunes: all or the last N stages (default {TRANSFER.unfreeze}).",
        rich_help_panel=TRANSFER_PANEL),
    pool_stages: Optional[int] = typer.Option(
        None, "--pool-stages", help="Also pool the backbone's last N feature stages for the head "
        f"(default {DEFAULT_POOL_STAGES} on timm backbones, else 0; 0 = global average pooling only).",
        rich_help_panel=TRANSFER_PANEL),
    feature_augment: Optional[str] = typer.Option(
        None, "--feature-augment", help="flip = the head also trains on mirrored photos' features "
        "(twice the feature time), none (default).", rich_help_panel=TRANSFER_PANEL),
    batch_norm: Optional[str] = typer.Option(
        None, "--batch-norm", help=f"What fine-tuning does with the backbone's batch norm (default "
        f"{TRANSFER.batch_norm}): eval keeps its pretrained running statistics, train uses batch statistics.",
        rich_help_panel=TRANSFER_PANEL),
    feature_cache: Optional[str] = typer.Option(
        None, "--feature-cache", help="Cache the frozen features in this folder (reused while nothing changes).",
        rich_help_panel=TRANSFER_PANEL),
    # output
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<model>-<dataset>); when it "
                                      "holds an earlier run, a new OUT-2, OUT-3, ... (see --exist-ok).",
                                      rich_help_panel=OUTPUT),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Write into OUT even when it holds an earlier run.",
                                  rich_help_panel=OUTPUT),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the run in OUT from its "
                                          "checkpoint.pt.", rich_help_panel=OUTPUT),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (accuracy, loss, seconds, ...).",
                                 rich_help_panel=OUTPUT),
) -> None:
    """Train a model and save it to a run folder (model.safetensors, config.json, history, curves).

    `imclass train cifar10` (no --model): the fast CIFAR-10 recipe.

    `imclass train FOLDER`: transfer learning from a pretrained backbone.

    `--out DIR --resume` alone continues the run in DIR with the config it saved (other flags override it).
    """
    dataset = pick_data(data, dataset)
    from imclass.cli.transfer import run_transfer, wants_transfer
    from imclass.train.imbalance import parse_class_weight
    from imclass.workflows.training import CONFIG_FILE, load_config, train_from_config

    try:
        class_weight = parse_class_weight(class_weight) if isinstance(class_weight, str) else class_weight
    except ValueError as err:
        fail(str(err))
    if from_model is None and weights is not None and backbone is None and _is_model_file(weights):
        typer.secho(f"warning: --weights {weights} names a model file: that is --from-model now (--weights means a "
                    "backbone's weights)", fg=typer.colors.YELLOW, err=True)
        from_model, weights = weights, None
    if from_model is not None and weights is not None:
        fail("--from-model fine-tunes a saved model; --weights sets a backbone's weights (with --backbone): "
             "give one of them")

    transfer = wants_transfer(dataset=dataset, model=model, weights=from_model, recipe=recipe, backbone=backbone,
                              config=config)
    if transfer and resume:  # a transfer run keeps no checkpoint: only a from-scratch fallback's can be resumed
        from imclass.workflows.training import check_resumable

        if out is None:
            fail("--resume needs --out DIR (the run folder holding checkpoint.pt)")
        try:
            check_resumable(out)
        except ValueError as err:
            fail(str(err))
    if transfer:
        def from_scratch() -> None:  # no pretrained weights: the course CNN, augmented
            train(config=None, model="keras_cnn", model_option=model_option, weights=None, from_model=None,
                  data=dataset, dataset=None, data_root=data_root, image_size=image_size or FOLDER_IMAGE_SIZE, limit=limit,
                  epochs=epochs, lr_find=False,
                  batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                  weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                  label_smoothing=label_smoothing, augment=augment or FALLBACK_AUGMENT, val_fraction=val_fraction,
                  seed=seed, out=out, resume=resume, device=device, recipe=None, target=None, as_json=as_json,
                  backbone=None, weights_dir=None, freeze_epochs=None, head=None, unfreeze=None, feature_cache=None,
                  class_weight=class_weight, sampler=sampler, pool_stages=None, feature_augment=None,
                  batch_norm=None, exist_ok=exist_ok, data_mode=data_mode)

        return run_transfer(dataset=dataset, backbone=backbone, weights=weights, weights_dir=weights_dir, head=head,
                            image_size=image_size, freeze_epochs=freeze_epochs, epochs=epochs, unfreeze=unfreeze,
                            lr=lr, batch_size=batch_size, val_fraction=val_fraction, seed=seed, limit=limit, out=out,
                            cache_dir=feature_cache, as_json=as_json, fallback=from_scratch,
                            class_weight=class_weight, sampler=sampler, pool_stages=pool_stages,
                            feature_augment=feature_augment, batch_norm=batch_norm, exist_ok=exist_ok,
                            data_mode=data_mode)
    if lr_find and wants_transfer(dataset=dataset, model=model, weights=from_model, recipe=recipe, backbone=backbone,
                                  config=config):
        fail("--lr-find tests a model: add --model NAME (e.g. --model keras_cnn --image-size 64)")
    if resume and config is None and out is not None and (Path(out) / CONFIG_FILE).is_file():
        config = Path(out) / CONFIG_FILE  # continue the run with its own config
    try:
        options = parse_model_options(model_option or [])
        cfg = load_config(
            config,
            model=model,
            weights=from_model,  # RunConfig.weights: the model file to fine-tune
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
            exist_ok=exist_ok or None,
            data_mode=data_mode,
            verbose=False if as_json else None,
        )
        if options:
            cfg.model_options = {**cfg.model_options, **options}
        if lr_find:
            return _lr_find(cfg, as_json)
        with plain_warnings():
            began = time.perf_counter()
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
        from imclass.data.folder import HELD_OUT, HELD_OUT_NOTE, split_word

        word = split_word(result["dataset"], "test")
        typer.echo(f"{word} accuracy {result['accuracy']:.2%} on {result['test_images']:,} {word} images, "
                   f"loss {result['loss']:.4f}; saved {result['model_file']}")
        if word == HELD_OUT:
            typer.echo(f"({HELD_OUT_NOTE})")
        typer.echo(time_line(result["total_seconds"], result["seconds_per_stage"], began=began))


def _is_model_file(path: str) -> bool:
    """Whether ``path`` is an imclass model file or run folder (what --from-model takes), not backbone weights."""
    from imclass.model_file.format import read_metadata

    if not Path(path).expanduser().exists():
        return False
    try:
        read_metadata(path)
    except Exception:  # not an imclass model file: backbone weights (timm/torchvision) or garbage
        return False
    return True


def _lr_find(cfg: Any, as_json: bool) -> None:
    """``imclass train --lr-find``: the range test, its suggestion on one line, the plot beside OUT."""
    from imclass.workflows.training import lr_find_from_config

    out = Path(cfg.out or f"runs/{(cfg.model or 'model').replace(':', '_')}-{Path(cfg.dataset).name}")
    plot = out.with_name(f"{out.name}-lr_find.png")
    with plain_warnings():
        result = lr_find_from_config(cfg, plot=plot)
    if as_json:
        print_json(result)
        return
    typer.echo(f"suggested learning rate {result['suggestion']:.2e} (steepest descent of the smoothed loss; "
               f"minimum / 10: {result['minimum']:.2e}); tried {result['start_lr']:.0e} to {result['end_lr']:.0e}, "
               f"{result['steps_before_divergence']} of {result['steps']} steps before divergence; plot {plot}")
    typer.echo(f"train with: --lr {result['suggestion']:.2g}")


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

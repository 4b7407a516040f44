"""A whole training run from one config: data, model, training, test evaluation, run folder.

    cfg = TrainConfig(model="keras_cnn", dataset="cifar10", epochs=10, out="runs/x")
    result = train_from_config(cfg)     # {"accuracy": ..., "loss": ..., "seconds": ..., ...}

The same config comes from a JSON or TOML file (``load_config(path, **overrides)``), flat keys
named like the fields below, with ``[model_options]`` as a table. Unknown keys are an error, so
a typo never silently trains something else. The run folder ``out`` ends up holding
``model.safetensors`` (``imclass.load(out)``), ``config.json`` (the resolved config) and what the
training engine writes there (history, checkpoint, training-curve PNG).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "config_from_dict", "train_from_config", "AUGMENTATIONS"]

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = (None, "cosine", "onecycle", "step", "linear")
AUGMENTATIONS = ("none", "flip", "crop", "crop_flip", "crop_flip_cutout")
TARGETS = (90, 94, 95)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` beside the model it produced."""

    model: str | None = None  # registry name (imclass models list); None with cifar10 -> the fast recipe
    model_options: dict = field(default_factory=dict)  # extra keyword options for models.create
    weights: str | None = None  # start from this model file / run folder (fine-tuning)
    dataset: str = "cifar10"  # name (cifar10, mnist, fashion-mnist) or an image folder
    data_root: str | None = None
    image_size: int | None = None  # resize images to image_size x image_size
    limit: int | None = None  # use only the first `limit` training (and test) images: quick runs
    epochs: int | None = None  # None: 10 (or the fast recipe's own)
    batch_size: int | None = None  # None: 32 (or the fast recipe's own)
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str | None = None
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: str = "none"
    val_fraction: float = 0.0  # hold out this fraction of the training images for validation
    seed: int = 0
    out: str | None = None  # run folder; default runs/<model>-<dataset>
    resume: bool = False  # continue from out/checkpoint.pt
    device: str = "auto"
    recipe: str | None = None  # "fast": the fast CIFAR-10 recipe
    target: int | None = None  # accuracy target of the fast recipe: 90, 94 or 95
    verbose: bool = True

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs > 0, f"expected epochs >= 1, received epochs={self.epochs}")
        _check(self.batch_size is None or self.batch_size >= 1, f"expected batch_size >= 1, received batch_size={self.batch_size}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"expected lr > 0, received lr={self.lr}")
        _check(self.weight_decay >= 0, f"expected weight_decay >= 0, received weight_decay={self.weight_decay}")
        _check(self.warmup_epochs >= 0, f"expected warmup_epochs >= 0, received warmup_epochs={self.warmup_epochs}")
        _check(0 <= self.label_smoothing < 1, f"expected 0 <= label_smoothing < 1, received {self.label_smoothing}")
        _check(0 <= self.val_fraction < 1, f"expected 0 <= val_fraction < 1, received val_fraction={self.val_fraction}")
        _check(self.limit is None or self.limit >= 1, f"expected limit >= 1, received limit={self.limit}")
        _check(
            self.image_size is None or self.image_size >= 1,
            f"expected image_size >= 1, received image_size={self.image_size}",
        )
        self.optimizer = self.optimizer.lower()
        _check(self.optimizer in OPTIMIZERS, f"expected optimizer in {list(OPTIMIZERS)}, received {self.optimizer!r}")
        if self.schedule in ("", "none", "constant"):
            self.schedule = None
        _check(self.schedule in SCHEDULES, f"expected schedule in {list(SCHEDULES)}, received {self.schedule!r}")
        _check(self.augment in AUGMENTATIONS, f"expected augment in {list(AUGMENTATIONS)}, received {self.augment!r}")
        _check(self.recipe in (None, "fast"), f"expected recipe 'fast' or none, received recipe={self.recipe!r}")
        _check(self.target is None or self.target in TARGETS, f"expected target in {list(TARGETS)}, received {self.target}")
        _check(isinstance(self.model_options, dict), f"expected model_options as a table, received {self.model_options!r}")

    @property
    def uses_fast_recipe(self) -> bool:
        """True when the run is the fast CIFAR-10 recipe (asked for, or cifar10 with no model)."""
        return self.recipe == "fast" or (self.model is None and self.weights is None and self.dataset == "cifar10")

    def to_dict(self) -> dict:
        """The config as plain JSON-ready values (what ``config.json`` holds)."""
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a ``TrainConfig`` from a mapping, refusing unknown keys (``source`` names it in errors)."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(_FIELDS)}")
    for key, value in list(values.items()):
        expected = _expected_type(key)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)  # `lr = 1` in a file means 1.0
        wrong_bool = isinstance(value, bool) and expected is not bool
        if value is not None and expected is not None and (wrong_bool or not isinstance(value, expected)):
            raise ValueError(f"{source}: expected {key} as {expected.__name__}, received {value!r}")
    return TrainConfig(**values)


def _expected_type(key: str) -> type | None:
    default = _FIELDS[key].default
    if default is dataclasses.MISSING:
        return dict
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return type(default)
    return {"model": str, "weights": str, "data_root": str, "image_size": int, "limit": int, "schedule": str,
            "out": str, "recipe": str, "target": int, "epochs": int, "batch_size": int}.get(key)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a JSON (``.json``) or TOML (``.toml``) config file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            raise ValueError(f"expected a .json or .toml config file, received {path.name!r}")
    except (json.JSONDecodeError, ValueError) as err:
        if "expected a .json" in str(err):
            raise
        raise ValueError(f"config file {path}: cannot parse it: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a table of keys, received {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the keys of the config file ``path``, then ``overrides`` (None = not given)."""
    values = read_config_file(path) if path is not None else {}
    source = f"config file {path}" if path is not None else "config"
    config_from_dict(values, source=source)  # unknown keys and bad types named with the file
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(values, source=source)


# --------------------------------------------------------------------------------------------
# the run

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 32


def train_from_config(cfg: TrainConfig) -> dict[str, Any]:
    """Train and test the model ``cfg`` describes; write the run folder; return the figures.

    Returns a dict with at least ``accuracy`` and ``loss`` (on the test split), ``seconds``
    (training wall time), ``epochs``, ``out`` and ``model_file``. The fast recipe runs when
    ``cfg.uses_fast_recipe``; otherwise the model comes from the registry (``cfg.model``) or
    from a model file (``cfg.weights``, to fine-tune it).
    """
    from imclass.io import save

    if not cfg.uses_fast_recipe and cfg.model is None and cfg.weights is None:
        raise ValueError(
            f"expected a model name (--model) to train on {cfg.dataset!r} (see `imclass models list`); "
            "only cifar10 has a default (the fast recipe)"
        )
    train_set, test_set = _load_data(cfg)
    out = Path(cfg.out or f"runs/{(cfg.model or 'fast').replace(':', '_')}-{Path(cfg.dataset).name}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(out))
    start = time.perf_counter()
    if cfg.uses_fast_recipe:
        clf, metrics, extra = _fit_fast_recipe(cfg, train_set, test_set, out)
    else:
        clf, metrics, extra = _fit_model(cfg, train_set, test_set, out)
    seconds = time.perf_counter() - start
    resolved = {**cfg.to_dict(), **extra.pop("resolved", {})}
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    model_file = save(clf, out / MODEL_FILE, train_config=resolved, input_size=list(train_set.image_shape))
    return {
        "accuracy": float(metrics["accuracy"]),
        "loss": float(metrics["loss"]),
        "seconds": seconds,
        "epochs": resolved["epochs"],
        "model": resolved["model"],
        "dataset": cfg.dataset,
        "train_images": len(train_set),
        "test_images": len(test_set),
        **extra,
        "out": str(out),
        "model_file": str(model_file),
    }


MODEL_FILE = "model.safetensors"


def _run_callbacks(out: Path) -> list:
    from imclass.train.callbacks import CSVLogger, TrainingCurves

    return [CSVLogger(out / "history.csv"), TrainingCurves(out / "curves.png")]


def _fit_model(cfg: TrainConfig, train_set, test_set, out: Path):
    """Compile and fit a registry (or loaded) model as ``cfg`` says; evaluate it on ``test_set``."""
    epochs = cfg.epochs or DEFAULT_EPOCHS
    batch_size = cfg.batch_size or DEFAULT_BATCH_SIZE
    clf = _build_classifier(cfg, train_set)
    clf.compile(
        cfg.optimizer,
        lr=cfg.lr,
        label_smoothing=cfg.label_smoothing,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs,
    )
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")  # before a long run starts
    clf.fit(
        train_set,
        epochs=epochs,
        batch_size=batch_size,
        validation=cfg.val_fraction or None,
        augment=None if cfg.augment == "none" else cfg.augment,
        callbacks=_run_callbacks(out),
        seed=cfg.seed,
        checkpoint_dir=out,
        resume=cfg.resume,
        verbose=cfg.verbose,
    )
    metrics = clf.evaluate(test_set)
    resolved = {"epochs": epochs, "batch_size": batch_size, "model": cfg.model or _model_name(clf.model)}
    return clf, metrics, {"resolved": resolved}


def _fit_fast_recipe(cfg: TrainConfig, train_set, test_set, out: Path):
    """The fast CIFAR-10 recipe for ``cfg.target``; ``model_options`` (and epochs, batch size) override it."""
    from imclass.train import recipes

    target = cfg.target or 90
    overrides = dict(cfg.model_options)
    if cfg.epochs is not None:
        overrides["epochs"] = cfg.epochs
    if cfg.batch_size is not None:
        overrides["batch_size"] = cfg.batch_size
    fast = recipes.fast_config(target, **overrides)
    clf = recipes.fast_recipe(
        train_set,
        fast,
        seed=cfg.seed,
        device=cfg.device,
        checkpoint_dir=out,
        resume=cfg.resume,
        callbacks=tuple(_run_callbacks(out)),
        verbose=cfg.verbose,
    )
    metrics = clf.evaluate(test_set, tta=fast.tta)
    recipe = dataclasses.asdict(fast)
    resolved = {"model": "fastnet", "recipe": "fast", "target": target, "epochs": fast.epochs,
                "batch_size": fast.batch_size, "fast_recipe": recipe}
    return clf, metrics, {"resolved": resolved, "target": target, "tta": fast.tta}


def _model_name(model) -> str | None:
    spec = getattr(model, "imclass_spec", None)
    return spec["name"] if spec else type(model).__name__


def _load_data(cfg: TrainConfig):
    from imclass import data as imdata

    size = cfg.image_size
    train_set = imdata.load(cfg.dataset, split="train", root=cfg.data_root, image_size=size)
    test_set = imdata.load(cfg.dataset, split="test", root=cfg.data_root, image_size=size)
    if cfg.limit is not None:
        train_set = train_set.subset(slice(0, cfg.limit))
        test_set = test_set.subset(slice(0, cfg.limit))
    return train_set, test_set


def _build_classifier(cfg: TrainConfig, train_set):
    """A fresh model from the registry, or the model of the file ``cfg.weights`` (fine-tuning)."""
    from imclass.train import Classifier

    if cfg.weights is None:
        model = _create_model(cfg.model, train_set, cfg.model_options)
        # mean/std are computed from the training images by the first fit
        return Classifier(model, classes=train_set.classes, device=cfg.device)
    from imclass.io import load

    start = load(cfg.weights, device=cfg.device)
    if not hasattr(start, "model"):
        raise ValueError(f"{cfg.weights}: expected a classifier model file to fine-tune, received a {type(start).__name__}")
    model = start.model
    if start.classes is not None and list(start.classes) != list(train_set.classes):
        if len(start.classes) == train_set.num_classes:
            pass  # same number of classes under other names (e.g. digits "0".."9"): keep the head
        elif hasattr(model, "reset_classifier"):
            model.reset_classifier(train_set.num_classes)  # a new head for the new classes
            spec = getattr(model, "imclass_spec", None)
            if spec is not None:  # the model file must rebuild the new head
                spec["options"] = {**spec["options"], "num_classes": train_set.num_classes}
        else:
            raise ValueError(
                f"{cfg.weights}: the model has {len(start.classes)} classes, the data set {train_set.num_classes}, "
                "and the model has no reset_classifier() to replace its head"
            )
    model.train()
    return Classifier(model, classes=train_set.classes, mean=start.mean, std=start.std, device=cfg.device)


def _create_model(name: str, train_set, options: dict):
    """``models.create`` with the data set's classes, channels and (when the model takes it) image size."""
    from imclass import models

    c, h, w = train_set.image_shape
    base = {"num_classes": train_set.num_classes, "in_chans": c}
    if h == w and "img_size" not in options:
        try:
            return models.create(name, **base, img_size=h, **options)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return models.create(name, **{**base, **options})

"""A whole training run from one config: data, model, training, test evaluation, run folder.

    cfg = RunConfig(model="keras_cnn", dataset="cifar10", epochs=10, out="runs/x")
    result = train_from_config(cfg)     # {"accuracy": ..., "loss": ..., "seconds": ..., ...}

The same config comes from a JSON or TOML file (``load_config(path, **overrides)``), flat keys
named like the fields below, with ``[model_options]`` as a table. Unknown keys are an error, so
a typo never silently trains something else. The run folder ``out`` (a new ``out-2``, ``out-3``, ...
when ``out`` holds an earlier run, unless ``exist_ok`` or ``resume``) ends up holding
``model.safetensors`` (``imclass.load(out)``: the best model by validation accuracy, the same file as
``best.safetensors``), ``last.safetensors`` (the last epoch's), ``config.json`` (the resolved config),
``history.csv``, ``curves.png``, ``confusion_matrix.png`` (on the test split) and ``checkpoint.pt``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imclass import config_file

from imclass import data as imdata, models
from imclass.data.challenge_transforms import ChallengeAugment, parse_challenges
from imclass.data.check import quick_check
from imclass.data.folder import default_image_size, folder_classes, parse_image_size
from imclass.data.source import model_reserve
from imclass.model_file.format import load_weights
from imclass.model_file.save import save
from imclass.models.rebuild import load
from imclass.train import Classifier, distributed
from imclass.train.callbacks import CSVLogger, ModelCheckpoint, TimeBudget, TrainingCurves
from imclass.train.checkpoint import CHECKPOINT_NAME
from imclass.train.device import resolve_device
from imclass.train.distributed import is_main
from imclass.train.lr_range import LRFindResult, clean_curve
from imclass.train.memory import activation_reserve
from imclass.train.run_folder import BEST_FILE, CONFUSION_FILE, LAST_FILE, fresh_run_dir, held_out_figures, link_or_copy
from imclass.train.seed import seed_everything
from imclass.visualize.training import save_confusion_matrix
from imclass.workflows import recipes

# Deferred imports (inside functions), for start-up time: torch.distributed
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["AUGMENTATIONS", "RunConfig", "check_resumable", "config_from_dict", "load_config",
           "seed_everything", "train_from_config"]

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = (None, "step", "exponential", "cosine", "onecycle", "linear")
AUGMENTATIONS = ("none", "flip", "crop", "crop_flip", "crop_flip_cutout")
TARGETS = (90, 94, 95)


@dataclass
class RunConfig:
    """Everything a training run needs; saved as ``config.json`` beside the model it produced.

    (Not to be confused with ``imclass.train.CompileConfig``, the resolved ``compile`` options.)
    """

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
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"  # a name of AUGMENTATIONS, and/or challenge names: "challenge", "crop_flip,occlusion"
    val_fraction: float = 0.0  # hold out this fraction of the training images for validation
    seed: int = 0
    out: str | None = None  # run folder; default runs/<model>-<dataset>
    resume: bool = False  # continue from out/checkpoint.pt
    exist_ok: bool = False  # write into an existing `out`; else a new run goes to out-2, out-3, ...
    device: str = "auto"
    recipe: str | None = None  # "fast": the fast CIFAR-10 recipe
    target: int | None = None  # accuracy target of the fast recipe: 90, 94 or 95
    class_weight: str | list | dict | None = None  # class imbalance: 'balanced', one weight per class or {class: w}
    sampler: str | None = None  # 'balanced': every class drawn about equally often
    verbose: bool = True
    budget: float | None = None  # seconds of training; then stop after the current batch (TimeBudget)
    data_mode: str | None = None  # where a folder's images live: memory, cache or stream (None: chosen, said aloud)

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs > 0, f"expected epochs >= 1, received epochs={self.epochs}")
        _check(
            self.batch_size is None or self.batch_size >= 1,
            f"expected batch_size >= 1, received batch_size={self.batch_size}",
        )
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
        split_augment(self.augment)  # a clear error for an unknown name
        _check(self.budget is None or self.budget > 0, f"expected budget > 0 seconds, received budget={self.budget}")
        _check(self.recipe in (None, "fast"), f"expected recipe 'fast' or none, received recipe={self.recipe!r}")
        _check(self.target in (None, *TARGETS), f"expected target in {list(TARGETS)}, received {self.target}")
        _check(isinstance(self.model_options, dict), f"expected model_options as a dict, received {self.model_options}")
        if self.class_weight in ("none", ""):
            self.class_weight = None
        _check(self.class_weight is None or self.class_weight == "balanced" or isinstance(self.class_weight, (list, dict)),
               f"expected class_weight 'balanced', a list or a table, received {self.class_weight!r}")
        if self.sampler in ("none", ""):
            self.sampler = None
        _check(self.sampler in (None, "balanced"), f"expected sampler 'balanced' or none, received {self.sampler!r}")
        _check(self.data_mode in (None, "memory", "cache", "stream"),
               f"expected data_mode memory, cache or stream, received {self.data_mode!r}")

    @property
    def uses_fast_recipe(self) -> bool:
        """True when the run is the fast CIFAR-10 recipe (asked for, or cifar10 with no model)."""
        return self.recipe == "fast" or (self.model is None and self.weights is None and self.dataset == "cifar10")

    def to_dict(self) -> dict:
        """The config as plain JSON-ready values."""
        return dataclasses.asdict(self)

    def run_dict(self) -> dict:
        """What ``config.json`` holds: the config less how this command was run (``resume``, ``verbose``),
        so that ``imclass train --out DIR --resume`` can read it back."""
        return {k: v for k, v in self.to_dict().items() if k not in ("resume", "verbose", "exist_ok")}



def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def split_augment(spec: str) -> tuple[str | None, tuple[str, ...]]:
    """``"crop_flip,illumination,occlusion"`` -> ``("crop_flip", ("illumination", "occlusion"))``: at most one
    name of ``AUGMENTATIONS``, and challenge names (``imclass.data.challenge_transforms``; ``challenge`` = all of them)."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    base = [s for s in items if s in AUGMENTATIONS]
    rest = [s for s in items if s not in AUGMENTATIONS]
    if len(base) > 1 or not items:
        raise ValueError(f"expected augment as one of {list(AUGMENTATIONS)} and/or challenge names, received {spec!r}")
    if rest:
        try:
            names = parse_challenges(rest)
        except ValueError as err:
            raise ValueError(f"expected augment in {list(AUGMENTATIONS)} and/or challenge names: {err}") from None
    else:
        names = ()
    return (None if not base or base[0] == "none" else base[0]), names


def _make_augment(spec: str) -> tuple[Any, list]:
    """``cfg.augment`` -> the ``augment=`` of ``fit`` and the callbacks it needs (a ChallengeAugment is both)."""
    base, names = split_augment(spec)
    if not names:
        return base, []
    augment = ChallengeAugment(names, base=base)
    return augment, [augment]


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a ``RunConfig`` from a mapping, refusing unknown keys and values of the wrong type
    (``source`` names the file in errors). ``batch-size`` and ``batch_size`` are the same key."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(_TYPES)}")
    for key, value in values.items():
        expected = _TYPES[key]
        if float in expected and isinstance(value, int) and not isinstance(value, bool):
            value = values[key] = float(value)  # `lr = 1` in a file means 1.0
        if value is None and type(None) in expected:
            continue
        if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected if t is not type(None))
            raise ValueError(f"{source}: expected {key} as {names}, received {value!r}")
    return RunConfig(**values)


def _field_types() -> dict[str, tuple[type, ...]]:
    """Field name -> the types its annotation allows (``int | None`` -> ``(int, NoneType)``)."""
    hints = typing.get_type_hints(RunConfig)
    return {name: tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) or (hint,)))
            for name, hint in hints.items()}


_TYPES = _field_types()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a JSON (``.json``) or TOML (``.toml``) config file as a dict."""
    values = config_file.read_config_file(path, what="config file", kinds=(".json", ".toml"))
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a table of keys, received {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
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
DEFAULT_TARGET = 90  # of the fast recipe


def train_from_config(cfg: RunConfig) -> dict[str, Any]:
    """Train and test the model ``cfg`` describes; write the run folder; return the figures.

    Returns a dict with at least ``accuracy`` and ``loss`` (on the test split), ``seconds``
    (training wall time), ``epochs``, ``out`` and ``model_file``. The fast recipe runs when
    ``cfg.uses_fast_recipe``; otherwise the model comes from the registry (``cfg.model``) or
    from a model file (``cfg.weights``, to fine-tune it).
    """
    if distributed.launched() and not distributed.is_distributed():  # under torchrun: one rank of N
        with distributed.session(cfg.device) as ctx:
            return train_from_config(dataclasses.replace(cfg, device=ctx.device))
    t_start = time.perf_counter()
    if not cfg.uses_fast_recipe and cfg.model is None and cfg.weights is None:
        raise ValueError(
            f"expected a model name (--model) to train on {cfg.dataset!r} (see `imclass models list`); "
            "only cifar10 has a default (the fast recipe)"
        )
    if cfg.model is not None and cfg.weights is None and not cfg.uses_fast_recipe:
        models.require(cfg.model)  # a mistyped --model: one line before any image is read
    wanted = Path(cfg.out or f"runs/{(cfg.model or 'fast').replace(':', '_')}-{Path(cfg.dataset).name}")
    if wanted.exists() and not wanted.is_dir():
        raise ValueError(f"--out {wanted}: a file is in the way; expected a run folder (new or existing)")
    if cfg.resume:
        check_resumable(wanted)
    resolve_device(cfg.device)  # an unknown or absent device: one clear error before the data is read
    seed_everything(cfg.seed)  # model initialisation included: two identical commands, identical model files
    out = _run_dir(cfg)  # runs/x holds an earlier run: runs/x-2 (never a silent overwrite)
    t0 = time.perf_counter()
    train_set, test_set = _load_data(cfg)
    stages = {"read": time.perf_counter() - t0}
    t0 = time.perf_counter()
    _warn_about_data(cfg, train_set, test_set)
    stages["check"] = time.perf_counter() - t0
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(out))
    start = time.perf_counter()
    fit = _fit_fast_recipe if cfg.uses_fast_recipe else _fit_model
    try:
        clf, cfg, details = fit(cfg, train_set, test_set, out)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a run that failed before writing: no empty folder
            out.rmdir()
        raise
    seconds = time.perf_counter() - start
    stages["training"] = seconds
    t0 = time.perf_counter()
    _write_config(cfg, out)
    # the model file records how it was trained, not where: the same command twice (in runs/x, then runs/x-2)
    # writes byte-identical model files; config.json keeps the folder
    train_config = {k: v for k, v in {**cfg.run_dict(), **details}.items() if k != "out"}
    figures = _final_models(clf, test_set, out, train_config, seconds, list(train_set.image_shape))
    metrics = figures["metrics"]
    model_file = out / MODEL_FILE
    stages["evaluate + save"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    stages["other"] = max(0.0, total - sum(stages.values()))  # the breakdown adds up to the total
    return {
        "accuracy": float(metrics["accuracy"]),
        "loss": float(metrics["loss"]),
        "model_selected": figures["selected"],  # the saved default model: "best" (by val_accuracy) or "last"
        "last_accuracy": figures["last_accuracy"],
        "seconds": seconds,  # training (fit, with its per-epoch validation)
        "total_seconds": total,
        "seconds_per_stage": stages,  # read, check, training, evaluate + save, other: they add up to total_seconds
        "model": cfg.model,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "tta": clf.tta or "none",  # the test-time augmentation of `accuracy`, recorded in the model file
        "data_mode": getattr(train_set, "mode", "memory"),
        **details,
        "out": str(out),
        "model_file": str(model_file),
    }


def _run_dir(cfg: RunConfig) -> Path:
    """``cfg.out`` (default runs/<model>-<dataset>), or the next free ``-2``, ``-3``, ... when it holds an
    earlier run and neither ``exist_ok`` nor ``resume`` is set; every rank of a torchrun run agrees."""
    wanted = Path(cfg.out or f"runs/{(cfg.model or 'fast').replace(':', '_')}-{Path(cfg.dataset).name}")
    out = fresh_run_dir(wanted, exist_ok=cfg.exist_ok, resume=cfg.resume)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # rank 0 decides, before anyone creates a folder
        chosen = [str(out)]
        dist.broadcast_object_list(chosen, src=0)
        out = Path(chosen[0])
    if out != wanted:
        warnings.warn(f"{wanted} holds an earlier run: this run goes to {out} (--exist-ok writes into {wanted})",
                      stacklevel=3)
    return out


def _final_models(clf, test_set, out: Path, train_config: dict, seconds: float, input_size: list) -> dict[str, Any]:
    """Write last.safetensors, best.safetensors (best by val_accuracy; the last one without validation),
    model.safetensors (the same file as best: what ``imclass.load(out)`` reads) with the test figures in
    each file, and confusion_matrix.png of the default model on the test split."""
    last = held_out_figures(clf, test_set, clf.tta)
    history = clf.history.to_dict()
    vals = [v for v in history.get("val_accuracy", []) if v is not None and math.isfinite(v)]
    best_epoch = None
    if vals and (out / BEST_FILE).is_file():
        best_epoch = history["val_accuracy"].index(max(vals)) + 1
    main = distributed.is_main()  # under torchrun rank 0 writes the run folder

    def recorded(fig: dict, epoch: int | None) -> dict:
        logs = {k: v[epoch - 1] for k, v in history.items() if epoch is not None and len(v) >= epoch}
        values = {**{k: v for k, v in (logs or clf.history.last()).items() if k != "seconds"},
                  "test_accuracy": float(fig["accuracy"]), "test_loss": float(fig["loss"]),
                  "epochs": len(clf.history)}  # GET /models/{name} of `imclass serve`; no wall time: two
        # identical commands must write byte-identical model files (the time is in history.csv and the result)
        return {k: v for k, v in values.items()  # a diverged (NaN) loss is left out, not refused
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}

    if main:
        save(clf, out / LAST_FILE, train_config=train_config, input_size=input_size, metrics=recorded(last, None))
    chosen, selected = last, "last"
    if best_epoch is not None and best_epoch != len(clf.history):
        load_weights(clf.model, out / BEST_FILE)  # the best epoch's weights, written by ModelCheckpoint
        chosen, selected = held_out_figures(clf, test_set, clf.tta), "best"
    elif best_epoch is not None:
        selected = "best"  # the last epoch is the best one
    if main:
        if selected == "best" and chosen is not last:
            save(clf, out / BEST_FILE, train_config={**train_config, "selected": f"best (epoch {best_epoch})"},
                 input_size=input_size, metrics=recorded(chosen, best_epoch))
        else:
            link_or_copy(out / LAST_FILE, out / BEST_FILE)
        link_or_copy(out / BEST_FILE, out / MODEL_FILE)
        save_confusion_matrix(chosen["confusion_matrix"], list(test_set.classes), out / CONFUSION_FILE,
                              title=f"{out.name}: {selected} model on the {test_set.split or 'test'} split")
    return {"metrics": chosen, "selected": selected, "last_accuracy": float(last["accuracy"])}


def check_resumable(out: str | Path) -> None:
    """A ValueError saying so when ``out`` holds no training checkpoint to resume (``--resume``)."""
    out = Path(out)
    if not (out / CHECKPOINT_NAME).is_file():
        raise ValueError(f"--resume: no checkpoint in {out} (expected {out / CHECKPOINT_NAME}; the run folder is "
                         "missing or mistyped, or the run stopped before its first checkpoint): drop --resume to "
                         "start a new run")


def _write_config(cfg: RunConfig, out: Path) -> None:
    if not is_main():
        return
    (out / CONFIG_FILE).write_text(json.dumps(cfg.run_dict(), indent=2) + "\n")


MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _run_callbacks(out: Path, budget: float | None = None, validation: bool = False) -> list:
    callbacks = [CSVLogger(out / "history.csv"), TrainingCurves(out / "curves.png")]
    if validation:  # best.safetensors: the best epoch by validation accuracy so far
        callbacks.append(ModelCheckpoint(out / BEST_FILE, monitor="val_accuracy", mode="max"))
    return callbacks + [TimeBudget(budget)] if budget else callbacks


LR_FIND_START, LR_FIND_END, LR_FIND_STEPS = 1e-7, 10.0, 100


def lr_find_from_config(cfg: RunConfig, *, start_lr: float = LR_FIND_START, end_lr: float = LR_FIND_END,
                        num_steps: int = LR_FIND_STEPS, plot: str | Path | None = None) -> dict[str, Any]:
    """``imclass train --lr-find``: the learning-rate range test of the model ``cfg`` describes, compiled as
    ``cfg`` says (optimizer, momentum, weight decay, label smoothing), on its training images; nothing is
    trained for good and no run folder is written. Returns ``suggestion`` (steepest descent of the smoothed
    loss, strictly between ``start_lr`` and ``end_lr``), ``minimum`` (lowest-loss lr / 10), the range, the
    points kept and where the plot went."""
    if cfg.uses_fast_recipe or (cfg.model is None and cfg.weights is None):
        raise ValueError("--lr-find needs a model to test (--model NAME, or --weights FILE to fine-tune); "
                         "the fast recipe has its own tuned learning rates")
    train_set, _ = _load_data(cfg)
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or DEFAULT_BATCH_SIZE)
    seed_everything(cfg.seed)
    clf = _build_classifier(cfg, train_set)
    clf.compile(cfg.optimizer, lr=cfg.lr, label_smoothing=cfg.label_smoothing, weight_decay=cfg.weight_decay,
                momentum=cfg.momentum, nesterov=cfg.nesterov)
    raw = clf.lr_find(train_set, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, batch_size=cfg.batch_size,
                      seed=cfg.seed)
    result = LRFindResult(list(raw.lrs), list(raw.losses), start_lr=start_lr, end_lr=end_lr)
    if plot is not None:
        result.plot(plot)
    kept, _ = clean_curve(result.lrs, result.losses)
    return {"suggestion": result.suggestion, "minimum": result.minimum, "start_lr": start_lr, "end_lr": end_lr,
            "steps": len(result.lrs), "steps_before_divergence": len(kept), "plot": str(plot) if plot else None,
            "model": cfg.model or _model_name(clf.model), "dataset": cfg.dataset, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer}


def _fit_model(cfg: RunConfig, train_set, test_set, out: Path):
    """Compile and fit a registry (or loaded) model as ``cfg`` says; evaluate it on ``test_set``."""
    cfg = dataclasses.replace(cfg, epochs=cfg.epochs or DEFAULT_EPOCHS, batch_size=cfg.batch_size or DEFAULT_BATCH_SIZE)
    clf = _build_classifier(cfg, train_set)
    if cfg.model is None:  # fine-tuning a model file: name its architecture
        cfg = dataclasses.replace(cfg, model=_model_name(clf.model))
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
    _write_config(cfg, out)  # before a long run starts
    augment, augment_callbacks = _make_augment(cfg.augment)
    clf.fit(
        train_set,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        validation=cfg.val_fraction or None,
        augment=augment,
        callbacks=_run_callbacks(out, cfg.budget, validation=bool(cfg.val_fraction)) + augment_callbacks,
        seed=cfg.seed,
        checkpoint_dir=out,
        resume=cfg.resume,
        verbose=cfg.verbose,
        class_weight=cfg.class_weight,
        sampler=cfg.sampler,
    )
    return clf, cfg, {}


def _fit_fast_recipe(cfg: RunConfig, train_set, test_set, out: Path):
    """The fast CIFAR-10 recipe for ``cfg.target``; ``model_options`` (and epochs, batch size) override it."""
    cfg = dataclasses.replace(cfg, recipe="fast", target=cfg.target or DEFAULT_TARGET)
    overrides = dict(cfg.model_options)
    if cfg.epochs is not None:
        overrides["epochs"] = cfg.epochs
    if cfg.batch_size is not None:
        overrides["batch_size"] = cfg.batch_size
    fast = recipes.fast_config(cfg.target, **overrides)
    _write_config(cfg, out)  # before a long run starts
    clf = recipes.fast_recipe(
        train_set,
        fast,
        seed=cfg.seed,
        device=cfg.device,
        checkpoint_dir=out,
        resume=cfg.resume,
        callbacks=tuple(_run_callbacks(out, cfg.budget)),
        verbose=cfg.verbose,
    )
    details = {"model": "fastnet", "target": cfg.target, "epochs": fast.epochs, "fast_recipe": dataclasses.asdict(fast)}
    return clf, cfg, details


def _model_name(model) -> str | None:
    spec = getattr(model, "imclass_spec", None)
    return spec["name"] if spec else type(model).__name__


def _load_data(cfg: RunConfig):
    """The training and test sets of ``cfg``: a folder through the tier chooser (``cfg.data_mode``),
    ``--limit`` applied to its file list before decoding, at ``cfg.image_size`` or a default size."""
    folder = Path(cfg.dataset).expanduser()
    size = cfg.image_size
    shards = (folder / "index.json").is_file()  # `imclass data shard` output: images at the size they were written
    if folder.is_dir() and size is None and not shards:
        size = default_image_size(folder)
    reserve = _model_reserve(cfg, folder, size) if folder.is_dir() and size is not None and not shards else None
    # --limit: a seeded, stratified sample of each split (imclass.data.split.limit_indices), before decoding
    sets = [imdata.load(cfg.dataset, split=split, root=cfg.data_root, image_size=size, limit=cfg.limit,
                        seed=cfg.seed or 0, mode=cfg.data_mode, reserve=reserve) for split in ("train", "test")]
    if folder.is_dir() and cfg.image_size is None and not shards:
        for ds in sets:
            ds.notes.append(f"images resized to {size[0]}x{size[1]} (the default without --image-size)")
    return sets[0], sets[1]


def _model_reserve(cfg: RunConfig, folder: Path, size: int | tuple[int, int]) -> int | None:
    """The memory a registry model (``cfg.model``) needs to train on ``folder``'s images at ``size``: its
    weights, gradients and optimizer moments, and its activations at ``cfg.batch_size`` counted on the meta
    device (``imclass.train.memory.activation_reserve``) for the tier chooser; None (the chooser's default
    reserve) for the fast recipe, a model file, or a model the meta device cannot run."""
    if cfg.uses_fast_recipe or cfg.model is None or cfg.weights is not None:
        return None
    shape = (3, *parse_image_size(size))  # the channel count is read from the images later; colour is the larger case
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the seeded initialisation stays untouched
            model = create_model(cfg.model, len(folder_classes(folder)), shape, cfg.model_options)
    except Exception:  # noqa: BLE001 - a factory that needs real tensors (e.g. reads weights): the default reserve
        return None
    activations = activation_reserve(model, shape, cfg.batch_size or DEFAULT_BATCH_SIZE)
    return None if activations is None else model_reserve(model, activations)


def _warn_about_data(cfg: RunConfig, train_set, test_set) -> None:
    """A cheap check of a folder's images at train start (``imclass.data.check.quick_check``: duplicates
    with two labels, train/test leakage, class imbalance), as warnings; ``imclass data check`` says more."""
    counts = train_set.class_counts()
    empty = [c for c, n in zip(train_set.classes, counts) if n == 0]
    if empty:
        warnings.warn(f"{len(empty)} class(es) of {cfg.dataset} have no training images ({', '.join(empty[:5])}"
                      f"{', ...' if len(empty) > 5 else ''}): the model can never learn to predict them", stacklevel=3)
    if not Path(cfg.dataset).expanduser().is_dir():
        return
    for message in quick_check(train_set, test_set, name=Path(cfg.dataset).name):
        warnings.warn(message, stacklevel=3)


def _build_classifier(cfg: RunConfig, train_set):
    """A fresh model from the registry, or the model of the file ``cfg.weights`` (fine-tuning)."""
    if cfg.weights is None:
        model = create_model(cfg.model, len(train_set.classes), train_set.image_shape, cfg.model_options)
        # mean/std are computed from the training images by the first fit
        return Classifier(model, classes=train_set.classes, device=cfg.device)
    start = load(cfg.weights, device=cfg.device)
    if not hasattr(start, "model"):
        raise ValueError(f"{cfg.weights}: expected a classifier model file to fine-tune, not a {type(start).__name__}")
    model = start.model
    if start.classes is not None and list(start.classes) != list(train_set.classes):
        if len(start.classes) == len(train_set.classes):
            pass  # same number of classes under other names (e.g. digits "0".."9"): keep the head
        elif hasattr(model, "reset_classifier"):
            model.reset_classifier(len(train_set.classes))  # a new head for the new classes (imclass.save records it)
        else:
            raise ValueError(
                f"{cfg.weights}: the model has {len(start.classes)} classes, the data set {len(train_set.classes)}, "
                "and the model has no reset_classifier() to replace its head"
            )
    model.train()
    return Classifier(model, classes=train_set.classes, mean=start.mean, std=start.std, device=cfg.device)


def create_model(name: str, num_classes: int, image_shape: tuple[int, int, int], options: dict):
    """``models.create`` for ``num_classes`` classes of images of ``image_shape`` (C, H, W): its channels and
    (when the model takes it) its size."""
    c, h, w = image_shape
    base = {"num_classes": num_classes, "in_chans": c}
    if h == w and "img_size" not in options:
        try:
            return models.create(name, **base, img_size=h, **options)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return models.create(name, **{**base, **options})

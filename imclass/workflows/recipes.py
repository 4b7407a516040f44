"""The fast CIFAR-10 recipe: FastNet + airbench's training ideas, run by imclass's own engine.

    clf, result = run_fast_recipe(train, test, target=90, seed=0)
    result["accuracy"], result["seconds"]

Every piece is small and separate, and goes through ``Classifier.compile`` / ``fit``:

- :func:`init_whitening` (imclass.models.fastnet) sets the first conv from the data;
- :func:`fast_optimizer`: SGD + Nesterov, BN shifts at 64x the learning rate, decay per step
  independent of the learning rate (hyper-parameters per 1024 examples, "kilostep scale");
  with ``optimizer="muon"`` the conv kernels take Muon steps instead (airbench94_muon,
  :class:`imclass.train.optim.MuonSGD`) and the rest keeps SGD;
- :func:`triangular`: learning rate 0.2 -> 1 over the first 20% of the steps, then -> 0
  (``warmup_fraction=0``: a straight line 1 -> 0, the Muon variant's schedule);
- :class:`FlipTranslate`: alternating flips (each image is mirrored in every other epoch) and a
  random 2-pixel reflect translation, as one augment callable + callback;
- :class:`Lookahead`: every 5 steps the weights are pulled to an EMA whose decay grows as
  (progress)^3; the EMA weights are the final model;
- :class:`FreezeWhitenBias`: the whitening conv's bias learns only in the first epochs;
- :class:`StopAtStep`: fractional epochs (airbench trains 9.9);
- test-time augmentation level 2 (imclass.tta).

``FAST_TARGETS`` maps the ``--target`` knob (90, 94, 95) to width and epochs measured on a
2-core CPU (see docs/fast.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imclass.data.arrays import as_labels
from imclass.data.augment import random_crop
from imclass.data.dataset import ImageDataset
from imclass.data.loader import derive_seed
from imclass.models import create
from imclass.models.fastnet import init_whitening
from imclass.train.classifier import Classifier
from imclass.train.device import cpu_has_native_bf16
from imclass.train.inputs import as_data
from imclass.train.optim import MuonSGD
from imclass.tta import tta_name

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FAST_TARGETS",
    "FastConfig",
    "FlipTranslate",
    "FreezeWhitenBias",
    "Lookahead",
    "StopAtStep",
    "fast_config",
    "fast_optimizer",
    "fast_schedule",
    "resolve_amp",
    "fast_recipe",
    "run_fast_recipe",
    "triangular",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class FastConfig:
    """Everything the fast recipe needs; airbench94's values unless noted.

    ``lr`` and ``weight_decay`` are per 1024 examples in airbench's units (summed loss,
    "kilostep scale"); :func:`fast_optimizer` turns them into torch values for any batch size.
    ``optimizer="muon"`` trains the conv kernels with Muon (``muon_lr`` is an angle per step,
    independent of the batch size) and everything else with the SGD settings;
    ``lookahead_every=0`` turns the lookahead/EMA off.
    """

    widths: tuple[int, int, int] = (64, 256, 256)
    depth: int = 2
    act: str = "gelu"
    epochs: float = 9.9
    batch_size: int = 1024
    lr: float = 11.5
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    warmup_fraction: float = 0.2
    warmup_start: float = 0.2
    whiten_bias_epochs: int = 3
    whiten_images: int = 5000
    translate: int = 2
    lookahead_every: int = 5
    lookahead_decay: float = 0.95
    tta: int = 2
    optimizer: str = "sgd"
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    ns_steps: int = 3
    channels_last: bool = True
    amp: str | None = "auto"  # "auto": bf16 on CUDA and on CPUs with native bf16 (see resolve_amp); "bf16" or None
    compile: bool = False  # torch.compile, CUDA only in the engine

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.epochs <= 0:
            raise ValueError(f"expected epochs > 0, received epochs={self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, received batch_size={self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"expected 0 <= momentum < 1, received momentum={self.momentum}")
        if self.amp not in ("auto", "bf16", None):
            raise ValueError(f"expected amp 'auto', 'bf16' or None, received amp={self.amp!r}")
        if self.optimizer not in ("sgd", "muon"):
            raise ValueError(f"expected optimizer 'sgd' or 'muon', received optimizer={self.optimizer!r}")


# The --target knob (2-core AMD EPYC Zen 3 CPU, see docs/fast.md and bench/RESULTS.md):
# 90: mean 90.2 % on all 10,000 test images (3 seeds), ~2.5 min on an AVX-512-BF16 host (~8 min on Zen 3);
# 94: airbench94_muon: airbench94's network, Muon on the conv kernels, batch 2000, no warm-up, no
#     lookahead (SGD lr 6.5 here = its head/bias rates 0.67/0.053 in these units), 9 epochs
#     instead of its 8: mean 94.5 % (3 seeds) in ~38 min on the CPU (8 epochs: 93.8 %, 4 seeds),
#     94.5 % (10 seeds) in 2.1 s on an H200;
# 95: airbench95-like, meant for a GPU.
FAST_TARGETS: dict[int, FastConfig] = {
    90: FastConfig(widths=(32, 128, 128), epochs=5, batch_size=512),
    94: FastConfig(widths=(64, 256, 256), epochs=9, batch_size=2000, optimizer="muon", lr=6.5,
                   weight_decay=0.0157, warmup_fraction=0.0, lookahead_every=0),
    95: FastConfig(widths=(128, 384, 384), depth=3, epochs=15, batch_size=1024),
}


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """The autocast dtype the recipe trains with. ``"auto"`` is bf16 on CUDA and on a CPU that
    multiplies bf16 natively (AVX-512-BF16 or AMX): there it trains 1.4-1.6x faster at the same
    accuracy (target 90: 90.2 % +/- 0.2 bf16 vs 90.1 % +/- 0.2 float32 over 3 seeds, 10,000 test
    images; bench/RESULTS.md). Other CPUs emulate bf16 slowly, so they keep float32."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else None
    return amp


def fast_config(target: int = 90, **overrides: Any) -> FastConfig:
    """The :class:`FastConfig` of an accuracy ``target`` (90, 94 or 95), with field ``overrides``."""
    if int(target) not in FAST_TARGETS:
        raise ValueError(f"expected target in {sorted(FAST_TARGETS)}, received target={target!r}")
    unknown = set(overrides) - set(FastConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown fast-recipe options {sorted(unknown)}; known: {sorted(FastConfig.__dataclass_fields__)}")
    return replace(FAST_TARGETS[int(target)], **overrides)


# ---------------------------------------------------------------------- optimizer and schedule
def fast_optimizer(model: nn.Module, cfg: FastConfig) -> torch.optim.Optimizer:
    """SGD + Nesterov with airbench's scaling, for a loss that is the batch *mean*.

    airbench sums the loss over the batch and uses ``lr / kilostep`` with
    ``kilostep = 1024 * (1 + 1 / (1 - momentum))``; with a mean loss the same step needs
    ``lr * batch / kilostep``. Weight decay is set so that the decay per step is
    ``weight_decay * batch / kilostep`` for every group (torch multiplies it by the group lr).
    Batch-norm shifts get ``bias_scaler`` x the learning rate.

    With ``cfg.optimizer == "muon"`` it is a :class:`MuonSGD` instead: the conv kernels take
    Muon steps (``muon_lr``, ``muon_momentum``, kernels kept at norm ``sqrt(out)``), the
    whitening bias gets the BN shifts' rate, and the groups are named (``head``, ``bn_bias``,
    ``whiten_bias``, ``kernels``) for :func:`fast_schedule`.
    """
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr * cfg.batch_size / kilostep
    decay = cfg.weight_decay * cfg.batch_size / kilostep
    lr_bias = lr * cfg.bias_scaler
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)
    bn_biases, kernels, others = [], [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p is whiten_bias or not p.requires_grad:
                continue
            if isinstance(module, nn.BatchNorm2d):
                bn_biases.append(p)
            elif isinstance(module, nn.Conv2d) and p.ndim == 4:
                kernels.append(p)
            else:
                others.append(p)
    if cfg.optimizer == "sgd":
        bn_ids = {id(p) for p in bn_biases}
        rest = [p for p in model.parameters() if (p.requires_grad or p is whiten_bias) and id(p) not in bn_ids]
        groups = [  # the weights' group first: its lr is the one the epoch lines and history.csv show
            {"params": rest, "lr": lr, "weight_decay": decay / lr},
            {"params": bn_biases, "lr": lr_bias, "weight_decay": decay / lr_bias},
        ]
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    sgd = {"muon": False, "momentum": cfg.momentum}
    groups = [  # the first group's lr is the one history.csv logs
        {"name": "head", "params": others, "lr": lr, "weight_decay": decay / lr, **sgd},
        {"name": "bn_bias", "params": bn_biases, "lr": lr_bias, "weight_decay": decay / lr_bias, **sgd},
        {"name": "whiten_bias", "params": [whiten_bias] if whiten_bias is not None else [], "lr": lr_bias,
         "weight_decay": decay / lr_bias, **sgd},
        {"name": "kernels", "params": kernels, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "muon": True,
         "normalize": True, "ns_steps": cfg.ns_steps},
    ]
    return MuonSGD([g for g in groups if g["params"]], nesterov=True)


def fast_schedule(optimizer: torch.optim.Optimizer, cfg: FastConfig, total_steps: int, steps_per_epoch: int):
    """Per-step learning-rate factors: :func:`triangular` for every group, except that a
    ``whiten_bias`` group decays linearly to 0 at its freeze (``whiten_bias_epochs``).

    Returns a ``LambdaLR`` (one factor per param group) for ``Classifier.compile(schedule=...)``.
    """
    main = triangular(total_steps, cfg.warmup_fraction, cfg.warmup_start)
    freeze = max(1, cfg.whiten_bias_epochs * steps_per_epoch)

    def whiten(step: int) -> float:
        return max(0.0, 1 - step / freeze)

    factors = [whiten if g.get("name") == "whiten_bias" else main for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def triangular(total_steps: int, warmup_fraction: float = 0.2, start: float = 0.2):
    """Learning-rate factor ``step -> f``: ``start`` -> 1 linearly over ``warmup_fraction`` of
    the steps, then linearly to 0 at ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"expected total_steps >= 1, received total_steps={total_steps}")
    peak = int(warmup_fraction * total_steps) if warmup_fraction > 0 else 0
    if warmup_fraction > 0:
        peak = max(1, peak)

    def factor(step: int) -> float:
        if step < peak:
            return start + (1 - start) * step / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return factor


# ---------------------------------------------------------------------- callbacks
class Lookahead:
    """EMA of the weights pulled back into the model every ``every`` steps (airbench's lookahead).

    At step ``t`` of ``T`` the EMA moves toward the model with decay
    ``decay**every * (t / T)**3`` (so it follows the model early and averages late), then the
    model takes the EMA's weights. At the end the model keeps the EMA.
    """

    order = -10

    def __init__(self, every: int = 5, decay: float = 0.95, total_steps: int | None = None) -> None:
        self.every, self.decay, self.total_steps = every, decay, total_steps
        self.ema: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, state) -> None:
        self.total = self.total_steps or state.total_steps
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in state.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _pull(self, model: nn.Module, decay: float) -> None:
        params = model.state_dict()
        for k, ema in self.ema.items():
            ema.lerp_(params[k], 1 - decay)
            params[k].copy_(ema)

    def on_batch_end(self, state) -> None:
        if state.step % self.every == 0:
            self._pull(state.model, self.decay**self.every * min(1.0, state.step / self.total) ** 3)

    def on_train_end(self, state) -> None:
        if self.ema is not None and state.step >= self.total:
            self._pull(state.model, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" in state:
            self.ema = state["ema"]


class FreezeWhitenBias:
    """Train the whitening conv's bias only during the first ``epochs`` epochs."""

    def __init__(self, epochs: int = 3) -> None:
        self.epochs = epochs

    def on_epoch_begin(self, state) -> None:
        state.model.whiten.bias.requires_grad_(state.epoch < self.epochs)


class StopAtStep:
    """End training after ``steps`` optimizer steps (fractional epochs)."""

    order = 100

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_batch_end(self, state) -> None:
        if state.step >= self.steps:
            state.stop_training = True


class FlipTranslate:
    """Alternating flips + random reflect translation: the augment callable *and* its callback.

    Epoch 0 mirrors a random half of the images; every later epoch mirrors exactly the images
    the previous epoch did not, so each image is seen both ways in every pair of epochs (less
    redundancy than independent coin flips). Which images a batch holds comes from the engine's
    ``state.batch_indices``. Pass the same object as ``augment=`` and in ``callbacks=``.
    """

    order = -20

    def __init__(self, n_images: int, seed: int, translate: int = 2) -> None:
        self.translate = translate
        g = torch.Generator().manual_seed(derive_seed(seed, 0, 7))
        self.first_flips = torch.rand(n_images, generator=g) < 0.5  # which images epoch 0 mirrors
        self._flip: torch.Tensor | None = None

    def flips(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Bool mask: which of the images ``indices`` are mirrored in ``epoch`` (on their device)."""
        if self.first_flips.device != indices.device:  # once: no device-to-host copy per batch on a GPU
            self.first_flips = self.first_flips.to(indices.device)
        return self.first_flips[indices] ^ bool(epoch % 2)

    def on_batch_begin(self, state) -> None:
        if state.batch_indices is None:
            raise RuntimeError("FlipTranslate needs the training loop to set state.batch_indices before each batch")
        self._flip = self.flips(state.batch_indices, state.epoch)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
        if self._flip is not None and len(self._flip) == len(x):
            x = torch.where(self._flip[:, None, None, None], x.flip(3), x)
            self._flip = None
        if self.translate:
            x = random_crop(x, self.translate, generator, mode="reflect")
        return x


# ---------------------------------------------------------------------- the recipe
def _as_dataset(data: Any, name: str) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels, _ = as_data(data, name)  # the engine's one coercion; the recipe needs integer labels
        labels = as_labels(labels, len(images), name=f"{name} labels")
        return ImageDataset(images, labels, [str(i) for i in range(int(labels.max()) + 1)])
    raise TypeError(f"expected {name} as an ImageDataset or an (images, labels) pair, received {type(data).__name__}")


def fast_recipe(
    train: Any,
    cfg: FastConfig,
    seed: int = 0,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: tuple = (),
    verbose: bool = True,
    checkpoint_every: int | None = None,
):
    """Build the FastNet classifier for ``cfg`` and train it on ``train``; returns the ``Classifier``.

    The model is ``imclass.models.create("fastnet", widths=..., depth=..., act=...)`` with its
    whitening conv set from the first ``cfg.whiten_images`` training images.
    """
    train = _as_dataset(train, "train")
    torch.manual_seed(seed)
    model = create("fastnet", num_classes=train.num_classes, in_chans=train.image_shape[0], widths=list(cfg.widths),
                   depth=cfg.depth, act=cfg.act)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if train.image_shape[0] == 3 else ([0.5] * train.image_shape[0],) * 2
    clf = Classifier(model, classes=train.classes, mean=mean, std=std, device=device)
    if clf.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels
    sample = train.images[: cfg.whiten_images].float() / 255  # (n, C, H, W) on [0, 1]
    sample = (sample - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    init_whitening(model, sample.to(clf.device))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    optimizer = fast_optimizer(model, cfg)
    if cfg.optimizer == "muon":
        schedule = fast_schedule(optimizer, cfg, total_steps, steps_per_epoch)
    else:
        schedule = triangular(total_steps, cfg.warmup_fraction, cfg.warmup_start)
    clf.compile(
        optimizer=optimizer,
        label_smoothing=cfg.label_smoothing,
        momentum=cfg.momentum,
        nesterov=True,
        schedule=schedule,
        amp=resolve_amp(cfg.amp, clf.device),
        compile=cfg.compile and clf.device.type == "cuda",
        channels_last=cfg.channels_last,
    )
    augment = FlipTranslate(len(train), seed, cfg.translate)
    lookahead = [Lookahead(cfg.lookahead_every, cfg.lookahead_decay, total_steps)] if cfg.lookahead_every > 0 else []
    cbs = [augment, *lookahead, FreezeWhitenBias(cfg.whiten_bias_epochs), StopAtStep(total_steps), *callbacks]
    clf.fit(train, epochs=math.ceil(total_steps / steps_per_epoch), batch_size=cfg.batch_size, augment=augment,
            callbacks=cbs, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, verbose=verbose,
            checkpoint_every=checkpoint_every)
    clf.train_config = {"fast_recipe": asdict(cfg)}  # the run's training config, as a model file records it
    clf.tta = tta_name(cfg.tta)  # evaluated with it below and by `imclass evaluate` / `predict` (model file)
    return clf


def run_fast_recipe(
    dataset_train: Any,
    dataset_test: Any,
    target: int = 90,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    verbose: bool = True,
    resume: bool = False,
    checkpoint_every: int | None = None,
    **overrides: Any,
) -> tuple[Any, dict[str, Any]]:
    """Train the fast recipe for ``target`` (90, 94 or 95) and evaluate it with TTA on ``dataset_test``.

    Returns ``(classifier, result)`` with ``result`` holding ``accuracy``, ``loss``,
    ``seconds`` (wall time of training + evaluation), ``train_seconds``, ``eval_seconds``,
    ``epochs``, ``target``, ``seed``, ``config`` and ``device``. ``overrides`` change fields of
    the target's :class:`FastConfig` (e.g. ``epochs=3``). With ``out``, the run's checkpoint is
    kept in that folder (each epoch, and every ``checkpoint_every`` steps) and ``resume=True``
    continues an interrupted run from it; saving the model file is the caller's job
    (``imclass.save``). ``seconds`` then covers only this call.
    """
    cfg = fast_config(target, **overrides)
    test = _as_dataset(dataset_test, "test")
    start = time.perf_counter()
    clf = fast_recipe(dataset_train, cfg, seed=seed, device=device, checkpoint_dir=out, resume=resume,
                      verbose=verbose, checkpoint_every=checkpoint_every)
    train_seconds = time.perf_counter() - start
    metrics = clf.evaluate(test, tta=cfg.tta)
    seconds = time.perf_counter() - start
    result = {
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "n_test": metrics.get("n", len(test)),
        "seconds": seconds,
        "train_seconds": train_seconds,
        "eval_seconds": seconds - train_seconds,
        "epochs": cfg.epochs,
        "target": int(target),
        "seed": seed,
        "device": str(clf.device),
        "threads": torch.get_num_threads(),
        "config": asdict(cfg),
    }
    return clf, result

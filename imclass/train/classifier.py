"""``Classifier``: a model plus its preprocessing, trained with ``compile`` / ``fit`` like Keras.

    clf = Classifier(model).compile("sgd", lr=0.05, schedule="cosine", weight_decay=5e-4)
    history = clf.fit(train, epochs=10, batch_size=128, validation=0.1, augment="crop_flip", seed=0)
    clf.evaluate(test)["accuracy"], clf.predict(images)

The loop (``fit``) works on whole in-memory uint8 tensors moved to the device once; a batch
is an index gather, scaled to float and normalised on the device. Losses and correct counts
are summed on the device and read back once per epoch (or per progress-bar refresh), so a
GPU step never waits for the host.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imclass.data.arrays import as_images, as_labels
from imclass.data.augment import make_augment
from imclass.data.dataset import ImageDataset
from imclass.data.loader import TensorLoader, derive_seed
from imclass.data.source import inference_batch_size
from imclass.train import checkpoint as ckpt
from imclass.train import distributed as ddp
from imclass.train.imbalance import class_weights, sample_weights
from imclass.train.callbacks import LRFinder, progress_callbacks, run_event, sort_callbacks
from imclass.train.lr_range import LRFindResult, suggest_lr  # noqa: F401 (suggest_lr: kept importable here)
from imclass.train.memory import retain_freed_memory
from imclass.train.optim import make_optimizer, make_schedule
from imclass.train.state import History, TrainingDiverged, TrainState

# "cross_entropy" plus Keras's names (imclass.losses): categorical (one-hot or soft labels), sparse, binary
LOSSES = ("cross_entropy", "categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy")
METRICS = ("accuracy",)
AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """The resolved ``compile`` options (saved beside checkpoints and in model files)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str | dict | None = None
    warmup_epochs: float = 0
    metrics: tuple[str, ...] = ("accuracy",)
    l2: float = 0.0
    grad_clip: float | None = None
    amp: str | None = None
    compile: bool | str = False
    channels_last: bool = False


@dataclass
class _Run:
    """What one ``fit`` call set up, shared by its epochs."""

    loader: TensorLoader
    factor: Callable[[int], float] | None
    torch_scheduler: Any
    augment: Callable | None
    aug_gen: torch.Generator
    callbacks: list
    user_callbacks: list
    ckpt_path: Path | None
    checkpoint_every: int | None
    val: tuple[Any, torch.Tensor, torch.Tensor | None] | None  # (images or source, labels, rows or None)
    val_batch_size: int
    meta: dict[str, Any]
    seconds: float = 0.0  # training time of the current epoch so far


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512-BF16 or AMX): there bf16 autocast
    trains convolutions about 1.7x faster than float32 (bench/fast.py --amp-ab); elsewhere it is
    emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    A ValueError names the problem: an unknown device name, or a CUDA / MPS device this machine lacks.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"expected --device auto, cpu, cuda, cuda:N or mps, received {device!r}") from None
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu or auto)")
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif found.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: no Apple MPS device is available on this machine (use --device cpu)")
    elif found.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"expected --device auto, cpu, cuda, cuda:N or mps, received {device!r}")
    return found


def _as_data(data: Any, name: str = "data") -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """``ImageDataset`` or ``(images, labels)`` -> (images (N, C, H, W), labels (N,), classes or None)."""
    if isinstance(data, ImageDataset):
        return data.images, data.labels, list(data.classes)
    if _is_source(data):  # the stream tier: no whole-set tensor; batches come from the source itself
        return data, data.labels, list(data.classes)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images = as_images(data[0], name=f"{name} images")
        return images, _as_targets(data[1], len(images), name=f"{name} labels"), None
    raise TypeError(f"expected {name} as an ImageDataset or an (images, labels) pair, received {type(data).__name__}")


def _as_targets(y: Any, n: int, name: str) -> torch.Tensor:
    """Integer labels (N,) via ``as_labels``, or one-hot / soft labels (N, classes) kept as float32."""
    t = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if t.ndim == 2 and t.shape[1] > 1:
        if len(t) != n:
            raise ValueError(f"expected {n} {name} (one per image), received {len(t)}")
        return t.float()
    return as_labels(t, n, name=name)


def _correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct predictions in a batch: argmax of the logits (one output: logit > 0) against the labels
    (the argmax of one-hot / soft labels)."""
    labels = targets.argmax(1) if targets.ndim == 2 else targets
    pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return (pred == labels).sum()


def channel_stats(images: Any, chunk: int | None = None, rows: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of images on the [0, 1] scale (uint8 is divided
    by 255). uint8 pixels are summed exactly in int64 over chunks of about 4 MB (no float copy of
    the set, the same figures in any order or tier); ``rows`` restricts them to those images.
    ``images`` may also be a stream source (``read(indices)``): then a seeded sample of 4,096 is used."""
    if not isinstance(images, torch.Tensor):  # a stream source: a sample
        n = len(images) if rows is None else len(rows)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4096].sort().values
        sample = images.read(pick if rows is None else torch.as_tensor(rows)[pick])
        return channel_stats(sample)
    c, h, w = images.shape[1:]
    n = len(images) if rows is None else len(rows)
    chunk = chunk or max(1, (4 << 20) // max(1, c * h * w * 4))
    exact = images.dtype == torch.uint8
    total = torch.zeros(c, dtype=torch.int64 if exact else torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, n, chunk):
        x = images[start : start + chunk] if rows is None else torch.index_select(images, 0, rows[start : start + chunk])
        x = x.cpu().to(torch.int32 if exact else torch.float64)
        total += x.sum(dim=(0, 2, 3), dtype=total.dtype)
        total_sq += x.mul_(x).sum(dim=(0, 2, 3), dtype=total.dtype)
    scale = 255.0 if exact else 1.0
    count = n * h * w
    mean = total.double() / count / scale
    std = (total_sq.double() / count / scale**2 - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _is_source(data: Any) -> bool:
    """An ``ImageDataset`` or another image source (the stream tier: ``read``, ``batches``, ``loader``)."""
    return isinstance(data, ImageDataset) or all(hasattr(data, a) for a in ("read", "batches", "loader", "labels"))


def _image_batches(images: Any, batch_size: int, rows: torch.Tensor | None = None):
    """uint8 batches of a tensor (slices, or gathers of ``rows``) or of a source, in order."""
    if isinstance(images, torch.Tensor):
        n = len(images) if rows is None else len(rows)
        for start in range(0, n, batch_size):
            if rows is None:
                yield images[start : start + batch_size]
            else:
                yield torch.index_select(images, 0, rows[start : start + batch_size].to(images.device))
    else:
        for x, _ in images.batches(batch_size, rows):
            yield x


class Classifier:
    """A model with its classes and input normalisation, and a training loop.

    Parameters
    ----------
    model:
        a ``torch.nn.Module`` mapping float (N, C, H, W) to logits (N, num_classes).
    classes:
        class names (taken from the training ``ImageDataset`` at ``fit`` when not given).
    mean, std:
        per-channel normalisation on the [0, 1] scale; computed from the training images at
        the first ``fit`` when not given.
    device:
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    """

    def __init__(self, model: torch.nn.Module, classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, device: str | torch.device = "auto") -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected model as a torch.nn.Module, received {type(model).__name__}")
        if (mean is None) != (std is None):
            raise ValueError("expected both mean and std, or neither (to compute them at fit)")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"expected std > 0 for every channel, received std={list(std)}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.classes = list(classes) if classes is not None else None
        self.mean = [float(m) for m in mean] if mean is not None else None
        self.std = [float(s) for s in std] if std is not None else None
        self.input_size: tuple[int, int, int] | None = None  # (C, H, W) of the training images, set by fit
        self.tta: str | None = None  # the test-time augmentation this model is evaluated with (model files record it)
        self.config: TrainConfig | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.history = History()
        self._schedule_spec: Any = None
        self._loss_fn: Callable | None = None
        self._train_loss: Callable | None = None  # the class-weighted loss during a fit with class_weight
        self._forward: Callable = self.model
        self._train_forward: Callable | None = None  # the DDP-wrapped model during a distributed fit
        self._scaler = None
        self._norm_key: tuple | None = None
        self._norm_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ configuration
    def compile(
        self,
        optimizer: str | torch.optim.Optimizer = "adam",
        lr: float = 1e-3,
        loss: str | Callable = "cross_entropy",
        label_smoothing: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        schedule: str | dict | Callable | torch.optim.lr_scheduler.LRScheduler | None = None,
        warmup_epochs: float = 0,
        metrics: Sequence[str] = ("accuracy",),
        l2: float = 0.0,
        grad_clip: float | None = None,
        amp: str | None = None,
        compile: bool | str = False,
        channels_last: bool | None = None,
    ) -> "Classifier":
        """Choose the optimizer, loss, learning-rate schedule and numerics; returns ``self``.

        ``optimizer`` is a name (``sgd``, ``adam``, ``adamw``, ``rmsprop``) or a ready
        ``torch.optim.Optimizer`` over the model's parameters (param groups, own settings).
        ``schedule`` is ``None`` (constant), a name (``step``, ``exponential``, ``cosine``,
        ``onecycle``, ``linear``), a dict of ``Schedule`` options, a callable ``step -> factor``
        of the base learning rate, or a torch ``LRScheduler`` built on ``optimizer`` (stepped
        per batch). ``warmup_epochs`` adds a linear warm-up to any of them except the last.
        ``loss`` is ``"cross_entropy"`` (on logits, with ``label_smoothing``) or a callable
        ``(logits, labels) -> mean loss``. ``l2`` adds ``l2 * sum(w**2)`` over weight
        matrices/kernels to the loss (Keras ``kernel_regularizer``); ``weight_decay`` is the
        optimizer's. ``amp`` (``"bf16"``/``"fp16"``) runs forward passes under autocast: both on
        CUDA, ``"bf16"`` on a CPU too (fast where the CPU has AVX-512-BF16 or AMX, see
        :func:`cpu_has_native_bf16`). ``compile`` (``True`` or a ``torch.compile`` mode such as
        ``"max-autotune"``) applies on CUDA only. ``channels_last`` stores the model and batches as NHWC; ``None`` (default) turns it on for models
        with 2-D convolutions, where oneDNN's NHWC kernels are faster (about 10 % for the course's CNN on CPU).
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"expected 0 <= label_smoothing < 1, received label_smoothing={label_smoothing}")
        if l2 < 0:
            raise ValueError(f"expected l2 >= 0, received l2={l2}")
        if warmup_epochs < 0:
            raise ValueError(f"expected warmup_epochs >= 0, received warmup_epochs={warmup_epochs}")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"expected metrics from {METRICS}, received {unknown}")
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"expected amp None, 'bf16' or 'fp16', received amp={amp!r}")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"expected loss in {LOSSES}, an imclass.losses object or a callable, received loss={loss!r}")
        if isinstance(loss, str) and loss != "cross_entropy" or hasattr(loss, "logits_loss"):
            from imclass import losses

            keras_loss = losses.get(loss)
            if label_smoothing and not keras_loss.label_smoothing:
                keras_loss.label_smoothing = label_smoothing
            loss = keras_loss
        from imclass.optimizers import Optimizer as KerasOptimizer

        if isinstance(optimizer, KerasOptimizer):  # imclass.optimizers.Adam(lr=...): Keras decay/schedules as factors
            schedule = optimizer.lr_factor if schedule is None else schedule
            grad_clip = optimizer.clipnorm if grad_clip is None else grad_clip
            self.optimizer, opt_name = optimizer.build(self.model.parameters()), optimizer.name
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer, opt_name = optimizer, type(optimizer).__name__.lower()
        elif isinstance(optimizer, str):
            self.optimizer = make_optimizer(optimizer, self.model.parameters(), lr=lr, weight_decay=weight_decay,
                                            momentum=momentum, nesterov=nesterov)
            opt_name = optimizer.lower()
        else:
            raise TypeError("expected optimizer as a name, an imclass.optimizers object or a torch.optim.Optimizer, "
                            f"received {type(optimizer).__name__}")
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if self.device.type != "cuda" and (amp in ("fp16", "float16") or compile):
            warnings.warn(f"fp16 amp and compile apply on CUDA only; training on {self.device} stays "
                          f"{'bf16' if amp in ('bf16', 'bfloat16') else 'float32'} eager", stacklevel=2)
            amp = None if amp in ("fp16", "float16") else amp
            compile = False
        if channels_last is None:
            channels_last = any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        self.config = TrainConfig(
            optimizer=opt_name, lr=float(self.optimizer.param_groups[0]["initial_lr"]),
            loss=loss if isinstance(loss, str) else getattr(loss, "name", None) or getattr(loss, "__name__", "custom"),
            label_smoothing=label_smoothing, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            schedule=schedule if isinstance(schedule, (str, dict)) or schedule is None else "custom",
            warmup_epochs=warmup_epochs, metrics=tuple(metrics), l2=l2, grad_clip=grad_clip, amp=amp,
            compile=compile, channels_last=channels_last,
        )
        self._schedule_spec = schedule
        if hasattr(loss, "logits_loss"):
            self._loss_fn = loss.logits_loss
        elif callable(loss):
            self._loss_fn = loss
        else:
            self._loss_fn = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self._forward = torch.compile(self.model, mode=compile if isinstance(compile, str) else None)
        else:
            self._forward = self.model
        self._scaler = torch.amp.GradScaler("cuda") if amp in ("fp16", "float16") else None
        return self

    def training_config(self) -> dict[str, Any]:
        """The resolved ``compile`` options as plain values (for model files and run folders)."""
        return asdict(self.config) if self.config is not None else {}

    # ------------------------------------------------------------------ preprocessing
    def _check_ready(self, what: str) -> None:
        if self.mean is None or self.std is None:
            raise RuntimeError(
                f"cannot {what} before the input normalisation is known: call fit() first, "
                "or create the Classifier with mean= and std="
            )

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float on [0, 1]) batch -> normalised float32 on the device."""
        x = x.to(self.device, non_blocking=True)
        pixel = 255.0 if x.dtype == torch.uint8 else 1.0
        if x.shape[1] != len(self.mean):
            raise ValueError(f"expected images with {len(self.mean)} channels, received shape {tuple(x.shape)}")
        scale, shift = self._norm_consts(pixel)
        channels_last = self.config is not None and self.config.channels_last
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # cheapest on the 1-byte pixels
        x = torch.addcmul(shift, x.float(), scale)  # x / (pixel * std) - mean / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _norm_consts(self, pixel: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (pixel, self.device, tuple(self.mean), tuple(self.std))
        if self._norm_key != key:
            mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
            self._norm_cache = (1.0 / (pixel * std), -mean / std)
            self._norm_key = key
        return self._norm_cache

    def _autocast(self, inference: bool = False):
        # On a CPU bf16 speeds up training only; predictions stay float32 there, so a model scores the
        # same in the process that trained it as when loaded from its file.
        if self.config is None or not self.config.amp or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        if inference and self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.config.amp])

    # ------------------------------------------------------------------ training
    def fit(
        self,
        data: Any,
        epochs: int = 1,
        batch_size: int = 32,
        validation: Any = None,
        augment: str | Callable | None = None,
        callbacks: Sequence[Any] = (),
        seed: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        verbose: bool | int = True,
        checkpoint_every: int | None = None,
        validation_batch_size: int | None = None,
        shuffle: bool = True,
        class_weight: Any = None,
        sampler: str | None = None,
    ) -> History:
        """Train for ``epochs`` epochs; returns the :class:`History` (also ``self.history``).

        ``validation`` is ``None``, a fraction of ``data`` held out (seeded split), or a data set.
        ``augment`` is ``None``, ``"crop_flip"`` (and friends, see ``imclass.data.augment``) or a
        callable ``(images, generator, epoch) -> images`` applied on the device to normalised
        float batches. One ``seed`` fixes the shuffling, augmentation, dropout and validation
        split: a CPU run repeats bit for bit. With ``checkpoint_dir``, ``checkpoint.pt`` is
        written atomically at each epoch end (and every ``checkpoint_every`` steps); with
        ``resume=True`` a run continues from it and ends exactly as an uninterrupted run would.
        A NaN or infinite loss raises :class:`TrainingDiverged` (the checkpoint stays the last good one).
        Class imbalance: ``class_weight`` (``"balanced"``, one weight per class, or ``{class: weight}``)
        weights the training loss per class; ``sampler="balanced"`` draws each epoch's images with
        replacement so that every class is seen about equally often (``imclass.train.imbalance``).
        On CPU (Linux) the process keeps freed memory for reuse from then on (``retain_freed_memory``).
        """
        if self.config is None or self.optimizer is None:
            raise RuntimeError("call compile() before fit(), e.g. clf.compile('adam', lr=1e-3)")
        if epochs < 0:
            raise ValueError(f"expected epochs >= 0, received epochs={epochs}")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, received batch_size={batch_size}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"expected checkpoint_every >= 1, received checkpoint_every={checkpoint_every}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder holding checkpoint.pt)")
        images, labels, classes = _as_data(data)
        if self.device.type == "cpu":
            retain_freed_memory()  # ~25 % of a conv step is page faults otherwise (imclass/train/memory.py)
        ckpt_path = Path(checkpoint_dir) / ckpt.CHECKPOINT_NAME if checkpoint_dir is not None else None
        saved = ckpt.load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
        if saved is not None:
            seed = saved["seed"]
        elif seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        seed = ddp.broadcast_object(seed)  # one seed for every rank: the same splits and batches
        rows, val = self._split_validation(images, labels, validation, seed)
        train_labels = labels if rows is None else labels[rows]
        self._set_classes(classes, train_labels)
        self._train_loss = self._weighted_loss(class_weights(class_weight, train_labels, self.classes))
        if val is not None:
            self._check_labels(val[1] if val[2] is None else val[1][val[2]], "validation labels")
        if self.mean is None:
            self.mean, self.std = channel_stats(images, rows=rows)
        self.input_size = tuple(images.image_shape if not isinstance(images, torch.Tensor) else images.shape[1:])
        options = dict(shuffle=shuffle, seed=seed, device=self.device, sample_weights=sample_weights(sampler, train_labels),
                       rank=ddp.rank(), world_size=ddp.world_size(), rows=rows)
        if isinstance(data, ImageDataset) or not isinstance(images, torch.Tensor):
            loader = data.loader(batch_size, **options)  # the source's own loader (memory-mapped: batches move)
        else:
            loader = TensorLoader(images, labels, batch_size, **options)
        n_train = len(train_labels)
        validation_batch_size = validation_batch_size or inference_batch_size(self.input_size)
        steps_per_epoch = len(loader)
        factor, torch_scheduler = self._make_schedule(epochs, steps_per_epoch)
        user_cbs = list(callbacks)  # their states are saved in this order (stable across verbose on/off)
        run = _Run(
            loader=loader, factor=factor, torch_scheduler=torch_scheduler, augment=make_augment(augment),
            aug_gen=torch.Generator(device=self.device),
            callbacks=[cb for cb in sort_callbacks(user_cbs + progress_callbacks(verbose))
                       if ddp.is_main() or not getattr(cb, "main_process_only", False)],  # file writers: rank 0
            user_callbacks=user_cbs, ckpt_path=ckpt_path, checkpoint_every=checkpoint_every, val=val,
            val_batch_size=validation_batch_size, meta={"seed": seed, "n_train": n_train, "batch_size": batch_size},
        )
        history = History()
        state = TrainState(self, self.model, self.optimizer, epochs, steps_per_epoch, history, batch_size=batch_size,
                           checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None)
        self.history = history
        start_batch = 0
        if saved is not None:
            start_batch = self._restore(saved, state, run, n_train, batch_size)
            if state.epoch >= epochs or saved.get("stopped"):
                return history
            if ddp.rank():  # the checkpoint holds rank 0's random state: other ranks draw their own dropout
                torch.manual_seed(derive_seed(seed, ddp.rank(), 3, state.step))
        else:
            torch.manual_seed(seed if not ddp.rank() else derive_seed(seed, ddp.rank(), 3))
        self._train_forward = self._ddp_forward()
        run_event(run.callbacks, "on_train_begin", state)
        try:
            for epoch in range(state.epoch, epochs):
                self._train_epoch(run, state, epoch, start_batch)
                start_batch = 0
                self._end_epoch(run, state, epoch)
                if state.stop_training:
                    break
        finally:
            self._train_forward = None
            run_event(run.callbacks, "on_train_end", state)
            self.model.eval()
            self._train_loss = None
        return history

    def _ddp_forward(self) -> Callable | None:
        """Under torchrun: the model wrapped in DistributedDataParallel (then compiled when asked) for the
        training steps; ``None`` in one process (the steps use ``self._forward``)."""
        if not ddp.is_distributed():
            return None
        wrapped = ddp.wrap_model(self.model, self.device)
        if self.config.compile:
            return torch.compile(wrapped, mode=self.config.compile if isinstance(self.config.compile, str) else None)
        return wrapped

    def _weighted_loss(self, weights: torch.Tensor | None) -> Callable | None:
        """The training loss with per-class ``weights`` (None: the compiled loss as it is)."""
        if weights is None:
            return None
        if self.config.loss not in ("cross_entropy", "sparse_categorical_crossentropy"):
            raise ValueError(f"class_weight applies to the cross_entropy loss on class indices, "
                             f"received loss={self.config.loss!r}: weight that loss inside it")
        weights, smoothing = weights.to(self.device), self.config.label_smoothing
        return lambda logits, y: F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing)

    def _train_epoch(self, run: "_Run", state: TrainState, epoch: int, start_batch: int) -> None:
        """The batches of one epoch (from ``start_batch`` when resuming mid-epoch)."""
        state.epoch = epoch
        if start_batch == 0:
            run.aug_gen.manual_seed(derive_seed(run.meta["seed"], epoch, 1, *([ddp.rank()] if ddp.rank() else [])))
            state.loss_sum = torch.zeros((), device=self.device)
            state.correct = torch.zeros((), device=self.device, dtype=torch.int64)
            state.seen, state.batch, run.seconds = 0, 0, 0.0
        state.logs = {}
        self.model.train()
        run_event(run.callbacks, "on_epoch_begin", state)
        t0 = time.perf_counter()
        for b, (idx, xb, yb) in enumerate(run.loader.indexed_batches(epoch, start_batch), start=start_batch):
            state.batch, state.batch_indices = b, idx
            if run.factor is not None:
                f = run.factor(state.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * f
            run_event(run.callbacks, "on_batch_begin", state)
            # under DDP each rank's mean loss is weighted by its share of the global batch, so that the
            # averaged gradient is the global batch's mean gradient, as in one process
            share = len(yb) * run.loader.world_size / run.loader.global_batch_len(b) if run.loader.world_size > 1 else 1.0
            loss, correct = self._train_step(xb, yb, run.augment, run.aug_gen, epoch, share)
            if run.torch_scheduler is not None:
                run.torch_scheduler.step()
            state.step += 1
            state.batch_loss = loss
            state.loss_sum += loss * len(yb)
            state.correct += correct
            state.seen += len(yb)
            if self.device.type == "cpu" and not torch.isfinite(loss):  # free on CPU; on GPU: at epoch end
                self._diverged(state, run.ckpt_path)
            run_event(run.callbacks, "on_batch_end", state)
            if state.stop_training:
                break
            if run.ckpt_path is not None and run.checkpoint_every and state.step % run.checkpoint_every == 0 \
                    and b + 1 < len(run.loader):
                self._check_finite(state, run.ckpt_path)
                self._save(run, state, batch=b + 1, seconds=run.seconds + time.perf_counter() - t0)
        run.seconds += time.perf_counter() - t0

    def _end_epoch(self, run: "_Run", state: TrainState, epoch: int) -> None:
        """Check the loss, validate, log the epoch, tell the callbacks, write the checkpoint."""
        self._check_finite(state, run.ckpt_path)
        if ddp.is_distributed():  # the epoch's figures over all ranks
            loss_sum, correct, seen = ddp.sum_across(state.loss_sum, state.correct, torch.tensor(state.seen))
            state.loss_sum, state.correct, state.seen = loss_sum, correct.long(), int(seen)
        logs = {"epoch": epoch + 1, **state.running()}
        if run.val is not None:
            v = self._validate(run.val, run.val_batch_size)
            logs.update({"val_loss": v["loss"], "val_accuracy": v["accuracy"]})
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        logs["seconds"] = run.seconds
        state.history.append(logs)
        state.logs = logs
        run_event(run.callbacks, "on_epoch_end", state)
        if run.ckpt_path is not None:
            done = state.stop_training or epoch + 1 == state.epochs
            self._save(run, state, batch=0, epoch=epoch + 1, finished=done, stopped=state.stop_training)

    def _validate(self, val: tuple[Any, torch.Tensor, torch.Tensor | None], batch_size: int) -> dict[str, float]:
        """Validation metrics; under torchrun each rank evaluates its slice and the sums are added up."""
        images, labels, rows = val
        n = len(labels) if rows is None else len(rows)
        if not ddp.is_distributed() or n < ddp.world_size():
            return self._evaluate_tensors(images, labels, batch_size, rows=rows)
        part = ddp.shard(n)
        rows = torch.arange(n)[part] if rows is None else rows[part]
        v = self._evaluate_tensors(images, labels, batch_size, rows=rows)
        n = torch.tensor(float(v["n"]), device=self.device)
        loss_sum, correct, total = ddp.sum_across(n * v["loss"], n * v["accuracy"], n)
        return {"loss": float(loss_sum / total), "accuracy": float(correct.round() / total), "n": int(total)}

    def _train_step(self, xb, yb, augment_fn, aug_gen, epoch, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._normalise(xb)
        if augment_fn is not None:
            x = augment_fn(x, aug_gen, epoch)
        with self._autocast():
            logits = (self._train_forward or self._forward)(x)
        if logits.ndim != 2 or logits.shape[0] != len(yb):
            raise ValueError(f"expected the model to return logits (N={len(yb)}, classes), received {tuple(logits.shape)}")
        if logits.shape[1] < len(self.classes) and not (logits.shape[1] == 1 and len(self.classes) == 2):
            raise ValueError(
                f"the model outputs {logits.shape[1]} logits per image but the data has {len(self.classes)} classes"
            )
        loss = data_loss = (self._train_loss or self._loss_fn)(logits.float(), yb)
        if self.config.l2:
            loss = loss + self.config.l2 * sum(p.square().sum() for p in self.model.parameters() if p.ndim > 1)
        objective = loss if share == 1.0 else loss + data_loss * (share - 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self._scaler is not None:
            self._scaler.scale(objective).backward()
            self._scaler.unscale_(self.optimizer)
            self._clip()
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            objective.backward()
            self._clip()
            self.optimizer.step()
        loss = loss.detach()
        correct = _correct(logits.detach(), yb)
        return loss, correct

    def _clip(self) -> None:
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)

    def _make_schedule(self, epochs: int, steps_per_epoch: int):
        spec = self._schedule_spec
        if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
            return None, spec
        warmup = round(self.config.warmup_epochs * steps_per_epoch)
        if spec is None and not warmup:  # constant: leave the learning rates alone (callbacks may set them)
            return None, None
        total = max(epochs * steps_per_epoch, 1)
        return make_schedule(spec, total_steps=total, steps_per_epoch=steps_per_epoch, warmup_steps=warmup), None

    def _split_validation(self, images, labels, validation, seed):
        """(training rows or None, validation (images, labels, rows or None) or None): a held-out
        fraction is a set of row numbers, so no copy of either part is made."""
        if validation is None:
            return None, None
        if isinstance(validation, float):
            if not 0.0 < validation < 1.0:
                raise ValueError(f"expected a validation fraction in (0, 1), received {validation}")
            n = len(labels)
            n_val = max(1, round(n * validation))
            if n_val >= n:
                raise ValueError(f"validation={validation} leaves no training images out of {n}")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 0, 2)))
            val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
            return train_idx, (images, labels, val_idx)
        v_images, v_labels, _ = _as_data(validation, "validation")
        return None, (v_images, v_labels, None)

    def _set_classes(self, classes, labels) -> None:
        if self.classes is None:
            n = labels.shape[1] if labels.ndim == 2 else max(int(labels.max()) + 1, 2 if self._binary() else 1)
            self.classes = classes if classes is not None else [str(i) for i in range(n)]
        self._check_labels(labels, "labels")

    def _binary(self) -> bool:
        return self.config is not None and self.config.loss == "binary_crossentropy"

    def _check_labels(self, labels: torch.Tensor, name: str) -> None:
        if labels.ndim == 2:
            if labels.shape[1] != len(self.classes):
                raise ValueError(f"expected one-hot {name} with {len(self.classes)} columns (one per class), "
                                 f"received shape {tuple(labels.shape)}")
            return
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise ValueError(
                f"expected {name} in 0..{len(self.classes) - 1} ({len(self.classes)} classes), "
                f"received values from {int(labels.min())} to {int(labels.max())}"
            )

    # ------------------------------------------------------------------ divergence and checkpoints
    def _check_finite(self, state: TrainState, ckpt_path: Path | None) -> None:
        if state.loss_sum is not None and not torch.isfinite(state.loss_sum):
            self._diverged(state, ckpt_path)

    @staticmethod
    def _diverged(state: TrainState, ckpt_path: Path | None) -> None:
        where = f"the last good checkpoint is {ckpt_path}" if ckpt_path is not None and ckpt_path.is_file() else \
            "no checkpoint was written"
        raise TrainingDiverged(
            f"loss became NaN or infinite in epoch {state.epoch + 1}, at or before batch {state.batch + 1} "
            f"(step {state.step}); lower the learning rate or check the data ({where})"
        )

    def _save(self, run: "_Run", state: TrainState, *, batch: int, epoch: int | None = None, finished: bool = False,
              stopped: bool = False, seconds: float = 0.0) -> None:
        """Write the whole training state (``batch > 0``: a checkpoint in the middle of an epoch).
        Under torchrun every rank calls this (the running sums are added up over ranks); rank 0 writes."""
        loss_sum, correct, seen = state.loss_sum, state.correct, state.seen
        if batch and ddp.is_distributed():
            loss_sum, correct, seen = ddp.sum_across(state.loss_sum, state.correct, torch.tensor(state.seen))
            correct, seen = correct.long(), int(seen)
        if not ddp.is_main():
            return
        payload = {
            **run.meta,
            "epoch": state.epoch if epoch is None else epoch,
            "batch": batch,
            "step": state.step,
            "finished": finished,
            "stopped": stopped,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": run.torch_scheduler.state_dict() if run.torch_scheduler is not None else None,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "rng": ckpt.rng_states(),
            "augment_rng": run.aug_gen.get_state(),
            "history": state.history.to_dict(),
            "running": {"loss_sum": loss_sum, "correct": correct, "seen": seen,
                        "seconds": seconds} if batch else None,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else {} for cb in run.user_callbacks],
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "config": self.training_config(),
        }
        ckpt.save_checkpoint(run.ckpt_path, payload)

    def _restore(self, saved: dict, state: TrainState, run: "_Run", n_train: int, batch_size: int) -> int:
        """Load a checkpoint into the model, optimizer, RNGs, callbacks and ``state``; returns the batch to start at."""
        if saved["n_train"] != n_train or saved["batch_size"] != batch_size:
            raise ValueError(
                f"the checkpoint was written for {saved['n_train']} training images in batches of "
                f"{saved['batch_size']}, received {n_train} images in batches of {batch_size}"
            )
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if run.torch_scheduler is not None and saved["scheduler"] is not None:
            run.torch_scheduler.load_state_dict(saved["scheduler"])
        if self._scaler is not None and saved["scaler"] is not None:
            self._scaler.load_state_dict(saved["scaler"])
        self.classes, self.mean, self.std = list(saved["classes"]), list(saved["mean"]), list(saved["std"])
        ckpt.set_rng_states(saved["rng"])
        run.aug_gen.set_state(saved["augment_rng"].cpu())
        state.history.history.update(History(saved["history"]).history)
        state.epoch, state.step, state.batch = saved["epoch"], saved["step"], saved["batch"]
        states, cbs = saved["callbacks"], run.user_callbacks
        if len(states) != len(cbs) and any(states):
            warnings.warn(f"the checkpoint holds the state of {len(states)} callbacks, received {len(cbs)} callbacks: "
                          "their states are not restored", stacklevel=3)
        elif len(states) == len(cbs):
            for cb, cb_state in zip(cbs, states):
                if cb_state and hasattr(cb, "load_state_dict"):
                    cb.load_state_dict(cb_state)
        running = saved["running"]
        if saved["batch"] and running is not None:
            state.loss_sum = running["loss_sum"].to(self.device)
            state.correct = running["correct"].to(self.device)
            state.seen, run.seconds = running["seen"], running["seconds"]
            if ddp.rank():  # the saved sums are over all ranks: rank 0 carries them on
                state.loss_sum, state.correct, state.seen = state.loss_sum * 0, state.correct * 0, 0
        return saved["batch"]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _logits(self, images: Any, batch_size: int | None = None, tta: Any = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of uint8 (or [0, 1] float) images: a tensor (``rows`` of it) or an image source,
        a batch at a time (``batch_size`` None: sized by the input, ``inference_batch_size``)."""
        self._check_ready("predict or evaluate")
        if self.device.type == "cpu":
            retain_freed_memory()  # a CPU forward spends more than half its time in page faults otherwise
        shape = images.shape[1:] if isinstance(images, torch.Tensor) else images.image_shape
        batch_size = batch_size or inference_batch_size(shape)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for xb in _image_batches(images, batch_size, rows):
                x = self._normalise(xb)
                with self._autocast(inference=True):
                    out.append(self._tta(x, tta).float())
        finally:
            self.model.train(was_training)
        if not out:
            raise ValueError("expected at least one image, received none")
        return torch.cat(out)

    def _tta(self, x: torch.Tensor, tta: Any) -> torch.Tensor:
        if tta is None:
            return self._forward(x)
        if callable(tta):
            return tta(self._forward_view, x)
        from imclass.tta import tta_logits

        return tta_logits(self._forward_view, x, tta)

    def _forward_view(self, x: torch.Tensor) -> torch.Tensor:
        """Forward of an augmented view, made dense first: views of padded or flipped batches have
        strides of their own, and each new stride layout would recompile a torch.compile'd model."""
        channels_last = self.config is not None and self.config.channels_last and x.ndim == 4
        return self._forward(x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))

    def _evaluate_tensors(self, images, labels, batch_size: int | None, tta: Any = None,
                          rows: torch.Tensor | None = None) -> dict[str, float]:
        logits = self._logits(images, batch_size, tta, rows)
        labels = (labels if rows is None else labels[rows.to(labels.device)]).to(logits.device)
        loss_fn = self._loss_fn or F.cross_entropy
        loss = loss_fn(logits, labels)
        correct = _correct(logits, labels)
        values = torch.stack([loss.float(), correct.float()]).tolist()
        return {"accuracy": values[1] / len(labels), "loss": values[0], "n": len(labels)}

    def evaluate(self, data: Any, batch_size: int | None = None, tta: Any = None) -> dict[str, float]:
        """Accuracy and mean loss on labelled data (``ImageDataset``, another image source, or
        ``(images, labels)``), a batch at a time (``batch_size`` None: sized by the input size).

        ``tta``: ``None``, a level or name of ``imclass.tta.tta_logits`` (``"flip"``, ``2`` /
        ``"flip_translate"``), or a callable ``(model, x) -> logits``.
        """
        images, labels, _ = _as_data(data)
        self._check_ready("evaluate")
        if self.classes is not None:
            self._check_labels(labels, "labels")
        return self._evaluate_tensors(images, labels, batch_size, tta)

    def predict_logits(self, x: Any, batch_size: int | None = None, tta: Any = None) -> torch.Tensor:
        """Raw model outputs (N, num_classes) on the CPU for images (uint8, or float on [0, 1]; an
        ``ImageDataset`` or another image source is read a batch at a time)."""
        if isinstance(x, ImageDataset):
            x = x.images
        return self._logits(x if _is_source(x) else as_images(x), batch_size, tta).cpu()

    def predict_proba(self, x: Any, batch_size: int | None = None, tta: Any = None) -> torch.Tensor:
        """Class probabilities (N, num_classes): the softmax of the logits; columns follow ``classes``."""
        logits = self.predict_logits(x, batch_size, tta)
        if logits.shape[1] == 1:  # one sigmoid output (binary_crossentropy): P(class 1)
            p = logits.sigmoid()
            return torch.cat([1 - p, p], 1)
        return logits.softmax(1)

    def predict(self, x: Any, batch_size: int | None = None, tta: Any = None) -> torch.Tensor:
        """Predicted class indices as an int64 tensor (N,)."""
        logits = self.predict_logits(x, batch_size, tta)
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)

    # ------------------------------------------------------------------ learning-rate finder
    def lr_find(self, data: Any, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                batch_size: int = 32, seed: int = 0, plot: str | Path | None = None) -> "LRFindResult":
        """Learning-rate range test: train briefly with an exponentially growing learning rate,
        then put the model and optimizer back as they were. Returns the curve and a suggestion
        (``imclass.train.lr_range``: the steepest descent of the smoothed loss before its minimum, after
        cutting the diverged tail, strictly inside the range; ``minimum`` / 10 beside it); ``plot`` writes it."""
        if self.config is None:
            raise RuntimeError("call compile() before lr_find()")
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_state = _clone(self.optimizer.state_dict())
        history, mean, std, classes = self.history, self.mean, self.std, self.classes
        finder = LRFinder(start_lr, end_lr, num_steps)
        n = len(_as_data(data)[1])
        epochs = math.ceil(num_steps / max(1, math.ceil(n / batch_size)))
        schedule, self._schedule_spec = self._schedule_spec, None
        try:
            self.fit(data, epochs=epochs, batch_size=batch_size, callbacks=[finder], seed=seed, verbose=False)
        except TrainingDiverged:
            pass
        finally:
            self._schedule_spec = schedule
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(opt_state)
            self.history = history
            if mean is not None:
                self.mean, self.std = mean, std
            self.classes = classes if classes is not None else self.classes
        result = LRFindResult(finder.lrs, finder.losses, start_lr=start_lr, end_lr=end_lr)
        if plot is not None:
            result.plot(plot)
        return result


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj

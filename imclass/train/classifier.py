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
import warnings
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from imclass import losses
from imclass.optimizers import Optimizer as KerasOptimizer
from imclass.train.checkpoint import Checkpointing
from imclass.train.config import AMP_DTYPES, LOSSES, METRICS, CompileConfig
from imclass.train.device import resolve_device
from imclass.train.inference import Inference
from imclass.train.loop import Fitting
from imclass.train.lr_find import LRFinding
from imclass.train.optim import make_optimizer
from imclass.train.state import History
from imclass.train.step import TrainingStep


class Classifier(Fitting, TrainingStep, Checkpointing, Inference, LRFinding):
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
        self.compile_config: CompileConfig | None = None  # the resolved compile() options (None before compile)
        self.train_config: dict[str, Any] | None = None  # the run's training config (what a model file recorded)
        self.training_metrics: dict[str, Any] | None = None  # the numbers a model file recorded at training time
        self.preprocessing: Any = None  # resize/crop of pretrained weights (imclass.models.weights.Preprocessing)
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
            keras_loss = losses.get(loss)
            if label_smoothing and not keras_loss.label_smoothing:
                keras_loss.label_smoothing = label_smoothing
            loss = keras_loss
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
        self.compile_config = CompileConfig(
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
        """Deprecated alias of ``dataclasses.asdict(clf.compile_config)`` (``{}`` before ``compile``)."""
        warnings.warn("Classifier.training_config() is deprecated: use dataclasses.asdict(clf.compile_config)",
                      DeprecationWarning, stacklevel=2)
        return asdict(self.compile_config) if self.compile_config is not None else {}

    @property
    def config(self) -> CompileConfig | None:
        """Deprecated alias of ``compile_config`` (the resolved ``compile`` options)."""
        warnings.warn("Classifier.config is deprecated: use Classifier.compile_config", DeprecationWarning, stacklevel=2)
        return self.compile_config

    def use_loss(self, loss: Any) -> None:
        """Make ``evaluate`` report ``loss`` (an ``imclass.losses`` object) without compiling an optimizer:
        the loss a model file recorded (``imclass.models.load_model``); ``fit`` still needs ``compile``."""
        self._loss_fn = loss.logits_loss

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
        channels_last = self.compile_config is not None and self.compile_config.channels_last
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
        if self.compile_config is None or not self.compile_config.amp or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        if inference and self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.compile_config.amp])

"""Callbacks: small objects that react to the events of the training loop (fastai-style).

Events, in the order they fire: ``on_train_begin``, then per epoch ``on_epoch_begin``,
``on_batch_begin`` / ``on_batch_end`` per batch, ``on_epoch_end`` (after validation, with
``state.logs`` filled), and finally ``on_train_end``. Each takes the :class:`TrainState`.
Callbacks run sorted by ``order`` (lower first; loggers are late, progress bars last); under
``torchrun`` those with ``main_process_only = True`` (writers, loggers, bars) run on rank 0 only. A callback
stops the run by setting ``state.stop_training = True``. A callback with state that must
survive a resume implements ``state_dict()`` / ``load_state_dict()`` (plain values and tensors).
"""
from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from imclass.model_file.save import save
from imclass.train.state import TrainState
from imclass.visualize.training import save_curves

# Deferred imports (inside functions), for start-up time: torch.utils.tensorboard, tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

EVENTS = ("on_train_begin", "on_epoch_begin", "on_batch_begin", "on_batch_end", "on_epoch_end", "on_train_end")


class Callback:
    """Base class: every event does nothing; override the ones you need."""

    order: int = 0
    main_process_only: bool = False  # True: under torchrun only rank 0 runs it (loggers, writers, bars)

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_begin(self, state: TrainState) -> None: ...
    def on_batch_begin(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (tensors and plain values); saved in training checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


def run_event(callbacks: list, event: str, state: TrainState) -> None:
    """Call ``event`` on every callback that has it (callbacks need not subclass :class:`Callback`)."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(state)


def sort_callbacks(callbacks) -> list:
    """Callbacks sorted by their ``order`` attribute (0 when missing); stable for equal orders."""
    callbacks = list(callbacks)
    for cb in callbacks:
        if not any(hasattr(cb, e) for e in EVENTS):
            raise TypeError(f"expected a callback with one of the methods {EVENTS}, received {cb!r}")
    return sorted(callbacks, key=lambda cb: getattr(cb, "order", 0))


def _mode_for(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"expected mode 'auto', 'min' or 'max', received {mode!r}")
    if mode == "auto":
        return "max" if "acc" in monitor else "min"
    return mode


class _Monitor:
    """Tracks the best value of one logged metric."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.mode = _mode_for(monitor, mode)
        self.min_delta = abs(min_delta)
        self.best = math.inf if self.mode == "min" else -math.inf

    def value(self, state: TrainState) -> float:
        if self.monitor not in state.logs:
            raise KeyError(
                f"expected the monitored metric {self.monitor!r} in the epoch logs {sorted(state.logs)}"
                " (val_* metrics need validation data)"
            )
        return float(state.logs[self.monitor])

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    With ``restore_best=True`` the model gets back the weights of its best epoch at the end.
    """

    order = 50

    def __init__(
        self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0, mode: str = "auto",
        restore_best: bool = False,
    ) -> None:
        if patience < 0:
            raise ValueError(f"expected patience >= 0, received patience={patience}")
        self._m = _Monitor(monitor, mode, min_delta)
        self.patience = patience
        self.restore_best = restore_best
        self.wait = 0
        self.best_epoch = -1
        self.stopped_epoch: int | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None

    @property
    def best(self) -> float:
        """The best value of the monitored metric so far."""
        return self._m.best

    def on_epoch_end(self, state: TrainState) -> None:
        value = self._m.value(state)
        if self._m.improved(value):
            self._m.best, self.wait, self.best_epoch = value, 0, state.epoch
            if self.restore_best:
                self._best_weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.stop_training = True
            self.stopped_epoch = state.epoch

    def on_train_end(self, state: TrainState) -> None:
        if self.restore_best and self._best_weights is not None:
            state.model.load_state_dict(self._best_weights)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"best": self._m.best, "wait": self.wait, "best_epoch": self.best_epoch}
        if self._best_weights is not None:
            out["best_weights"] = self._best_weights
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._m.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]
        self._best_weights = state.get("best_weights")


class ModelCheckpoint(Callback):
    """Save the model at epoch ends: the best one by ``monitor`` (``save_best_only``), or every
    ``every`` epochs (``path`` may contain ``{epoch}``).

    Files are written with ``imclass.io.save`` (a ``.safetensors`` model file with its config)
    when the model can be rebuilt from one (a registry model or an ``imclass.Sequential``); any
    other ``nn.Module`` gets its weights only (safetensors; read back with ``imclass.io.load_weights``).
    """

    order = 60
    main_process_only = True  # writes files or prints: rank 0 only under torchrun

    def __init__(
        self, path: str | Path, monitor: str = "val_loss", mode: str = "auto", save_best_only: bool = True,
        every: int = 1,
    ) -> None:
        if every < 1:
            raise ValueError(f"expected every >= 1, received every={every}")
        self.path = str(path)
        self._m = _Monitor(monitor, mode)
        self.save_best_only = save_best_only
        self.every = every
        self.saved: list[str] = []

    def on_epoch_end(self, state: TrainState) -> None:
        if self.save_best_only:
            value = self._m.value(state)
            if not self._m.improved(value):
                return
            self._m.best = value
        elif (state.epoch + 1) % self.every:
            return
        path = self.path.format(epoch=state.epoch + 1)
        _save_model(state, path)
        self.saved.append(path)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self._m.best, "saved": list(self.saved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._m.best, self.saved = state["best"], list(state["saved"])


def _save_model(state: TrainState, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model = state.model
    if hasattr(model, "imclass_spec") or hasattr(model, "get_config"):  # rebuildable: a full model file
        save(state.classifier, path)
        return
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


class TimeBudget(Callback):
    """Stop training once ``seconds`` of wall time have passed since the first ``on_train_begin``: sets
    ``state.stop_training`` after the batch that spends the budget (``stopped`` then says so). One
    object passed to several ``fit`` calls (the two stages of ``transfer.fine_tune``) shares one budget.

    ``imclass compare`` gives every approach the same budget with it; ``RunConfig(budget=...)`` adds it.
    """

    order = 90  # after the callbacks that log the batch

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"expected a time budget > 0 seconds, received seconds={seconds}")
        self.seconds = float(seconds)
        self.stopped = False
        self._start: float | None = None

    def on_train_begin(self, state: TrainState) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_batch_end(self, state: TrainState) -> None:
        if self._start is not None and time.perf_counter() - self._start >= self.seconds:
            state.stop_training = True
            self.stopped = True


class CSVLogger(Callback):
    """Write the history as CSV (one row per epoch), rewritten at every epoch end so that a
    resumed run's file stays complete and consistent."""

    order = 70
    main_process_only = True  # writes files or prints: rank 0 only under torchrun

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_epoch_end(self, state: TrainState) -> None:
        history = state.history.to_dict()
        keys = list(history)
        rows = zip(*(history[k] for k in keys))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            writer.writerows(rows)


class TensorBoard(Callback):
    """Log epoch metrics (and the batch loss every ``batch_every`` steps) for TensorBoard,
    against the global step."""

    order = 70
    main_process_only = True  # writes files or prints: rank 0 only under torchrun

    def __init__(self, log_dir: str | Path, batch_every: int = 0) -> None:
        self.log_dir = str(log_dir)
        self.batch_every = batch_every
        self._writer = None

    def on_train_begin(self, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run first drops what a killed run logged after its checkpoint
        self._writer = SummaryWriter(self.log_dir, purge_step=state.step or None)

    def on_batch_end(self, state: TrainState) -> None:
        if self.batch_every and state.step % self.batch_every == 0 and state.batch_loss is not None:
            self._writer.add_scalar("batch/loss", state.batch_loss.item(), state.step)

    def on_epoch_end(self, state: TrainState) -> None:
        for key, value in state.logs.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"epoch/{key}", value, state.step)
        self._writer.flush()

    def on_train_end(self, state: TrainState) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TrainingCurves(Callback):
    """Write the training curves as a PNG at every epoch end: two panels, loss | accuracy (training and
    validation), over whole epochs (``imclass.visualize.save_curves``)."""

    order = 80
    main_process_only = True  # writes files or prints: rank 0 only under torchrun

    def __init__(self, path: str | Path, keys=("loss", "val_loss", "accuracy", "val_accuracy")) -> None:
        self.path = Path(path)
        self.keys = tuple(keys)

    def on_epoch_end(self, state: TrainState) -> None:
        history = state.history.to_dict()
        series = {k: history[k] for k in ("epoch", *self.keys) if k in history}
        save_curves(series, self.path, title=f"training curves ({self.path.parent.name})")


class ProgressBar(Callback):
    """A tqdm bar per epoch showing the running loss, accuracy and throughput (images/s).

    The numbers are refreshed every ``refresh_every`` batches, the only moments it waits for the GPU.
    """

    order = 100
    main_process_only = True  # writes files or prints: rank 0 only under torchrun

    def __init__(self, refresh_every: int = 20) -> None:
        self.refresh_every = max(1, refresh_every)
        self._bar = None

    def on_epoch_begin(self, state: TrainState) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=state.steps_per_epoch, initial=state.batch, desc=f"epoch {state.epoch + 1}/{state.epochs}",
                         leave=True, dynamic_ncols=True)
        self._start, self._seen0 = time.perf_counter(), state.seen

    def on_batch_end(self, state: TrainState) -> None:
        self._bar.update(1)
        if (state.batch + 1) % self.refresh_every == 0:
            self._bar.set_postfix(self._postfix(state), refresh=False)

    def on_epoch_end(self, state: TrainState) -> None:
        if self._bar is None:
            return
        post = self._postfix(state)
        post.update({k: f"{v:.4f}" for k, v in state.logs.items() if k.startswith("val_")})
        self._bar.set_postfix(post)
        self._bar.close()
        self._bar = None

    def on_train_end(self, state: TrainState) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _postfix(self, state: TrainState) -> dict[str, str]:
        running = state.running()
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        post = {k: f"{v:.4f}" for k, v in running.items()}
        post["img/s"] = f"{(state.seen - self._seen0) / elapsed:.0f}"
        return post


class LRFinder(Callback):
    """Learning-rate range test (Smith, 2015): raise the learning rate exponentially from
    ``start_lr`` to ``end_lr`` over ``num_steps`` batches, record the loss, stop when it explodes.

    Used by ``Classifier.lr_find``; ``lrs`` and ``losses`` hold the curve.
    """

    order = -10

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, diverge: float = 4.0,
                 smoothing: float = 0.05) -> None:
        if not 0 < start_lr < end_lr:
            raise ValueError(f"expected 0 < start_lr < end_lr, received start_lr={start_lr}, end_lr={end_lr}")
        if num_steps < 2:
            raise ValueError(f"expected num_steps >= 2, received num_steps={num_steps}")
        self.start_lr, self.end_lr, self.num_steps = start_lr, end_lr, num_steps
        self.diverge, self.smoothing = diverge, smoothing
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self._avg = 0.0
        self._best = math.inf

    def lr_at(self, i: int) -> float:
        """The learning rate of step ``i`` of the range test."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.num_steps - 1))

    def on_batch_begin(self, state: TrainState) -> None:
        self._lr = self.lr_at(state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = self._lr

    def on_batch_end(self, state: TrainState) -> None:
        loss = state.batch_loss.item()
        i = len(self.losses)
        self._avg = self.smoothing * loss + (1 - self.smoothing) * self._avg
        smoothed = self._avg / (1 - (1 - self.smoothing) ** (i + 1))  # bias-corrected running mean
        self.lrs.append(self._lr)
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if not math.isfinite(loss) or smoothed > self.diverge * self._best or i + 1 >= self.num_steps:
            state.stop_training = True


def _set_lr(state: TrainState, lr: float) -> None:
    # initial_lr too: the engine recomputes lr = initial_lr * schedule factor before each batch
    for group in state.optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs, then wait ``cooldown`` epochs; never below ``min_lr`` (Keras)."""

    order = 40

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0) -> None:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"expected 0 < factor < 1, received factor={factor}")
        if patience < 0 or cooldown < 0 or min_lr < 0:
            raise ValueError(f"expected patience, cooldown, min_lr >= 0, received {patience}, {cooldown}, {min_lr}")
        self._m = _Monitor(monitor, mode, min_delta)
        self.factor, self.patience, self.cooldown, self.min_lr = factor, patience, cooldown, min_lr
        self.verbose = verbose
        self.wait = 0
        self.cooldown_left = 0

    def on_epoch_end(self, state: TrainState) -> None:
        value = self._m.value(state)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self._m.improved(value):
            self._m.best, self.wait = value, 0
            return
        if self.cooldown_left > 0:
            return
        self.wait += 1
        if self.wait >= self.patience:
            old = float(state.optimizer.param_groups[0]["initial_lr"])
            new = max(old * self.factor, self.min_lr)
            if new < old:
                _set_lr(state, new)
                if self.verbose:
                    print(f"Epoch {state.epoch + 1}: ReduceLROnPlateau reducing learning rate to {new:.4g}.")
            self.cooldown_left, self.wait = self.cooldown, 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self._m.best, "wait": self.wait, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._m.best, self.wait, self.cooldown_left = state["best"], state["wait"], state["cooldown_left"]


class LearningRateScheduler(Callback):
    """Set the learning rate at each epoch start to ``schedule(epoch, lr)`` (epoch from 0, ``lr`` the
    current rate), as Keras does; ``schedule(epoch)`` with one argument works too."""

    order = 40

    def __init__(self, schedule, verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"expected a callable schedule(epoch, lr) -> lr, received {schedule!r}")
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, state: TrainState) -> None:
        lr = float(state.optimizer.param_groups[0]["lr"])
        try:
            new = self.schedule(state.epoch, lr)
        except TypeError:
            new = self.schedule(state.epoch)  # the one-argument form
        if not isinstance(new, (int, float)) or isinstance(new, bool) or not math.isfinite(new) or new < 0:
            raise ValueError(f"the learning-rate schedule returned {new!r} for epoch {state.epoch}; expected a number >= 0")
        _set_lr(state, float(new))
        if self.verbose:
            print(f"Epoch {state.epoch + 1}: LearningRateScheduler setting learning rate to {new:.4g}.")


class EpochLogger(Callback):
    """One line per epoch on stdout (Keras's ``verbose=2``): for logs and pipes, where a progress
    bar's redraws would be noise. ``Classifier.fit(verbose=True)`` uses it when stdout is not a terminal."""

    order = 100
    main_process_only = True  # writes files or prints: rank 0 only under torchrun

    def on_epoch_end(self, state: TrainState) -> None:
        logs = state.logs
        parts = [f"Epoch {state.epoch + 1}/{state.epochs}", f"{logs.get('seconds', 0.0):.0f}s"]
        parts += [f"{k}: {v:.4f}" for k, v in logs.items() if k not in ("epoch", "seconds", "lr")
                  and isinstance(v, (int, float))]
        parts.append(f"lr: {logs.get('lr', float('nan')):.3g}")
        print(" - ".join(parts), flush=True)


def progress_callbacks(verbose: bool | int) -> list[Callback]:
    """What ``fit(verbose=...)`` shows: nothing (``0``/False), a progress bar (``1``/True on a terminal)
    or one line per epoch (``2``, or ``True`` when stdout is not a terminal: logs, pipes, CI)."""
    if not verbose:
        return []
    if verbose == 2 or not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return [EpochLogger()]
    return [ProgressBar()]

"""The training loop of ``Classifier`` (``fit``): one ``FitRun`` set up per call, then epochs of steps
(``imclass.train.step``), validation, callbacks and checkpoints (``imclass.train.checkpoint``).

The loop works on whole in-memory uint8 tensors moved to the device once; a batch is an index
gather, scaled to float and normalised on the device. Losses and correct counts are summed on the
device and read back once per epoch (or per progress-bar refresh), so a GPU step never waits for the host."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from imclass.data.augment import make_augment
from imclass.data.dataset import ImageDataset
from imclass.data.loader import TensorLoader, derive_seed
from imclass.data.source import inference_batch_size
from imclass.train import checkpoint as ckpt
from imclass.train import distributed as ddp
from imclass.train.callbacks import progress_callbacks, run_event, sort_callbacks
from imclass.train.imbalance import class_weights, sample_weights
from imclass.train.inputs import as_data, channel_stats
from imclass.train.memory import retain_freed_memory
from imclass.train.optim import make_schedule
from imclass.train.state import History, TrainState


@dataclass
class FitRun:
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


class Fitting:
    """The training loop of ``Classifier``: ``fit``, its epochs, validation, schedule and data checks. A base of ``Classifier``, whose ``__init__``
    declares the state these methods use."""

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
        if self.compile_config is None or self.optimizer is None:
            raise RuntimeError("call compile() before fit(), e.g. clf.compile('adam', lr=1e-3)")
        if epochs < 0:
            raise ValueError(f"expected epochs >= 0, received epochs={epochs}")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, received batch_size={batch_size}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"expected checkpoint_every >= 1, received checkpoint_every={checkpoint_every}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder holding checkpoint.pt)")
        images, labels, classes = as_data(data)
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
        run = FitRun(
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
        if self.compile_config.compile:
            return torch.compile(wrapped, mode=self.compile_config.compile if isinstance(self.compile_config.compile, str) else None)
        return wrapped

    def _weighted_loss(self, weights: torch.Tensor | None) -> Callable | None:
        """The training loss with per-class ``weights`` (None: the compiled loss as it is)."""
        if weights is None:
            return None
        if self.compile_config.loss not in ("cross_entropy", "sparse_categorical_crossentropy"):
            raise ValueError(f"class_weight applies to the cross_entropy loss on class indices, "
                             f"received loss={self.compile_config.loss!r}: weight that loss inside it")
        weights, smoothing = weights.to(self.device), self.compile_config.label_smoothing
        return lambda logits, y: F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing)

    def _train_epoch(self, run: "FitRun", state: TrainState, epoch: int, start_batch: int) -> None:
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

    def _end_epoch(self, run: "FitRun", state: TrainState, epoch: int) -> None:
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

    def _make_schedule(self, epochs: int, steps_per_epoch: int):
        spec = self._schedule_spec
        if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
            return None, spec
        warmup = round(self.compile_config.warmup_epochs * steps_per_epoch)
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
        v_images, v_labels, _ = as_data(validation, "validation")
        return None, (v_images, v_labels, None)

    def _set_classes(self, classes, labels) -> None:
        if self.classes is None:
            n = labels.shape[1] if labels.ndim == 2 else max(int(labels.max()) + 1, 2 if self._binary() else 1)
            self.classes = classes if classes is not None else [str(i) for i in range(n)]
        self._check_labels(labels, "labels")

    def _binary(self) -> bool:
        return self.compile_config is not None and self.compile_config.loss == "binary_crossentropy"

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

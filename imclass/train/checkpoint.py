"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python values (model and optimizer state dicts,
epoch/step counters, RNG states as uint8 tensors, the history), so loading it never unpickles
code. It is written to a temporary file in the same folder, flushed and fsync'ed, then moved
over ``checkpoint.pt`` with ``os.replace``: a run killed at any moment leaves either the old
or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import errno
import os
import random
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any


import numpy as np
import torch

from imclass.train import distributed as ddp
from imclass.train.state import History, TrainingDiverged, TrainState

if TYPE_CHECKING:
    from imclass.train.loop import FitRun

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as err:  # torch's writer reports a full disk as "unexpected pos ..." / "failed writing"
        Path(tmp).unlink(missing_ok=True)
        raise OSError(errno.EIO, f"writing failed ({str(err).splitlines()[0][:80]}): disk full or a file size "
                      "limit? The previous checkpoint is kept", str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles code)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise ValueError(f"cannot read training checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"expected an imclass training checkpoint (format {FORMAT_VERSION}) at {path}")
    return payload


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, numpy, random) as weights-only values."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "random": _python_random_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["random"]
    random.setstate((version, tuple(internal), gauss))


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


class Checkpointing:
    """Divergence checks and the checkpoints of a ``Classifier`` fit (save, restore). A base of ``Classifier``, whose ``__init__``
    declares the state these methods use."""

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

    def _save(self, run: "FitRun", state: TrainState, *, batch: int, epoch: int | None = None, finished: bool = False,
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
            "rng": rng_states(),
            "augment_rng": run.aug_gen.get_state(),
            "history": state.history.to_dict(),
            "running": {"loss_sum": loss_sum, "correct": correct, "seen": seen,
                        "seconds": seconds} if batch else None,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else {} for cb in run.user_callbacks],
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "config": asdict(self.compile_config) if self.compile_config is not None else {},
        }
        save_checkpoint(run.ckpt_path, payload)

    def _restore(self, saved: dict, state: TrainState, run: "FitRun", n_train: int, batch_size: int) -> int:
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
        set_rng_states(saved["rng"])
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

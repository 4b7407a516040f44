"""What the training loop shares with callbacks: the run's state and its per-epoch history."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from imclass.train.classifier import Classifier


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and step."""


class History:
    """Per-epoch metrics as a dict of lists (``history["val_accuracy"][-1]``), like Keras's ``History``.

    Keys: ``epoch``, ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` (with validation),
    ``lr`` (at the end of the epoch) and ``seconds`` (wall time of the epoch).
    """

    def __init__(self, history: dict[str, list] | None = None) -> None:
        self.history: dict[str, list] = {k: list(v) for k, v in (history or {}).items()}

    def append(self, logs: dict[str, Any]) -> None:
        """Add one epoch's logs (missing keys of earlier epochs are not back-filled)."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> list:
        return self.history[key]

    def __contains__(self, key: str) -> bool:
        return key in self.history

    def __len__(self) -> int:
        return len(self.history.get("epoch", []))

    def keys(self):
        """The names of the logged metrics."""
        return self.history.keys()

    def last(self) -> dict[str, Any]:
        """The logs of the last epoch (empty before the first one ends)."""
        return {k: v[-1] for k, v in self.history.items() if v}

    def to_dict(self) -> dict[str, list]:
        """A copy of plain Python lists (what checkpoints and CSV files hold)."""
        return {k: list(v) for k, v in self.history.items()}

    def __repr__(self) -> str:
        return f"History({self.last()!r}, epochs={len(self)})"


@dataclass
class TrainState:
    """The state of a ``fit`` call, passed to every callback event.

    ``epoch`` counts from 0 (the epoch running, or just finished at ``on_epoch_end``); ``step``
    is the number of optimizer steps done so far over the whole run; ``batch`` the index of the
    batch within the epoch, ``batch_indices`` the training-set indices of its images. ``batch_loss`` is the last batch's mean loss as a device tensor (read
    it with ``.item()`` only when needed: that waits for the GPU). ``logs`` holds the epoch's
    metrics at ``on_epoch_end``. Set ``stop_training = True`` to end training after the current
    batch.
    """

    classifier: "Classifier"
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    history: History
    epoch: int = 0
    step: int = 0
    batch: int = 0
    batch_size: int = 0
    batch_indices: torch.Tensor | None = None
    batch_loss: torch.Tensor | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    stop_training: bool = False
    checkpoint_dir: str | None = None
    # running sums of the epoch, kept on the device (no GPU sync per step)
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    seen: int = 0

    def running(self) -> dict[str, float]:
        """Mean loss and accuracy of the epoch so far (waits for the device once)."""
        if not self.seen or self.loss_sum is None:
            return {}
        values = torch.stack([self.loss_sum.float(), self.correct.float()]).tolist()
        return {"loss": values[0] / self.seen, "accuracy": values[1] / self.seen}

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (``epochs * steps_per_epoch``)."""
        return self.epochs * self.steps_per_epoch

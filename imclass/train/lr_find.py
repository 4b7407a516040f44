"""The learning-rate finder (``Classifier.lr_find``): a short run with the learning rate growing
exponentially, the smoothed loss against it, and a suggestion."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from imclass.train.callbacks import LRFinder
from imclass.train.inputs import as_data
from imclass.train.state import TrainingDiverged
from imclass.visualize import save_line_plot


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


@dataclass
class LRFindResult:
    """Learning rates tried, the smoothed loss at each, and the suggested learning rate."""

    lrs: list[float]
    losses: list[float]
    suggestion: float = field(init=False)

    def __post_init__(self) -> None:
        self.suggestion = suggest_lr(self.lrs, self.losses)

    def plot(self, path: str | Path) -> Path:
        """Write loss against learning rate (log scale) as a PNG, the suggestion marked."""
        marks = {f"suggestion {self.suggestion:.2g}": self.suggestion} if math.isfinite(self.suggestion) else None
        return save_line_plot(self.lrs, {"loss": self.losses}, path, xlabel="learning rate",
                              ylabel="loss (smoothed)", logx=True, marks=marks)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The learning rate where the loss falls fastest (per log-lr), before the loss minimum."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if len(finite) < 3:
        return float("nan")
    lr_t = torch.tensor([f[0] for f in finite], dtype=torch.float64)
    loss_t = torch.tensor([f[1] for f in finite], dtype=torch.float64)
    end = int(loss_t.argmin()) + 1
    if end < 3:
        return float(lr_t[0])
    slope = (loss_t[1:end] - loss_t[: end - 1]) / (lr_t[1:end].log() - lr_t[: end - 1].log())
    return float(lr_t[int(slope.argmin())])


class LRFinding:
    """The learning-rate finder of ``Classifier`` (Smith's range test). A base of ``Classifier``, whose ``__init__``
    declares the state these methods use."""

    # ------------------------------------------------------------------ learning-rate finder
    def lr_find(self, data: Any, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                batch_size: int = 32, seed: int = 0, plot: str | Path | None = None) -> "LRFindResult":
        """Learning-rate range test: train briefly with an exponentially growing learning rate,
        then put the model and optimizer back as they were. Returns the curve and a suggestion
        (the steepest descent of the smoothed loss); ``plot`` writes it as a PNG."""
        if self.compile_config is None:
            raise RuntimeError("call compile() before lr_find()")
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt_state = _clone(self.optimizer.state_dict())
        history, mean, std, classes = self.history, self.mean, self.std, self.classes
        finder = LRFinder(start_lr, end_lr, num_steps)
        n = len(as_data(data)[1])
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
        result = LRFindResult(finder.lrs, finder.losses)
        if plot is not None:
            result.plot(plot)
        return result

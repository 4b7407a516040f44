"""The learning-rate finder (``Classifier.lr_find``): a short run with the learning rate growing
exponentially, the smoothed loss against it, and a suggestion."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from imclass.train.callbacks import LRFinder
from imclass.train.inputs import as_data
from imclass.train.lr_range import LRFindResult
from imclass.train.state import TrainingDiverged


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


class LRFinding:
    """The learning-rate finder of ``Classifier`` (Smith's range test). A base of ``Classifier``, whose ``__init__``
    declares the state these methods use."""

    # ------------------------------------------------------------------ learning-rate finder
    def lr_find(self, data: Any, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                batch_size: int = 32, seed: int = 0, plot: str | Path | None = None) -> "LRFindResult":
        """Learning-rate range test: train briefly with an exponentially growing learning rate,
        then put the model and optimizer back as they were. Returns the curve and a suggestion
        (``imclass.train.lr_range``: the steepest descent of the smoothed loss before its minimum, after
        cutting the diverged tail, strictly inside the range; ``minimum`` / 10 beside it); ``plot`` writes it."""
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
        result = LRFindResult(finder.lrs, finder.losses, start_lr=start_lr, end_lr=end_lr)
        if plot is not None:
            result.plot(plot)
        return result

"""One optimisation step of ``Classifier``: forward (autocast), loss, backward, gradient clipping, update."""
from __future__ import annotations

import torch

from imclass.train.inputs import count_correct


class TrainingStep:
    """One optimisation step of ``Classifier``: forward, loss, backward, clipping, update. A base of ``Classifier``, whose ``__init__``
    declares the state these methods use."""

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
        if self.compile_config.l2:
            loss = loss + self.compile_config.l2 * sum(p.square().sum() for p in self.model.parameters() if p.ndim > 1)
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
        correct = count_correct(logits.detach(), yb)
        return loss, correct

    def _clip(self) -> None:
        if self.compile_config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.compile_config.grad_clip)

"""Inference of ``Classifier``: batched logits with test-time augmentation, ``evaluate``, ``predict``."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from imclass.data.arrays import as_images
from imclass.data.dataset import ImageDataset
from imclass.data.source import inference_batch_size
from imclass.train.inputs import as_data, count_correct, image_batches, is_source
from imclass.train.memory import retain_freed_memory
from imclass.tta import tta_logits


class Inference:
    """Inference of ``Classifier``: logits (with test-time augmentation), evaluate, predict. A base of ``Classifier``, whose ``__init__``
    declares the state these methods use."""

    # ------------------------------------------------------------------ inference
    def _logits(self, images: Any, batch_size: int | None = None, tta: Any = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of uint8 (or [0, 1] float) images: a tensor (``rows`` of it) or an image source,
        a batch at a time (``batch_size`` None: sized by the input, ``inference_batch_size``)."""
        return self._batched(images, batch_size, rows, lambda x: self._tta(x, tta))

    @torch.no_grad()
    def _batched(self, images: Any, batch_size: int | None, rows: torch.Tensor | None,
                 forward: Any) -> torch.Tensor:
        """``forward`` of normalised batches of ``images`` (eval mode, autocast), concatenated as float."""
        self._check_ready("predict or evaluate")
        if self.device.type == "cpu":
            retain_freed_memory()  # a CPU forward spends more than half its time in page faults otherwise
        shape = images.shape[1:] if isinstance(images, torch.Tensor) else images.image_shape
        batch_size = batch_size or inference_batch_size(shape)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for xb in image_batches(images, batch_size, rows):
                x = self._normalise(xb)
                with self._autocast(inference=True):
                    out.append(forward(x).float())
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
        return tta_logits(self._forward_view, x, tta)

    def _forward_view(self, x: torch.Tensor) -> torch.Tensor:
        """Forward of an augmented view, made dense first: views of padded or flipped batches have
        strides of their own, and each new stride layout would recompile a torch.compile'd model."""
        channels_last = self.compile_config is not None and self.compile_config.channels_last and x.ndim == 4
        return self._forward(x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))

    def _evaluate_tensors(self, images, labels, batch_size: int | None, tta: Any = None,
                          rows: torch.Tensor | None = None) -> dict[str, float]:
        logits = self._logits(images, batch_size, tta, rows)
        labels = (labels if rows is None else labels[rows.to(labels.device)]).to(logits.device)
        loss_fn = self._loss_fn or F.cross_entropy
        loss = loss_fn(logits, labels)
        correct = count_correct(logits, labels)
        values = torch.stack([loss.float(), correct.float()]).tolist()
        return {"accuracy": values[1] / len(labels), "loss": values[0], "n": len(labels)}

    def evaluate(self, data: Any, batch_size: int | None = None, tta: Any = None) -> dict[str, float]:
        """Accuracy and mean loss on labelled data (``ImageDataset``, another image source, or
        ``(images, labels)``), a batch at a time (``batch_size`` None: sized by the input size).

        ``tta``: ``None``, a level or name of ``imclass.tta.tta_logits`` (``"flip"``, ``2`` /
        ``"flip_translate"``), or a callable ``(model, x) -> logits``.
        """
        images, labels, _ = as_data(data)
        self._check_ready("evaluate")
        if self.classes is not None:
            self._check_labels(labels, "labels")
        return self._evaluate_tensors(images, labels, batch_size, tta)

    def predict_logits(self, x: Any, batch_size: int | None = None, tta: Any = None) -> torch.Tensor:
        """Raw model outputs (N, num_classes) on the CPU for images (uint8, or float on [0, 1]; an
        ``ImageDataset`` or another image source is read a batch at a time)."""
        if isinstance(x, ImageDataset):
            x = x.images
        return self._logits(x if is_source(x) else as_images(x), batch_size, tta).cpu()

    def predict_proba(self, x: Any, batch_size: int | None = None, tta: Any = None) -> torch.Tensor:
        """Class probabilities (N, num_classes): the softmax of the logits; columns follow ``classes``."""
        logits = self.predict_logits(x, batch_size, tta)
        if logits.shape[1] == 1:  # one sigmoid output (binary_crossentropy): P(class 1)
            p = logits.sigmoid()
            return torch.cat([1 - p, p], 1)
        return logits.softmax(1)

    def predict_features(self, x: Any, batch_size: int | None = None) -> torch.Tensor:
        """The features the classifier head sees (N, D), float32 on the CPU: timm's
        ``forward_head(forward_features(x), pre_logits=True)`` of the model (the penultimate layer), for
        images as ``predict`` takes them. A model without that contract raises a ``TypeError``."""
        model = self.model
        if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
            raise TypeError(f"a {type(model).__name__} has no forward_features/forward_head (timm's contract): "
                            "its penultimate features are not defined")
        if isinstance(x, ImageDataset):
            x = x.images

        def penultimate(v: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(v), pre_logits=True).flatten(1)

        return self._batched(x if is_source(x) else as_images(x), batch_size, None, penultimate).cpu()

    def predict(self, x: Any, batch_size: int | None = None, tta: Any = None) -> torch.Tensor:
        """Predicted class indices as an int64 tensor (N,)."""
        logits = self.predict_logits(x, batch_size, tta)
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)

"""Keras's ``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``save`` for ``Sequential`` and ``Model``,
done by ``Classifier`` (the one engine): this module only converts what Keras users hold.

* ``x``: numpy arrays, tensors or lists (made tensors by the one ``imclass.data.arrays.as_tensor``, as
  ``Classifier.fit`` does), channels-last ``(N, H, W, C)`` or channels-first ``(N, C, H, W)``
  (decided by the model's input shape), uint8 (scaled by 1/255) or float (already divided by 255).
  Flat features ``(N, F)`` travel through the image-based engine as one-row grey images
  ``(N, 1, 1, F)``; the models flatten them back (``imclass.nn.shapes.adapt_flat_input``).
* ``y``: what the loss expects (``imclass.losses``): one-hot / soft rows for
  ``categorical_crossentropy``, integers for ``sparse_categorical_crossentropy``, 0/1 for
  ``binary_crossentropy``; labels that do not fit raise an error saying which loss expects what.
* No normalisation beyond uint8 / 255 (as Keras): the Classifier's mean is 0 and std 1 unless
  ``compile(mean=..., std=...)`` says otherwise, or the model holds pretrained weights (an
  application built with ``weights=``): then their mean/std (``model.preprocessing``), so images
  are given as uint8 or / 255 and Keras's ``preprocess_input`` is not needed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from imclass import losses, optimizers
from imclass.data.arrays import as_tensor
from imclass.model_file.save import save
from imclass.nn.model_layer import ModelLayer
from imclass.nn.symbolic import is_symbolic
from imclass.summarize import summary
from imclass.train.classifier import Classifier
from imclass.train.state import History

__all__ = ["KerasMethods", "KerasState", "compile_model", "evaluate_model", "fit_model", "predict_model", "save_model"]

METRIC_NAMES = {"accuracy": "accuracy", "acc": "accuracy", "categorical_accuracy": "accuracy",
                "sparse_categorical_accuracy": "accuracy", "binary_accuracy": "accuracy"}


@dataclass
class KerasState:
    """What ``compile`` set up on a Keras-style model: the engine's Classifier, the loss object and
    the metric names (they decide the shape of ``evaluate``'s result)."""

    classifier: Classifier
    loss: Any = None
    metrics: list[str] = field(default_factory=list)
    compiled: bool = False


def _outputs(model: nn.Module) -> int:
    shape = tuple(getattr(model, "output_shape", ()) or ())
    if len(shape) != 1:
        raise ValueError(f"expected a model ending in class scores (N, classes), this one outputs {shape}: "
                         "end it with Flatten()/GlobalAveragePooling2D() and Dense(classes, activation='softmax')")
    return shape[0]


def _channels(model: nn.Module) -> int:
    shape = tuple(model.input_shape)
    return shape[0] if len(shape) == 3 else 1


def _state(model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           device: str = "auto") -> KerasState:
    """The model's KerasState, made (uncompiled, identity normalisation) when missing."""
    state = model.__dict__.get("_keras_state")
    if state is None or mean is not None or std is not None:
        c = _channels(model)
        pre = weights_preprocessing(model)
        if pre is not None and mean is None and std is None and len(pre.mean) == c:
            mean, std = list(pre.mean), list(pre.std)
        mean = [0.0] * c if mean is None else list(mean)
        std = [1.0] * c if std is None else list(std)
        old = state
        state = KerasState(Classifier(model, mean=mean, std=std, device=device))
        if old is not None:
            state.classifier.classes = old.classifier.classes
        model._keras_state = state
    return state


def weights_preprocessing(model: nn.Module) -> Any:
    """The preprocessing that pretrained weights inside ``model`` expect (an application built with
    ``weights=``, possibly under a new head), or None."""
    pre = getattr(model, "preprocessing", None)
    if pre is not None:
        return pre
    for layer in getattr(model, "layers", []) or []:
        report = getattr(layer, "load_report", None)
        if report is not None and getattr(report, "preprocessing", None) is not None:
            return report.preprocessing
    return None


def compile_model(model: nn.Module, optimizer: Any = "rmsprop", loss: Any = None, metrics: Sequence[Any] | None = None,
                  *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, device: str = "auto",
                  **options: Any) -> None:
    """``model.compile(optimizer, loss, metrics)`` -> ``Classifier.compile`` with the loss and optimizer objects."""
    if loss is None:
        raise ValueError("compile needs a loss, e.g. loss='categorical_crossentropy' (one-hot labels) or "
                         "loss='sparse_categorical_crossentropy' (integer labels)")
    loss_obj = losses.get(loss)
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizers.get(optimizer)
    names = []
    for m in metrics or []:
        key = m if isinstance(m, str) else getattr(m, "name", None)
        if key not in METRIC_NAMES:
            raise ValueError(f"unknown metric {m!r}; expected one of {sorted(METRIC_NAMES)}")
        names.append(METRIC_NAMES[key])
    _outputs(model)
    prior = model.__dict__.get("_keras_state")
    state = _state(model, mean, std, device) if prior is None or mean is not None or std is not None else prior
    state.classifier.compile(opt, loss=loss_obj, metrics=("accuracy",), **options)
    state.loss, state.metrics, state.compiled = loss_obj, names, True


def _compiled(model: nn.Module, what: str) -> KerasState:
    state = model.__dict__.get("_keras_state")
    if state is None or not state.compiled:
        raise RuntimeError(f"call model.compile(loss=..., optimizer=...) before model.{what}()")
    return state


def as_model_input(model: nn.Module, x: Any, what: str = "x") -> torch.Tensor:
    """User inputs -> what the engine carries for ``model``: uint8 or float32 ``(N, C, H, W)`` images
    (channels-last turned around) or ``(N, 1, 1, F)`` for flat features."""
    t = as_tensor(x, name=what).detach()
    if t.dtype == torch.bool or (not t.is_floating_point() and t.dtype != torch.uint8):
        t = t.float()
    elif t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    expected = tuple(model.input_shape)
    n = t.shape[0] if t.ndim else 0
    if len(expected) == 1:
        if t.ndim == 2 and t.shape[1] == expected[0]:
            return t.reshape(n, 1, 1, expected[0])
        raise ValueError(f"expected {what} of shape (N, {expected[0]}) for a model with input_dim={expected[0]}, "
                         f"received shape {tuple(t.shape)}")
    c, h, w = expected
    if t.ndim == 3 and c == 1:
        t = t.unsqueeze(1)
    if t.ndim == 4 and tuple(t.shape[1:]) == (c, h, w):
        return t
    if t.ndim == 4 and tuple(t.shape[1:]) == (h, w, c):
        return t.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    raise ValueError(f"expected {what} of shape (N, {h}, {w}, {c}) (channels last) or (N, {c}, {h}, {w}) for this "
                     f"model's input, received shape {tuple(t.shape)}")


def _targets(state: KerasState, model: nn.Module, y: Any, n: int, what: str = "y") -> torch.Tensor:
    if y is None:
        raise ValueError(f"expected labels {what}, received None")
    t = state.loss.targets(as_tensor(y, name=what).detach(), _outputs(model))
    if len(t) != n:
        raise ValueError(f"expected {n} labels in {what} (one per input), received {len(t)}")
    return t


def _verbose(verbose: Any) -> int:
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2, True, False):
        raise ValueError(f"expected verbose 'auto', 0, 1 or 2, received verbose={verbose!r}")
    return int(verbose)


def fit_model(model: nn.Module, x: Any, y: Any, *, batch_size: int | None = None, epochs: int = 1, verbose: Any = "auto",
              callbacks: Sequence[Any] | None = None, validation_split: float = 0.0, validation_data: Any = None,
              shuffle: bool = True, **options: Any) -> History:
    """``model.fit(...)`` -> ``Classifier.fit``. ``validation_split`` holds out the *last* fraction of
    the samples, before shuffling (as Keras); other ``options`` go to ``Classifier.fit`` (``seed``, ``augment``, ...)."""
    state = _compiled(model, "fit")
    images = as_model_input(model, x)
    labels = _targets(state, model, y, len(images))
    validation = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("expected validation_data=(x_val, y_val); sample weights are not supported")
        v_images = as_model_input(model, validation_data[0], "validation_data x")
        validation = (v_images, _targets(state, model, validation_data[1], len(v_images), "validation_data y"))
    elif validation_split:
        if not 0.0 < validation_split < 1.0:
            raise ValueError(f"expected 0 < validation_split < 1, received validation_split={validation_split}")
        split_at = int(math.floor(len(images) * (1.0 - validation_split)))  # Keras: the last samples
        if split_at < 1 or split_at >= len(images):
            raise ValueError(f"validation_split={validation_split} leaves no training or no validation samples "
                             f"out of {len(images)}")
        validation = (images[split_at:], labels[split_at:])
        images, labels = images[:split_at], labels[:split_at]
    clf = state.classifier
    if clf.classes is None:
        n = _outputs(model)
        clf.classes = [str(i) for i in range(2 if n == 1 else n)]
    history = clf.fit((images, labels), epochs=epochs, batch_size=batch_size or 32, validation=validation,
                      callbacks=list(callbacks or ()), verbose=_verbose(verbose), shuffle=shuffle, **options)
    model.history = history
    return history


def evaluate_model(model: nn.Module, x: Any, y: Any, *, batch_size: int | None = None, verbose: Any = "auto",
                   return_dict: bool = False) -> Any:
    """``model.evaluate(x, y)``: the mean loss, or ``[loss, accuracy]`` when metrics were compiled."""
    state = _compiled(model, "evaluate")
    images = as_model_input(model, x)
    labels = _targets(state, model, y, len(images))
    result = state.classifier.evaluate((images, labels), batch_size=batch_size or 256)
    values = {"loss": result["loss"], **{m: result[m] for m in state.metrics}}
    if _verbose(verbose):
        print(" - ".join(f"{k}: {v:.4f}" for k, v in values.items()), flush=True)
    if return_dict:
        return values
    return values["loss"] if not state.metrics else list(values.values())


def predict_model(model: nn.Module, x: Any, *, batch_size: int | None = None) -> np.ndarray:
    """``model.predict(x)``: the outputs as float32 numpy with the final softmax / sigmoid applied (as
    Keras: class probabilities for the course's models); no compile needed."""
    state = _state(model)
    logits = state.classifier.predict_logits(as_model_input(model, x), batch_size=batch_size or 256)
    final = getattr(model, "final_activation", None)
    if final == "softmax":
        logits = logits.softmax(1)
    elif final == "sigmoid":
        logits = logits.sigmoid()
    return logits.numpy().astype(np.float32)


def save_model(model: nn.Module, filepath: str | Path) -> Path:
    """``model.save(path)``: one imclass ``.safetensors`` model file (Keras's ``.h5``/``.keras`` suffixes
    are replaced, with a warning: the file is not HDF5)."""
    path = Path(filepath)
    if path.suffix in (".h5", ".keras", ".hdf5"):
        new = path.with_suffix(".safetensors")
        warnings.warn(f"imclass writes .safetensors model files, not {path.suffix}: saving to {new}", stacklevel=3)
        path = new
    state = model.__dict__.get("_keras_state")
    if state is not None and state.classifier.classes is not None:
        return save(state.classifier, path)
    return save(model, path)


class KerasMethods:
    """Keras's model methods on ``Sequential`` and ``Model``, all delegating to ``imclass.Classifier``
    (the one engine; this module's functions convert what Keras users hold)."""

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, metrics: Sequence[Any] | None = None,
                **options: Any) -> None:
        """Keras's ``compile``: an optimizer (name or ``imclass.optimizers`` object), a loss (name or
        ``imclass.losses`` object) and ``metrics`` (``["accuracy"]``). Other ``options`` go to
        ``Classifier.compile`` (``label_smoothing``, ``amp``, ...); ``mean``/``std`` set the input
        normalisation (default: none beyond uint8 / 255, as Keras)."""
        compile_model(self, optimizer, loss, metrics, **options)

    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 1, verbose: Any = "auto",
            callbacks: Sequence[Any] | None = None, validation_split: float = 0.0, validation_data: Any = None,
            shuffle: bool = True, **options: Any) -> Any:
        """Keras's ``fit`` on numpy arrays or tensors (channels-last or -first, uint8 or float / 255;
        labels as the loss expects). Returns the ``History`` (``history.history["loss"]``)."""
        return fit_model(self, x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                         validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
                         **options)

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None, verbose: Any = "auto",
                 return_dict: bool = False) -> Any:
        """Keras's ``evaluate``: the loss, or ``[loss, accuracy]`` when ``metrics=["accuracy"]`` was compiled."""
        return evaluate_model(self, x, y, batch_size=batch_size, verbose=verbose, return_dict=return_dict)

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = 0) -> Any:
        """Keras's ``predict``: the model's outputs as numpy, the final softmax/sigmoid applied
        (class probabilities); ``predict(x).argmax(1)`` gives the classes."""
        return predict_model(self, x, batch_size=batch_size)

    def summary(self, print_fn: Any = None) -> int:
        """Print the table of layers, output shapes and parameter counts; returns the parameter count."""
        return summary(self, self.input_shape, print_fn=print_fn or print)

    def save(self, filepath: Any) -> Any:
        """Write one imclass model file (``.safetensors``: weights, architecture, and once trained the
        classes, normalisation and training config); ``imclass.models.load_model`` reads it back."""
        return save_model(self, filepath)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a symbolic tensor (functional API): the whole model becomes one layer of a bigger graph
        first = args[0] if args else None
        if is_symbolic(first):
            return ModelLayer(self)(first)
        return nn.Module.__call__(self, *args, **kwargs)

    def attach_classifier(self, classifier: Classifier, loss: Any = None) -> None:
        """Make ``classifier`` (e.g. a loaded model file's) the engine behind ``fit`` / ``evaluate`` /
        ``predict``; with ``loss`` (an ``imclass.losses`` object) ``evaluate`` works without ``compile``
        (``fit`` still needs it: model files hold no optimizer state)."""
        state = KerasState(classifier)
        if loss is not None:
            classifier.use_loss(loss)
            state.loss, state.compiled = loss, True
        self._keras_state = state

    @property
    def classifier(self) -> Any:
        """The ``imclass.Classifier`` that ``compile`` made (``None`` before)."""
        state = self.__dict__.get("_keras_state")
        return state.classifier if state is not None else None


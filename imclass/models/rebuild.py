"""Rebuilding what a model file holds (``imclass.load``): a ``Classifier`` (its model in eval mode), a
``KNN`` or a bare model, through the model registry, ``Sequential.from_config`` or
``Model.from_config``; and Keras's ``load_model``. The file itself is read by ``imclass.model_file``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imclass import losses
from imclass.knn import KNN
from imclass.model_file.format import (
    TORCH_SUFFIXES,
    ModelFileError,
    few,
    load_state,
    read_metadata,
    read_tensors,
    resolve_path,
    short_json,
)
from imclass.models._registry import create
from imclass.models.functional import Model
from imclass.models.keras_training import KerasMethods
from imclass.models.sequential import Sequential
from imclass.models.weights import Preprocessing
from imclass.train.classifier import Classifier

__all__ = ["WEIGHT_SOURCE_OPTIONS", "check_size_before_building", "load", "load_model", "rebuild_model"]

WEIGHT_SOURCE_OPTIONS = {"pretrained", "pretrained_file", "checkpoint_path"}


def load(path: str | os.PathLike, *, device: str = "auto") -> Any:
    """Rebuild what ``save`` wrote: a ``Classifier`` (model in eval mode), a ``KNN`` or a bare model.

    ``path`` is a ``.safetensors`` file or a run folder holding ``model.safetensors``. A Classifier
    and a KNN get ``training_metrics``: the ``metrics`` dict ``save`` recorded, or ``None``.
    """
    path = resolve_path(path)
    if path.suffix in TORCH_SUFFIXES:
        raise ModelFileError(
            f"{path}: expected an imclass .safetensors model file; a torch file holds weights only: build the "
            "model and copy them in with imclass.io.load_weights(model, path)"
        )
    header = read_metadata(path)
    tensors = read_tensors(path)
    kind = header["kind"]
    metrics = header.get("metrics") if isinstance(header.get("metrics"), dict) else None
    if kind == "knn":
        knn = rebuild_knn(path, header, tensors)
        knn.training_metrics = metrics
        return knn
    check_size_before_building(path, header["architecture"], tensors)
    model = rebuild_model(path, header["architecture"])
    load_state(model, tensors, path)
    model.eval()
    if kind == "model":
        return model
    pre = header.get("preprocessing") or {}
    clf = Classifier(model, classes=header.get("classes"), mean=pre.get("mean"), std=pre.get("std"), device=device)
    clf.model.eval()
    clf.input_size = tuple(pre["input_size"]) if pre.get("input_size") else None
    clf.tta = pre.get("tta")
    clf.train_config = header.get("train_config")
    clf.training_metrics = metrics  # what training measured (None in files written without metrics)
    if pre.get("crop") and pre.get("mean") and pre.get("input_size"):  # resize / centre-crop of pretrained weights
        clf.preprocessing = model.preprocessing = Preprocessing.from_dict(pre)
    return clf


def rebuild_model(path: Path, arch: dict) -> nn.Module:
    """The network a model file's ``architecture`` describes (a registry spec, a Sequential or a Model
    config), its weights not yet loaded; a ``ModelFileError`` naming ``path`` when it cannot be built."""
    try:
        if "sequential" in arch:
            return Sequential.from_config(arch["sequential"])
        if "functional" in arch:
            return Model.from_config(arch["functional"])
        if "name" in arch:
            # the weights come from this file: options that load weights from elsewhere are dropped
            options = {k: v for k, v in (arch.get("options") or {}).items() if k not in WEIGHT_SOURCE_OPTIONS}
            return create(arch["name"], **options)
    except Exception as err:
        raise ModelFileError(f"{path}: cannot rebuild the architecture {short_json(arch)}: {err}") from None
    raise ModelFileError(f"{path}: unknown architecture description {short_json(arch)} (expected 'name' or 'sequential')")


def check_size_before_building(path: Path, arch: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Build the architecture on the meta device (no memory) and compare it with the file's tensors, so that
    a description asking for more than the file holds (``num_classes: 100000000``) fails before allocating."""
    try:
        with torch.device("meta"):
            probe = rebuild_model(path, arch)
    except ModelFileError:
        raise
    except Exception:  # an architecture that computes while it is built: the real build checks it
        return
    own = probe.state_dict()
    wrong = [f"{k}: model {tuple(own[k].shape)} vs file {tuple(tensors[k].shape)}"
             for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if wrong:
        raise ModelFileError(f"{path}: the weights do not match the architecture (shape mismatch: {few(wrong)})")
    needed = sum(t.numel() * t.element_size() for t in own.values())
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    if needed > 2 * held + (64 << 20):
        raise ModelFileError(f"{path}: the architecture described needs {needed / 1e9:.1f} GB of weights but the "
                             f"file holds {held / 1e6:.1f} MB: refusing to build it")


def rebuild_knn(path: Path, header: dict, tensors: dict[str, torch.Tensor]) -> Any:
    """The k-NN classifier stored in a model file (its training set and options), or a ``ModelFileError``."""
    try:
        return KNN.from_state(tensors, header.get("knn") or {})
    except Exception as err:
        raise ModelFileError(f"{path}: cannot rebuild the k-NN classifier: {err}") from None


def load_model(filepath: str | Path, device: str = "auto") -> nn.Module:
    """``load_model(path)``: the model a ``model.save`` (or ``imclass.save``) wrote, ready to ``predict``,
    ``evaluate`` (with the loss it was trained with) or train further after ``compile``."""
    obj = load(filepath, device=device)
    if not isinstance(obj, Classifier):
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{filepath}: holds a {type(obj).__name__}, not a neural network model")
        return obj
    model = obj.model
    if not isinstance(model, KerasMethods) or getattr(model, "input_shape", None) is None:
        return model
    config = obj.train_config if isinstance(obj.train_config, dict) else {}
    model.attach_classifier(obj, losses.get(config["loss"]) if config.get("loss") in losses.names() else None)
    return model

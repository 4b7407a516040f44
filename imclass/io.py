"""Model files: one ``.safetensors`` file holding the weights and, in its metadata, how to rebuild the model.

    imclass.save(clf, "runs/x/model.safetensors")
    clf = imclass.load("runs/x")            # a run folder or the file itself

The metadata key ``imclass`` holds a JSON object::

    {"format": 1, "kind": "classifier" | "knn" | "model",
     "architecture": {"name": ..., "options": {...}}  or  {"sequential": <Sequential.get_config()>}
                     or  {"functional": <imclass.models.Model.get_config()>},
     "classes": [...], "preprocessing": {"mean": [...], "std": [...], "input_size": [C, H, W],
                                         "resize": int, "crop": int, "interpolation": str (pretrained backbones),
                                         "tta": "none" | "flip" | "flip_translate" | null},
     "final_activation": "softmax" | "sigmoid" | null, "train_config": {...} | null,
     "metrics": {"test_accuracy": 0.91, "epochs": 10, ...} | null}   (numbers measured at training time)

Loading never unpickles: the architecture is rebuilt from the JSON (through the model registry or
``Sequential.from_config``) and the tensors are read by safetensors. A file that is truncated,
not an imclass model, names an unknown architecture or holds weights of another shape raises a
``ModelFileError`` naming the file and the problem.
"""
from __future__ import annotations

import errno
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["FORMAT_VERSION", "ModelFileError", "load", "load_weights", "read_metadata", "save"]

FORMAT_VERSION = 1
METADATA_KEY = "imclass"
MODEL_FILENAME = "model.safetensors"
KINDS = ("classifier", "knn", "model")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class ModelFileError(ValueError):
    """A model file that cannot be read or rebuilt (the message names the file and the problem)."""


# --------------------------------------------------------------------------------------------
# save


def save(
    obj: Any,
    path: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    train_config: dict | None = None,
    input_size: tuple[int, int, int] | list[int] | None = None,
    tta: str | int | None = None,
    metrics: dict[str, float | int] | None = None,
) -> Path:
    """Write ``obj`` (a ``Classifier``, a ``KNN`` or a bare model) to one ``.safetensors`` file.

    ``path`` may be a folder: the file is then ``<folder>/model.safetensors``. Also recorded:
    ``classes`` (names; a Classifier knows its own, a KNN has integer labels 0..n-1 that these
    name), ``train_config`` (the resolved training config; default: a Classifier's ``compile``
    options) and ``input_size`` ``(C, H, W)`` (default: what the object knows: an ``input_size``
    attribute, a Sequential's ``input_shape``, a timm model's ``pretrained_cfg``, a KNN's sample
    shape) and ``tta``, the test-time augmentation the model was evaluated with (default: a
    Classifier's ``tta`` attribute), which ``imclass evaluate`` / ``predict`` / ``serve`` apply by
    default so that they report the number training printed. ``metrics``: numbers measured at
    training time (``{"test_accuracy": 0.91, "epochs": 10}``; names are strings, values finite
    ints or floats, else a ``ValueError`` naming the key), read back by ``load`` as the object's
    ``training_metrics`` and answered by ``GET /models/{name}`` of ``imclass serve``. The write is
    atomic (a temporary file renamed over the target). Returns the path.
    """
    checked_metrics = _check_metrics(metrics)  # before anything is written
    path = Path(path)
    if path.is_dir() or (not path.suffix and not path.exists()):
        path = path / MODEL_FILENAME
    if hasattr(obj, "get_state") and hasattr(type(obj), "from_state"):  # a KNN
        tensors, header = _knn_payload(obj, classes, input_size)
    elif isinstance(obj, nn.Module):
        tensors, header = _module_payload(
            obj, kind="model", classes=classes, mean=None, std=None, input_size=input_size
        )
    elif isinstance(getattr(obj, "model", None), nn.Module):
        tensors, header = _module_payload(
            obj.model,
            kind="classifier",
            classes=classes if classes is not None else getattr(obj, "classes", None),
            mean=getattr(obj, "mean", None),
            std=getattr(obj, "std", None),
            input_size=input_size if input_size is not None else _input_size_of(obj),
        )
    else:
        raise TypeError(f"expected a Classifier, a KNN or a torch.nn.Module to save, received {type(obj).__name__}")
    tta = tta if tta is not None else getattr(obj, "tta", None)
    if tta is not None:
        from imclass.tta import tta_name

        header["preprocessing"]["tta"] = tta_name(tta)
    _record_image_preprocessing(obj, header["preprocessing"])
    if train_config is None and hasattr(obj, "training_config"):
        train_config = obj.training_config() or None  # the Classifier's compile options
    header["train_config"] = _jsonable(train_config, "train_config")
    header["metrics"] = checked_metrics
    _write_atomic(path, tensors, header)
    return path


def _check_metrics(metrics: dict | None) -> dict[str, float | int] | None:
    """``metrics`` as a plain ``{str: int | float}`` dict; a ValueError names the first bad key."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise ValueError(f"expected metrics as a dict of name -> number, received {type(metrics).__name__}")
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"expected metric names as strings, received the key {key!r} ({type(key).__name__})")
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected metric {key!r} as a finite number, received {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"expected metric {key!r} as a finite number, received {value!r}")
        out[key] = value if isinstance(value, int) else float(value)
    return out


def _record_image_preprocessing(obj: Any, pre: dict) -> None:
    """Add ``resize``, ``crop`` and ``interpolation`` of a pretrained backbone's preprocessing (an
    ``imclass.models.weights.Preprocessing`` on the object or its model) to the file's ``preprocessing``."""
    found = getattr(obj, "preprocessing", None) or getattr(getattr(obj, "model", None), "preprocessing", None)
    if not hasattr(found, "to_dict"):
        return
    d = found.to_dict()
    pre.update({k: d[k] for k in ("resize", "crop", "interpolation")})
    for k in ("input_size", "mean", "std"):
        if pre.get(k) is None:
            pre[k] = d[k]


def _module_payload(model: nn.Module, *, kind: str, classes, mean, std, input_size) -> tuple[dict, dict]:
    header = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "architecture": _architecture_of(model),
        "classes": _as_str_list(classes),
        "preprocessing": {
            "mean": _as_float_list(mean),
            "std": _as_float_list(std),
            "input_size": _as_int_list(input_size if input_size is not None else _input_size_of(model)),
        },
        "final_activation": getattr(model, "final_activation", None),
    }
    return _state_tensors(model.state_dict()), header


def _knn_payload(knn: Any, classes: Any, input_size: Any) -> tuple[dict, dict]:
    tensors, config = knn.get_state()
    tensors = {name: torch.as_tensor(t) for name, t in tensors.items()}
    shape = config.get("sample_shape")
    if input_size is None and shape is not None and len(shape) == 3:
        input_size = shape
    header = {
        "format": FORMAT_VERSION,
        "kind": "knn",
        "knn": _jsonable(config, "k-NN config"),
        "classes": _as_str_list(classes),  # names of the labels 0..n-1, when known
        "preprocessing": {"mean": None, "std": None, "input_size": _as_int_list(input_size)},
    }
    return _state_tensors(tensors), header


def _architecture_of(model: nn.Module) -> dict:
    spec = getattr(model, "imclass_spec", None)
    if spec is not None:
        options = dict(spec.get("options", {}))
        heads = _num_classes_of(model)
        if heads is not None and heads != options.get("num_classes", heads):
            options["num_classes"] = heads  # reset_classifier(n) was called after create(): rebuild the new head
        return {"name": spec["name"], "options": _jsonable(options, "model options")}
    if hasattr(model, "get_config") and type(model).__name__ == "Sequential":
        return {"sequential": _jsonable(model.get_config(), "Sequential config")}
    if hasattr(model, "get_config") and type(model).__name__ == "Model":  # Keras functional API
        return {"functional": _jsonable(model.get_config(), "functional Model config")}
    raise TypeError(
        f"cannot save a {type(model).__name__}: expected a model built by imclass.models.create(...) "
        "(it records imclass_spec) or an imclass.Sequential (it has get_config())"
    )


def _num_classes_of(model: nn.Module) -> int | None:
    """Outputs of the model's classifier now (timm contract), or None when it does not say."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head.out_features if isinstance(head, nn.Linear) else None


def _state_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights) or are not contiguous.
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a bigger or shared buffer gets its own copy
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name beside the target (same file system, so the rename is atomic), created by save_file
    # itself so that it gets the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # safetensors reports a failed write as its own error ("I/O error: ... (os error 28)")
        tmp.unlink(missing_ok=True)
        if "os error" not in str(err) and "I/O" not in str(err):
            raise
        raise OSError(errno.EIO, f"writing failed ({str(err)[:80]}): disk full or a file size limit? "
                      "Nothing was replaced", str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# load


def load(path: str | os.PathLike, *, device: str = "auto") -> Any:
    """Rebuild what ``save`` wrote: a ``Classifier`` (model in eval mode), a ``KNN`` or a bare model.

    ``path`` is a ``.safetensors`` file or a run folder holding ``model.safetensors``. A Classifier
    and a KNN get ``training_metrics``: the ``metrics`` dict ``save`` recorded, or ``None``.
    """
    path = _resolve(path)
    if path.suffix in TORCH_SUFFIXES:
        raise ModelFileError(
            f"{path}: expected an imclass .safetensors model file; a torch file holds weights only: build the "
            "model and copy them in with imclass.io.load_weights(model, path)"
        )
    header = read_metadata(path)
    tensors = _read_tensors(path)
    kind = header["kind"]
    metrics = header.get("metrics") if isinstance(header.get("metrics"), dict) else None
    if kind == "knn":
        knn = _rebuild_knn(path, header, tensors)
        knn.training_metrics = metrics
        return knn
    _check_size_before_building(path, header["architecture"], tensors)
    model = _rebuild_model(path, header["architecture"])
    _load_state(model, tensors, path)
    model.eval()
    if kind == "model":
        return model
    from imclass.train import Classifier

    pre = header.get("preprocessing") or {}
    clf = Classifier(model, classes=header.get("classes"), mean=pre.get("mean"), std=pre.get("std"), device=device)
    clf.model.eval()
    clf.input_size = tuple(pre["input_size"]) if pre.get("input_size") else None
    clf.tta = pre.get("tta")
    clf.train_config = header.get("train_config")
    clf.training_metrics = metrics  # what training measured (None in files written without metrics)
    if pre.get("crop") and pre.get("mean") and pre.get("input_size"):  # resize / centre-crop of pretrained weights
        from imclass.models.weights import Preprocessing

        clf.preprocessing = model.preprocessing = Preprocessing.from_dict(pre)
    return clf


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``imclass`` JSON header of a model file (or run folder), checked, without reading the weights."""
    from safetensors import safe_open

    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise ModelFileError(f"{path}: not a readable .safetensors file (corrupted or truncated?): {err}") from None
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{path}: not an imclass model file (its safetensors metadata has no {METADATA_KEY!r} entry; "
            f"found keys {sorted(metadata)})"
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON: {err}") from None
    except RecursionError:
        raise ModelFileError(f"{path}: the {METADATA_KEY!r} metadata is nested too deeply to be a model description") from None
    if not isinstance(header, dict):
        raise ModelFileError(
            f"{path}: expected a JSON object in the {METADATA_KEY!r} metadata, received {header!r:.80}"
        )
    version = header.get("format")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: expected model file format {FORMAT_VERSION}, received format={version!r}")
    if header.get("kind") not in KINDS:
        raise ModelFileError(f"{path}: expected kind in {list(KINDS)}, received kind={header.get('kind')!r}")
    if header["kind"] != "knn" and not isinstance(header.get("architecture"), dict):
        raise ModelFileError(f"{path}: the model file does not say which architecture it holds (no 'architecture')")
    _check_header_types(header, path)
    return header


_HEADER_TYPES = {  # key -> (allowed types, what the message says)
    "classes": ((list, type(None)), "a list of class names"),
    "preprocessing": ((dict, type(None)), "a table (mean, std, input_size, ...)"),
    "metrics": ((dict, type(None)), "a table of name -> number"),
    "train_config": ((dict, type(None)), "a table"),
    "knn": ((dict, type(None)), "a table"),
}
_PREPROCESSING_TYPES = {
    "mean": "a list of numbers", "std": "a list of numbers", "input_size": "a list of 3 positive integers",
    "resize": "a positive integer", "crop": "a positive integer", "interpolation": "a filter name",
    "tta": "a test-time augmentation name",
}


def _check_header_types(header: dict, path: Path) -> None:
    """Every field a loader reads has the type it expects: a hand-made file fails here, in one line."""
    def bad(key: str, expected: str, value: Any) -> ModelFileError:
        return ModelFileError(f"{path}: expected {key} as {expected} in the model file, received {_short(value, 60)}")

    for key, (types, expected) in _HEADER_TYPES.items():
        if not isinstance(header.get(key), types):
            raise bad(key, expected, header.get(key))
    if header.get("classes") is not None and not all(isinstance(c, str) for c in header["classes"]):
        raise bad("classes", "a list of class names", header["classes"])
    pre = header.get("preprocessing") or {}

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                           for x in v)

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1_000_000

    checks = {"mean": lambda v: v is None or numbers(v), "std": lambda v: v is None or numbers(v),
              "input_size": lambda v: v is None or (isinstance(v, list) and len(v) == 3 and all(map(positive_int, v))),
              "resize": lambda v: v is None or positive_int(v) or (isinstance(v, list) and all(map(positive_int, v))),
              "crop": lambda v: v is None or positive_int(v) or (isinstance(v, list) and all(map(positive_int, v))),
              "interpolation": lambda v: v is None or isinstance(v, str), "tta": lambda v: v is None or isinstance(v, str)}
    for key, ok in checks.items():
        if not ok(pre.get(key)):
            raise bad(f"preprocessing.{key}", _PREPROCESSING_TYPES[key], pre.get(key))
    arch = header.get("architecture")
    if isinstance(arch, dict) and not isinstance(arch.get("options", {}), (dict, type(None))):
        raise bad("architecture.options", "a table", arch.get("options"))


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load weights from a local file into an existing ``model`` (for fine-tuning or transfer).

    Accepts an imclass/any ``.safetensors`` file, or a ``.pt``/``.pth`` state dict read with
    ``torch.load(weights_only=True)`` (never unpickling arbitrary objects). With ``strict=False``
    only the tensors whose names and shapes match are copied. Returns ``model``.
    """
    path = _resolve(path)
    if path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ModelFileError(f"{path}: not a readable weights-only torch file: {err}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a training checkpoint {"model": state_dict, "optimizer": ...}
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelFileError(f"{path}: expected a state dict (name -> tensor), received {type(state).__name__}")
    else:
        state = _read_tensors(path)
    if not strict:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not state:
            raise ModelFileError(f"{path}: no tensor in the file matches the model by name and shape")
        model.load_state_dict(state, strict=False)
        return model
    _load_state(model, state, path)
    return model


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILENAME).is_file():
            unfinished = (path / "checkpoint.pt").is_file()
            hint = " (training not finished? `imclass train --resume --out` it)" if unfinished else ""
            raise ModelFileError(f"{path}: expected a run folder holding {MODEL_FILENAME}, found none{hint}")
        return path / MODEL_FILENAME
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file or run folder")
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise ModelFileError(f"{path}: cannot read the weights (corrupted or truncated file?): {err}") from None


_WEIGHT_SOURCE_OPTIONS = {"pretrained", "pretrained_file", "checkpoint_path"}


def _rebuild_model(path: Path, arch: dict) -> nn.Module:
    try:
        if "sequential" in arch:
            from imclass.layers import Sequential

            return Sequential.from_config(arch["sequential"])
        if "functional" in arch:
            from imclass.models.functional import Model

            return Model.from_config(arch["functional"])
        if "name" in arch:
            from imclass import models

            # the weights come from this file: options that load weights from elsewhere are dropped
            options = {k: v for k, v in (arch.get("options") or {}).items() if k not in _WEIGHT_SOURCE_OPTIONS}
            return models.create(arch["name"], **options)
    except Exception as err:
        raise ModelFileError(f"{path}: cannot rebuild the architecture {_short(arch)}: {err}") from None
    raise ModelFileError(f"{path}: unknown architecture description {_short(arch)} (expected 'name' or 'sequential')")


def _check_size_before_building(path: Path, arch: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Build the architecture on the meta device (no memory) and compare it with the file's tensors, so that
    a description asking for more than the file holds (``num_classes: 100000000``) fails before allocating."""
    try:
        with torch.device("meta"):
            probe = _rebuild_model(path, arch)
    except ModelFileError:
        raise
    except Exception:  # an architecture that computes while it is built: the real build checks it
        return
    own = probe.state_dict()
    wrong = [f"{k}: model {tuple(own[k].shape)} vs file {tuple(tensors[k].shape)}"
             for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if wrong:
        raise ModelFileError(f"{path}: the weights do not match the architecture (shape mismatch: {_few(wrong)})")
    needed = sum(t.numel() * t.element_size() for t in own.values())
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    if needed > 2 * held + (64 << 20):
        raise ModelFileError(f"{path}: the architecture described needs {needed / 1e9:.1f} GB of weights but the "
                             f"file holds {held / 1e6:.1f} MB: refusing to build it")


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [
        f"{k}: model {tuple(own[k].shape)} vs file {tuple(tensors[k].shape)}"
        for k in own
        if k in tensors and own[k].shape != tensors[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the file: {_few(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_few(wrong)}")
    if problems:
        raise ModelFileError(f"{path}: the weights do not match the architecture ({'; '.join(problems)})")
    model.load_state_dict(tensors, strict=True)


def _rebuild_knn(path: Path, header: dict, tensors: dict[str, torch.Tensor]) -> Any:
    from imclass.knn import KNN

    try:
        return KNN.from_state(tensors, header.get("knn") or {})
    except Exception as err:
        raise ModelFileError(f"{path}: cannot rebuild the k-NN classifier: {err}") from None


# --------------------------------------------------------------------------------------------
# small helpers


def _input_size_of(obj: Any) -> list[int] | None:
    """(C, H, W) the object expects, when it says so (Classifier, Sequential, timm model)."""
    for attr in ("input_size", "image_shape"):
        value = getattr(obj, attr, None)
        if value is not None and len(value) == 3:
            return list(value)
    shape = getattr(obj, "input_shape", None)  # imclass.Sequential: (C, H, W); Keras style: (H, W, C)
    if shape is not None and len(shape) == 3:
        channels_last = shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)
        return [shape[2], shape[0], shape[1]] if channels_last else list(shape)
    cfg = getattr(obj, "pretrained_cfg", None) or getattr(obj, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return list(cfg["input_size"])
    model = getattr(obj, "model", None)
    if isinstance(model, nn.Module) and model is not obj:
        return _input_size_of(model)
    return None


def _as_float_list(x: Any) -> list[float] | None:
    if x is None:
        return None
    return [float(v) for v in torch.as_tensor(x, dtype=torch.float64).flatten().tolist()]


def _as_int_list(x: Any) -> list[int] | None:
    return None if x is None else [int(v) for v in x]


def _as_str_list(x: Any) -> list[str] | None:
    return None if x is None else [str(v) for v in x]


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except TypeError as err:
        raise TypeError(f"cannot save the {what}: it must be JSON-serialisable ({err})") from None


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _short(obj: Any, n: int = 120) -> str:
    text = json.dumps(obj)
    return text if len(text) <= n else text[: n - 3] + "..."

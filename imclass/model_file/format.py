"""The model-file format (ground floor): one ``.safetensors`` file holding the weights and, in its
metadata, how to rebuild the model. This module reads and writes the file (header, atomic write,
checked read); it knows no model class: ``imclass.model_file.save`` describes an object duck-typed,
``imclass.models.rebuild.load`` rebuilds it (``imclass.save`` / ``imclass.load``).

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
``Sequential.from_config``, in ``imclass.models.rebuild``) and the tensors are read by safetensors. A file that is truncated,
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

__all__ = ["FORMAT_VERSION", "KINDS", "METADATA_KEY", "MODEL_FILENAME", "ModelFileError", "TORCH_SUFFIXES", "jsonable",
           "load_state", "load_weights", "read_metadata", "read_tensors", "resolve_path", "state_tensors", "write_atomic"]

FORMAT_VERSION = 1
METADATA_KEY = "imclass"
MODEL_FILENAME = "model.safetensors"
KINDS = ("classifier", "knn", "model")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class ModelFileError(ValueError):
    """A model file that cannot be read or rebuilt (the message names the file and the problem)."""


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``imclass`` JSON header of a model file (or run folder), checked, without reading the weights."""
    from safetensors import safe_open  # deferred: start-up time of `import imclass`

    path = resolve_path(path)
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
        return ModelFileError(f"{path}: expected {key} as {expected} in the model file, received {short_json(value, 60)}")

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
    path = resolve_path(path)
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
        state = read_tensors(path)
    if not strict:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not state:
            raise ModelFileError(f"{path}: no tensor in the file matches the model by name and shape")
        model.load_state_dict(state, strict=False)
        return model
    load_state(model, state, path)
    return model


def resolve_path(path: str | os.PathLike) -> Path:
    """The model file a path names: the file itself, or ``model.safetensors`` inside a run folder."""
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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on the CPU (a ``ModelFileError`` names a bad file)."""
    from safetensors.torch import load_file  # deferred: start-up time

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise ModelFileError(f"{path}: cannot read the weights (corrupted or truncated file?): {err}") from None


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``tensors`` into ``model`` strictly; a ``ModelFileError`` lists missing, unexpected and misshapen tensors."""
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
        problems.append(f"missing from the file: {few(missing)}")
    if unexpected:
        problems.append(f"not in the model: {few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {few(wrong)}")
    if problems:
        raise ModelFileError(f"{path}: the weights do not match the architecture ({'; '.join(problems)})")
    model.load_state_dict(tensors, strict=True)


def state_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors stores them: on the CPU, contiguous, none sharing memory."""
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


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write ``tensors`` and the JSON ``header`` to ``path`` through a temporary file renamed over it."""
    from safetensors.torch import save_file  # deferred: start-up time

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


def jsonable(obj: Any, what: str) -> Any:
    """``obj`` as plain JSON data; a ``TypeError`` names ``what`` when it is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as err:
        raise TypeError(f"cannot save the {what}: it must be JSON-serialisable ({err})") from None


def few(items: list[str], n: int = 5) -> str:
    """The first ``n`` items joined, with how many more."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def short_json(obj: Any, n: int = 120) -> str:
    """``obj`` as JSON, cut to ``n`` characters."""
    text = json.dumps(obj)
    return text if len(text) <= n else text[: n - 3] + "..."

"""Decode, preprocess and predict images with any saved imclass model: the part that ``imclass predict``,
``imclass serve`` and ``imclass export`` share.

    p = Predictor.load("runs/x")                 # a run folder, a .safetensors model file or an exported .onnx
    x = p.decode(open("cat.png", "rb").read())   # uint8 (C, H, W), resized/cropped as the model file says
    probs = p.predict_proba(x.unsqueeze(0))      # float32 (N, len(p.classes)), columns named by p.classes
    p.top_k(probs, 5)                            # [[{"class": "cat", "index": 3, "probability": 0.91}, ...]]

A Classifier applies the test-time augmentation its model file records (``tta=`` overrides it); a k-NN
returns its vote shares; a bare ``nn.Module`` gets inputs scaled to [0, 1]; an ``.onnx`` file written by
``imclass export`` runs on onnxruntime with the class names and preprocessing stored in its metadata.
"""
from __future__ import annotations

import csv
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imclass.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, decode_image
from imclass.data.walk import walk_images
from imclass.model_file.format import read_metadata
from imclass.model_file.save import num_classes_of
from imclass.models.rebuild import load
from imclass.train import Classifier
from imclass.tta import choose_tta

# Deferred imports (inside functions), for start-up time: onnx, onnxruntime
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "Predictor", "decode_image", "find_images", "IMAGE_EXTENSIONS"]

ONNX_METADATA_KEY = "imclass"


# --------------------------------------------------------------------------------------------
# decoding and finding files: the one gate and the one walk of imclass.data


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files given, plus the image files under each folder given (``imclass.data.walk``: recursively,
    each real folder once, regular files only, sorted); order kept. Entries a walk skips are named in
    one warning. A path that does not exist is kept, so that the caller reports it as a per-file error.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            walk = walk_images(p)
            message = walk.message(p)
            if message:
                warnings.warn(message, stacklevel=2)
            found += walk.files
        else:
            found.append(p)
    return found


# --------------------------------------------------------------------------------------------
# prediction


@dataclass
class Predictor:
    """A loaded model ready to classify uint8 images: any imclass model file, or an exported ONNX file.

    ``classes`` names the probability columns; ``input_size`` is (C, H, W) or None (any size);
    ``tta`` the test-time augmentation applied; ``metrics`` what training measured (when recorded).
    """

    name: str
    kind: str  # "classifier" | "knn" | "model" | "onnx"
    classes: list[str]
    input_size: tuple[int, int, int] | None
    preprocessing: dict = field(default_factory=dict)
    tta: str = "none"
    metrics: dict = field(default_factory=dict)
    source: str = ""
    backend: Any = None  # the Classifier / KNN, or the onnxruntime session
    architecture: Any = None
    non_finite_weights: int = 0  # NaN or infinite values among the model's weights (a diverged run)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None, tta: bool | str | None = None,
             device: str = "cpu") -> "Predictor":
        """A run folder, ``.safetensors`` model file or ``.onnx`` file (written by ``imclass export``).

        ``tta``: None = what the model file records, False/"none" = the plain image, True = the
        recorded TTA or flip_translate, or a name of ``imclass.tta``. Errors name the file.
        """
        path = Path(path)
        if name is None:
            name = path.resolve().name if path.is_dir() else (
                path.resolve().parent.name if path.name == "model.safetensors" else path.stem)
        if path.suffix == ".onnx":
            if tta not in (None, False, "none"):
                raise ValueError(f"{path}: an exported ONNX model runs the TTA it was exported with; --tta does not apply")
            return cls._load_onnx(path, name)
        header = read_metadata(path)
        pre = dict(header.get("preprocessing") or {})
        backend = load(path, device=device)
        kind = header["kind"]
        if kind == "model":  # a bare module: inputs on [0, 1], no normalisation recorded
            channels = (pre.get("input_size") or [3])[0]
            backend = Classifier(backend, classes=header.get("classes"), mean=[0.0] * channels,
                                 std=[1.0] * channels, device=device)
        classes = _column_names(backend, header.get("classes"))
        used = _resolve_tta(kind, pre.get("tta"), tta, path)
        size = pre.get("input_size")
        return cls(name=name, kind=kind, classes=classes, input_size=tuple(size) if size else None,
                   preprocessing=pre, tta=used, metrics=_training_metrics(path, header), source=str(path),
                   backend=backend, architecture=header.get("architecture"),
                   non_finite_weights=_non_finite(getattr(backend, "model", None)))

    @classmethod
    def from_object(cls, obj: Any, *, name: str, classes: Sequence[str] | None = None,
                    input_size: Sequence[int] | None = None, preprocessing: dict | None = None,
                    tta: str = "none", metrics: dict | None = None) -> "Predictor":
        """Wrap an in-memory ``Classifier`` or fitted ``KNN`` (e.g. a pretrained backbone with ImageNet names);
        ``metrics`` defaults to the object's ``training_metrics`` (what ``imclass.load`` read from its file)."""
        kind = "knn" if hasattr(obj, "classes_") else "classifier"
        pre = dict(preprocessing or {})
        size = input_size or pre.get("input_size") or getattr(obj, "input_size", None)
        if size is not None:
            pre["input_size"] = [int(v) for v in size]
        names = classes if classes is not None else getattr(obj, "classes", None)
        return cls(name=name, kind=kind, classes=_column_names(obj, list(names) if names else None),
                   input_size=tuple(pre["input_size"]) if size is not None else None, preprocessing=pre,
                   tta=tta, metrics=dict(metrics or getattr(obj, "training_metrics", None) or {}),
                   source=name, backend=obj)

    @classmethod
    def _load_onnx(cls, path: Path, name: str) -> "Predictor":
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(f"running an ONNX model needs onnx and onnxruntime: pip install onnxruntime ({err})") from None
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        try:
            meta_model = onnx.load(str(path), load_external_data=False)
        except Exception as err:
            raise ValueError(f"{path}: not a readable ONNX file: {err}") from None
        props = {p.key: p.value for p in meta_model.metadata_props}
        if ONNX_METADATA_KEY not in props:
            raise ValueError(f"{path}: an ONNX file without imclass metadata (export it with `imclass export`)")
        meta = json.loads(props[ONNX_METADATA_KEY])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        size = (meta.get("preprocessing") or {}).get("input_size")
        return cls(name=name, kind="onnx", classes=list(meta["classes"]), input_size=tuple(size) if size else None,
                   preprocessing=meta.get("preprocessing") or {}, tta=meta.get("tta") or "none",
                   metrics=meta.get("metrics") or {}, source=str(path), backend=session,
                   architecture={"onnx_of": meta.get("kind"), "output": meta.get("output", "logits")})

    # ---------------------------------------------------------------- use
    @property
    def channels(self) -> int:
        """Colour channels the model takes (1 or 3)."""
        return int(self.input_size[0]) if self.input_size else 3

    def decode(self, source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> torch.Tensor:
        """An image (bytes or file) as the uint8 (C, H, W) tensor this model takes (see ``decode_image``)."""
        size = tuple(self.input_size[1:]) if self.input_size else None
        return decode_image(source, size=size, channels=self.channels, resize=self.preprocessing.get("resize"),
                            crop=self.preprocessing.get("crop"),
                            interpolation=self.preprocessing.get("interpolation") or "bilinear",
                            max_pixels=max_pixels, name=name)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities float32 (N, len(classes)) for uint8 images (N, C, H, W). Thread-safe (one at a time)."""
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (N, C, H, W), received {images.dtype} {tuple(images.shape)}")
        with self._lock, torch.inference_mode():
            if self.kind == "onnx":
                session = self.backend
                (out,) = session.run(None, {session.get_inputs()[0].name: images.contiguous().numpy()})
                out = torch.from_numpy(np.asarray(out, dtype=np.float32))
                return out if self.architecture.get("output") == "probabilities" else out.softmax(1)
            if self.kind == "knn":
                return torch.as_tensor(self.backend.predict_proba(images)).float().cpu()
            return self.backend.predict_proba(images, tta=None if self.tta == "none" else self.tta).float().cpu()

    def predict_many(self, images: Sequence[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
        """Probabilities for a list of (C, H, W) images, in batches of ``batch_size``; images of another
        shape than their neighbours (a model without a fixed input size) go in batches of their own."""
        out: list[torch.Tensor | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            chunk = list(range(start, min(start + batch_size, len(images))))
            by_shape: dict[tuple, list[int]] = {}
            for i in chunk:
                by_shape.setdefault(tuple(images[i].shape), []).append(i)
            for idx in by_shape.values():
                probs = self.predict_proba(torch.stack([images[i] for i in idx]))
                for j, i in enumerate(idx):
                    out[i] = probs[j]
        if not out:
            return torch.empty(0, len(self.classes))
        return torch.stack(out)  # type: ignore[arg-type]

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """The ``k`` most probable classes of each row: ``[{"class", "index", "probability"}, ...]``."""
        if k < 1:
            raise ValueError(f"expected top_k >= 1, received top_k={k}")
        k = min(k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [[{"class": self.classes[c], "index": int(c), "probability": float(p)} for p, c in zip(v, i)]
                for v, i in zip(values.tolist(), indices.tolist())]

    def info(self) -> dict:
        """What ``GET /models/{name}`` answers: kind, classes, input size, preprocessing, TTA, training metrics."""
        return {"name": self.name, "kind": self.kind, "classes": self.classes, "num_classes": len(self.classes),
                "input_size": list(self.input_size) if self.input_size else None,
                "preprocessing": self.preprocessing, "tta": self.tta, "metrics": self.metrics,
                "architecture": self.architecture, "source": Path(self.source).name}


def _non_finite(model: Any) -> int:
    """How many NaN or infinite values the module's parameters and buffers hold (0 for anything else)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    return sum(int((~torch.isfinite(t)).sum()) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


def _column_names(backend: Any, classes: list[str] | None) -> list[str]:
    """Names of the probability columns: a Classifier's classes, or a k-NN's label values named by ``classes``."""
    labels = getattr(backend, "classes_", None)
    if labels is not None:  # a KNN: columns follow its sorted label values
        values = [int(v) for v in labels]
        return [classes[v] if classes and 0 <= v < len(classes) else str(v) for v in values]
    n = _num_outputs(backend)
    if classes:
        if n is not None and n != len(classes):
            raise ValueError(f"the model has {n} outputs but its file names {len(classes)} classes")
        return list(classes)
    return [str(i) for i in range(n or 0)]


def _num_outputs(clf: Any) -> int | None:
    model = getattr(clf, "model", None)
    return num_classes_of(model) if model is not None else None


def _resolve_tta(kind: str, recorded: str | None, flag: bool | str | None, path: Path) -> str:
    try:
        return choose_tta(recorded, flag, knn=kind == "knn")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _training_metrics(path: Path, header: dict) -> dict:
    """Figures measured at training time: the model file's ``metrics`` (``imclass.save(..., metrics=)``),
    else, for files written without them, the last row of the run folder's history.csv (numbers only)."""
    if isinstance(header.get("metrics"), dict):
        return dict(header["metrics"])
    folder = path if path.is_dir() else path.parent
    history = folder / "history.csv"
    if not history.is_file():
        return {}
    try:
        rows = list(csv.DictReader(history.open()))
    except Exception:
        return {}
    if not rows:
        return {}
    out = {}
    for key, value in rows[-1].items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out

"""Export a saved imclass model to ONNX or TorchScript, preprocessing included, for deployment.

    export("runs/x", "model.onnx")                    # ONNX (torch.onnx dynamo exporter), runs on onnxruntime
    export("runs/x", "model.pt", format="torchscript")

The exported graph takes what a decoder gives: **uint8 images (N, C, H, W)** (any N) and does the rest:
scaling, the model file's mean/std normalisation and its test-time augmentation (averaged views), so
that it returns the same **logits** as ``Classifier.predict_logits(x, tta=...)``. A k-NN exports as its
distance search + vote and returns **probabilities** (vote shares, columns in ``classes``). The ONNX
file's ``metadata_props["imclass"]`` holds the class names, the preprocessing (input size, resize/crop)
and the training metrics, so ``imclass predict`` and ``imclass serve`` run it like the model file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imclass.serve.predictor import ONNX_METADATA_KEY, Predictor
from imclass.tta import tta_views

# Deferred imports (inside functions), for start-up time: onnx
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["EXPORT_FORMATS", "Deployable", "KNNGraph", "export", "deployable"]

EXPORT_FORMATS = ("onnx", "torchscript")


class Deployable(nn.Module):
    """uint8 images (N, C, H, W) -> logits: scale, normalise, run ``model`` on the TTA views and average."""

    def __init__(self, model: nn.Module, mean, std, tta: str = "none") -> None:
        super().__init__()
        self.model = model
        self.tta = tta
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)  # x / (255 std) - mean / std
        if self.tta == "none":
            return self.model(x)
        out = None
        for weight, view in tta_views(x, self.tta):
            y = self.model(view.contiguous()) * weight
            out = y if out is None else out + y
        return out


class KNNGraph(nn.Module):
    """uint8 images (N, C, H, W) -> k-NN vote shares (N, n_classes), as ``KNN.predict_proba``.

    Distances in float64 (exact for uint8 pixels, like the estimator); neighbours by a top-k whose ties
    go to the lower training index (the ONNX TopK rule and scikit-learn's).
    """

    def __init__(self, knn: Any) -> None:
        super().__init__()
        if knn.metric_ not in ("l1", "l2"):
            raise ValueError(f"k-NN export supports metric l1 or l2, received metric={knn.metric_!r}")
        self.metric = knn.metric_
        self.k = int(knn.k)
        self.weights = knn.weights
        self.n_classes = len(knn.classes_)
        train = knn._fit_X.double()
        self.register_buffer("train_rows", train)  # (M, D)
        self.register_buffer("train_sq", (train * train).sum(1))  # (M,)
        self.register_buffer("labels", knn._fit_y.long())  # (M,) column index of each training row

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        q = images.reshape(images.shape[0], -1).double()  # (N, C, H, W) -> (N, D)
        if self.metric == "l2":
            d = (q * q).sum(1, keepdim=True) - 2.0 * q @ self.train_rows.T + self.train_sq  # squared, (N, M)
        else:
            d = (q.unsqueeze(1) - self.train_rows.unsqueeze(0)).abs().sum(-1)  # (N, M, D) -> (N, M)
        dist, idx = torch.topk(d, self.k, dim=1, largest=False, sorted=True)
        if self.weights == "uniform":
            w = torch.ones_like(dist)
        else:
            dist = dist.clamp(min=0).sqrt() if self.metric == "l2" else dist
            zero = dist == 0
            w = torch.where(zero.any(1, keepdim=True), zero.double(), 1.0 / dist.clamp(min=1e-300))
        onehot = nn.functional.one_hot(self.labels[idx], self.n_classes).double()  # (N, k, n_classes)
        votes = (onehot * w.unsqueeze(-1)).sum(1)
        return (votes / votes.sum(1, keepdim=True)).float()


def deployable(predictor: Predictor) -> tuple[nn.Module, str]:
    """The module to export for a loaded model, and what it outputs ("logits" or "probabilities")."""
    if predictor.kind == "knn":
        return KNNGraph(predictor.backend).eval(), "probabilities"
    if predictor.kind not in ("classifier", "model"):
        raise ValueError(f"cannot export a {predictor.kind} model again: export the .safetensors model file")
    clf = predictor.backend
    return Deployable(clf.model.float().cpu().eval(), clf.mean, clf.std, predictor.tta).eval(), "logits"


def export(source: str | os.PathLike | Predictor, out: str | os.PathLike, *, format: str = "onnx",
           tta: bool | str | None = None, opset: int | None = None) -> Path:
    """Write ``source`` (a run folder, model file or loaded ``Predictor``) as ONNX or TorchScript to ``out``.

    The graph takes uint8 (N, C, H, W) with any N (H and W fixed to the recorded input size when known).
    Returns the path written.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"expected format in {list(EXPORT_FORMATS)}, received format={format!r}")
    predictor = source if isinstance(source, Predictor) else Predictor.load(source, tta=tta)
    if predictor.input_size is None:
        raise ValueError(f"{predictor.source}: the model file records no input size (C, H, W); "
                         "export needs one to build the graph")
    module, output = deployable(predictor)
    example = torch.zeros((2, *predictor.input_size), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": 1, "kind": predictor.kind, "classes": predictor.classes, "output": output,
            "input": "uint8 (N, C, H, W)", "preprocessing": predictor.preprocessing, "tta": predictor.tta,
            "metrics": predictor.metrics, "architecture": predictor.architecture}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notes
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape-dependent Python branches:
            # the model is traced at its one input size (the CLI then reports max_abs_diff against eager)
            if format == "torchscript":
                traced = torch.jit.trace(module, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"imclass.json": json.dumps(meta)})
            else:
                _export_onnx(module, example, tmp, output, meta, opset)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for extra in tmp.parent.glob(tmp.name + "*.data"):
            extra.unlink(missing_ok=True)
    return out


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output: str, meta: dict,
                 opset: int | None) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    kwargs = {"opset_version": opset} if opset else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations
        program = torch.onnx.export(module, (example,), input_names=["images"], output_names=[output],
                                    dynamic_shapes=({0: batch},), dynamo=True, optimize=True, verbose=False,
                                    external_data=False, **kwargs)
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))

"""Deep features as a product: embeddings of a folder, image retrieval, and k-NN on features vs pixels.

    emb = load_embedder("mobilenetv2_100")              # or a run folder / model file
    images = image_set("photos")                         # paths, labels, classes, splits
    feats = extract_features(emb.model, images.paths, emb.preprocessing)
    knn = KNN(k=5, metric="cosine").fit(feats, labels)   # retrieval = the k-NN engine's neighbours
    report = knn_report(feats, pixels, labels, train_idx, test_idx)

The report is the course's point made measurable: k-NN on raw pixels hardly beats chance on
photos, the same k-NN on a pretrained network's features is a good classifier.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from imclass.data.inspect import FileRecord, folder_files, probe
from imclass.data.split import split_indices
from imclass.data.walk import walk_images
from imclass.knn import KNN
from imclass.models.weights import Preprocessing
from imclass.transfer.features import read_for
from imclass.model_file.format import read_metadata
from imclass.models.rebuild import load
from imclass.models.weights import create_backbone

__all__ = ["Embedder", "ImageSet", "image_set", "knn_report", "load_embedder", "pixels_of", "retrieval_split"]


@dataclass
class Embedder:
    """A network whose pooled pre-logit features are the embedding, with the preprocessing it needs."""

    model: nn.Module
    preprocessing: Preprocessing
    name: str  # backbone name, or the run folder / model file it came from
    weights: str | None = None  # where the weights came from (a file, "imagenet"), None: random


def load_embedder(spec: str | os.PathLike, *, weights: str | None = "imagenet", weights_dir: str | None = None,
                  image_size: int | None = None) -> Embedder:
    """A trained run folder or model file (``imclass train --out``), else a backbone by name
    (``mobilenetv2_100``, ``timm:resnet18``, ``torchvision:squeezenet1_1``) with ``weights``
    (``"imagenet"``: from the weights root; a file; ``None``: random). ``image_size`` overrides the crop."""
    path = Path(spec).expanduser()
    if path.exists():
        header = read_metadata(path)
        clf = load(path)
        model = getattr(clf, "model", None)
        if model is None:
            raise ValueError(f"{path}: a {type(clf).__name__} model file has no network features; "
                             "pass a neural-network run or a backbone name")
        pre_dict = dict(header.get("preprocessing") or {})
        if not pre_dict.get("mean") or not pre_dict.get("input_size"):
            raise ValueError(f"{path}: the model file records no input preprocessing (mean, std, input size)")
        pre = Preprocessing.from_dict(pre_dict)
        name, source = str(path), str(path)
    else:
        model, report = create_backbone(str(spec), num_classes=0, weights=weights, weights_dir=weights_dir)
        pre, name, source = report.preprocessing, str(spec), report.source
    if image_size is not None:
        pre = pre.with_size(int(image_size))
    return Embedder(model.eval(), pre, name, source)


@dataclass
class ImageSet:
    """Image files of a folder with their class index (-1: unlabelled), class names and split."""

    root: Path
    paths: list[Path]
    labels: torch.Tensor
    classes: list[str]
    splits: list[str]
    layout: str  # "split", "plain" or "flat" (images without class folders)
    skipped: list[str] = field(default_factory=list)  # files Pillow cannot identify

    def relative(self, i: int) -> str:
        """The path of image ``i`` relative to the folder."""
        try:
            return str(self.paths[i].relative_to(self.root))
        except ValueError:
            return str(self.paths[i])


def image_set(folder: str | os.PathLike) -> ImageSet:
    """The images of ``folder``: a class-per-folder tree, a ``train/`` + ``val/`` tree, or a flat folder
    of images (unlabelled). Files whose header Pillow cannot read are skipped with one warning."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    try:
        layout, _, classes, records = folder_files(root)
    except ValueError as err:
        if "no class folders" not in str(err):
            raise
        walk = walk_images(root)
        if walk.message(root):
            warnings.warn(walk.message(root), stacklevel=2)
        files = walk.files
        if not files:
            raise ValueError(f"no image files in {root}") from None
        layout, classes = "flat", []
        records = [FileRecord(path=p, split="all", label=-1) for p in files]
    records = [probe(r) for r in records]
    bad = [r for r in records if "error" in r]
    skipped = [f"{r['path']} ({r['error']})" for r in bad]
    if skipped:
        warnings.warn(f"skipped {len(bad)} unreadable file(s) in {root}: {'; '.join(skipped[:5])}"
                      + (" ..." if len(bad) > 5 else ""), stacklevel=2)
    ok = [r for r in records if "error" not in r]
    if not ok:
        raise ValueError(f"none of the {len(records)} image files in {root} could be read")
    return ImageSet(root, [Path(r["path"]) for r in ok], torch.tensor([r["label"] for r in ok], dtype=torch.long),
                    list(classes), [r["split"] for r in ok], layout, skipped)


def retrieval_split(images: ImageSet, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices: the folder's own split (``val/`` or ``test/`` held out) when it has one,
    else a seeded stratified split holding out ``test_fraction`` of each class."""
    if images.layout == "split":
        held = torch.tensor([s != "train" for s in images.splits])
        return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()
    if images.layout == "flat":
        raise ValueError(f"{images.root} has no class folders: k-NN accuracy needs labelled images")
    return split_indices(images.labels, test_fraction, seed=seed)


def pixels_of(paths: Sequence[Path], size: int = 32) -> torch.Tensor:
    """Raw pixels (N, 3, size, size) uint8: the shorter side resized to ``size``, centre-cropped."""
    return read_for(paths, Preprocessing(input_size=(3, size, size), resize=size, crop=size))


def knn_report(features: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor,
               test_idx: torch.Tensor, ks: Sequence[int] = (1, 5), **info: Any) -> dict[str, Any]:
    """k-NN accuracy on deep features (cosine) beside k-NN on raw pixels (L2 and cosine), same split.

    Returns ``{"rows": [{"representation", "metric", "dims", "k", "accuracy"}], "train", "test",
    "chance", **info}``; "chance" is the share of the largest class in the test split."""
    ks = sorted(set(int(k) for k in ks))
    y_train, y_test = labels[train_idx], labels[test_idx]
    rows = []
    for representation, data, metric in (("raw pixels", pixels, "l2"), ("raw pixels", pixels, "cosine"),
                                         ("deep features", features, "cosine")):
        flat = data.reshape(len(data), -1)
        if representation == "raw pixels" and metric == "cosine":
            flat = flat.float()
        knn = KNN(k=max(ks), metric=metric).fit(flat[train_idx], y_train)
        for k, acc in zip(ks, knn.score_each_k(flat[test_idx], y_test, ks)):
            rows.append({"representation": representation, "metric": metric, "dims": int(flat.shape[1]),
                         "k": k, "accuracy": float(acc)})
    chance = float(torch.bincount(y_test).max()) / max(len(y_test), 1)
    return {"rows": rows, "train": len(train_idx), "test": len(test_idx), "chance": chance, **info}

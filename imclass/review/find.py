"""``review(ReviewConfig(data=...))``: the images of a folder or data set whose label is suspicious.

Three kinds of findings, each labelled:

* ``"label"``: confident learning (:mod:`imclass.confident`) on out-of-sample probabilities:
  a run's predictions on images it never trained on (``run=``), else k-fold cross-validation
  (:mod:`imclass.review.oof`): a logistic regression on cached frozen-backbone features for photo
  folders, the fast recipe per fold for CIFAR-10 / MNIST / Fashion-MNIST;
* ``"outlier"``: images far from every other image in feature space (mean cosine distance to their
  ``k`` nearest neighbours, robust z-score above ``outlier_z``): photos that belong to no class.
  Folders: the frozen backbone's features, neighbours among the reviewed images. Named sets: each
  fold's network, its penultimate features (``Classifier.predict_features``): a held-out image's
  neighbours are that fold's training images, and the z-score is taken within the fold (each fold's
  network has a feature space of its own);
* ``"duplicate"``: exact (same bytes) and near (perceptual hash) duplicates that carry different
  labels, from ``imclass data check``'s detection.

The result is ranked most suspicious first; ``score`` is in [0, 1] (label: 1 - the label quality;
outlier: the share of images nearer to their neighbours; duplicate: 1 for identical bytes, less per
differing hash bit).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imclass.confident import FILTERS, RANKINGS, find_label_issues, label_quality
from imclass.data import load
from imclass.data.check import CheckOptions, check_folder, hamming_pairs, image_hashes
from imclass.data.dataset import ImageDataset
from imclass.data.download import cache_dir
from imclass.data.folder import SPLIT_SEED, TEST_FRACTION, read_image
from imclass.data.inspect import folder_files
from imclass.data.split import limit_indices, split_indices
from imclass.knn import KNN
from imclass.model_file.format import read_metadata
from imclass.models.rebuild import load as load_model_file
from imclass.models.transfer_net import PoolStagesUnsupported
from imclass.models.weights import Preprocessing
from imclass.review.oof import cross_val_features, cross_val_images
from imclass.transfer.features import FeatureCache, extract_features, read_for
from imclass.transfer.finetune import resize_for, transfer
from imclass.transfer.retrieval import image_set
from imclass.transfer.workflow import DEFAULT_POOL_STAGES, no_weights_advice, pick_backbone

__all__ = ["ReviewConfig", "ReviewItems", "ReviewResult", "folder_features", "folder_items", "heldout_of_run",
           "outlier_scores", "outliers", "review", "sha256_of"]

KINDS = ("label", "outlier", "duplicate")


@dataclass
class ReviewConfig:
    """Everything a review needs (recorded in ``review.json``)."""

    data: str  # a folder of images, or cifar10 / mnist / fashion-mnist
    split: str | None = None  # named data sets: train (default) or test; folders: all (default), train, val, test
    run: str | None = None  # score with this run's model on images it did not train on
    folds: int = 5
    seed: int = 0
    limit: int | None = None  # a seeded stratified sample of N images (imclass.data.split.limit_indices)
    data_root: str | None = None
    backbone: str | None = None  # folders: the feature backbone (default: one whose weights are present)
    weights_dir: str | None = None
    cache_dir: str | None = None  # feature cache folder (default $IMCLASS_CACHE/features); "none": no disk cache
    filter_by: str = "prune_by_noise_rate"
    rank_by: str = "self_confidence"
    C: float = 0.05  # inverse L2 strength of the logistic regression (cross-validation on features)
    outlier_k: int = 10
    outlier_z: float = 5.0
    near_distance: int = 4  # near duplicates: pHash bits apart at most
    fast: dict = field(default_factory=dict)  # fast-recipe overrides for cross-validating images (epochs, widths, ...)
    device: str = "auto"
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"expected --folds >= 2, received {self.folds}")
        if self.filter_by not in FILTERS:
            raise ValueError(f"expected filter_by in {FILTERS}, received {self.filter_by!r}")
        if self.rank_by not in RANKINGS:
            raise ValueError(f"expected rank_by in {RANKINGS}, received {self.rank_by!r}")
        if self.limit is not None and self.limit < self.folds:
            raise ValueError(f"expected --limit >= --folds ({self.folds}), received {self.limit}")


@dataclass
class ReviewResult:
    """The ranked ``issues`` (JSON-ready dicts), what was reviewed and how."""

    issues: list[dict[str, Any]]
    classes: list[str]
    images: int
    source: str  # the folder (absolute) or the data set's name
    split: str
    method: str  # how the probabilities were obtained
    estimated_label_errors: int
    seconds: float
    pixels: torch.Tensor | None = None  # named data sets: the reviewed images, for thumbnails
    paths: list[Path] | None = None  # folders: the reviewed files
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``imclass review --json``."""
        return {"issues": self.issues, "counts": {k: sum(i["kind"] == k for i in self.issues) for k in KINDS},
                "images": self.images, "classes": self.classes, "source": self.source, "split": self.split,
                "method": self.method, "estimated_label_errors": self.estimated_label_errors, "notes": self.notes,
                "seconds": self.seconds}


def _say(cfg: ReviewConfig, message: str) -> None:
    if cfg.verbose:
        print(message, file=sys.stderr, flush=True)


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ what is reviewed

@dataclass
class ReviewItems:
    """The images under review: labels and classes, and either their files (folders) or their pixels."""

    labels: torch.Tensor
    classes: list[str]
    split: str
    paths: list[Path] | None = None  # folders
    splits: list[str] | None = None
    relative: list[str] | None = None
    root: Path | None = None
    pixels: torch.Tensor | None = None  # named data sets
    positions: torch.Tensor | None = None  # position of each image in its whole split (a --limit sample)
    notes: list[str] = field(default_factory=list)


def folder_items(root: Path, split: str) -> ReviewItems:
    """The images of a photo folder to review (``split``: all, train, val or test), with their labels and paths."""
    images = image_set(root)
    if images.layout == "flat":
        raise ValueError(f"{root} has no class folders: a label review needs labelled images (one sub-folder per class)")
    keep = list(range(len(images.paths)))
    if split != "all":
        if images.layout != "split":
            raise ValueError(f"{root} has no train/ val/ test/ folders: review it whole (--split all) or with --run")
        keep = [i for i, s in enumerate(images.splits) if s == split]
        if not keep:
            raise ValueError(f"{root} has no {split}/ images")
    return ReviewItems(images.labels[keep], list(images.classes), split, [images.paths[i] for i in keep],
                  [images.splits[i] for i in keep], [images.relative(i) for i in keep], root)


def _named_items(cfg: ReviewConfig, split: str) -> ReviewItems:
    ds = load(cfg.data, split=split, root=cfg.data_root)
    notes = list(ds.notes)
    positions = None
    if cfg.limit is not None and cfg.limit < len(ds):
        positions = limit_indices(ds.labels, cfg.limit, seed=cfg.seed, classes=ds.classes, where=f"{cfg.data} {split}")
        ds = ds.subset(positions)
        notes.append(f"{cfg.limit:,} images of the {split} split (--limit: seeded, stratified, seed {cfg.seed}); "
                     "index = position in the whole split")
    return ReviewItems(ds.labels, list(ds.classes), split, pixels=ds.images, notes=notes, positions=positions)


# ------------------------------------------------------------------------------ with a run

def _run_config(run: Path) -> dict[str, Any]:
    folder = run if run.is_dir() else run.parent
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: cannot tell which images the run trained on, so it cannot "
                         "score them out of sample; review without --run (cross-validation)")
    return json.loads(path.read_text())


def heldout_of_run(run_config: dict[str, Any], data: str, split: str | None) -> tuple[str, str | None]:
    """``(split to review, why)`` for a run trained as ``run_config`` (its config.json) reviewing ``data``
    at ``split``; raises a ValueError when that split overlaps the run's training images.

    A run trained on a named data set trained on (a ``--limit`` sample of) its ``train`` split;
    a run trained on a folder trained on its ``train/`` folder, or on all but a seeded held-out
    share of a plain folder (``val_fraction`` and ``seed`` of its config; ``imclass.data.load``'s 20 %,
    seed 0 for runs trained from scratch).
    """
    trained_on = str(run_config.get("dataset", ""))
    same_folder = (Path(trained_on).expanduser().is_dir() and Path(data).expanduser().is_dir()
                   and Path(trained_on).expanduser().resolve() == Path(data).expanduser().resolve())
    if not (same_folder or trained_on == data):
        return (split or ("all" if Path(data).expanduser().is_dir() else "test")), None
    wanted = split or "test"
    if wanted in ("train", "all"):
        raise ValueError(f"the run trained on the {'whole ' if wanted == 'all' else ''}{wanted} split of {data}: its "
                         f"predictions there are not out of sample. Review --split test (the images it did not train "
                         f"on), or review without --run (k-fold cross-validation scores every image)")
    if run_config.get("limit") and same_folder:
        raise ValueError(f"the run trained on a --limit sample of {data}: which images it held out is not recorded "
                         "exactly; review without --run (cross-validation)")
    return wanted, f"the images the run held out of {data} ({wanted})"


def _run_items_and_probs(cfg: ReviewConfig) -> tuple[ReviewItems, np.ndarray, str]:
    run = Path(cfg.run).expanduser()
    if not run.exists():
        raise FileNotFoundError(f"no such run folder or model file: {run}")
    run_cfg = _run_config(run)
    split, why = heldout_of_run(run_cfg, cfg.data, cfg.split)
    header = read_metadata(run)
    clf = load_model_file(run)
    if not hasattr(clf, "predict_proba") or not hasattr(clf, "model"):
        raise ValueError(f"{run}: a {type(clf).__name__} gives no probabilities to review with; use a network run")
    folder = Path(cfg.data).expanduser()
    pre = header.get("preprocessing") or {}
    if folder.is_dir():
        items = folder_items(folder, "all")
        keep = _heldout_files(items, run_cfg, split) if why else np.arange(len(items.labels))
        items = ReviewItems(items.labels[keep], items.classes, split, [items.paths[i] for i in keep],
                       [items.splits[i] for i in keep], [items.relative[i] for i in keep], items.root)
        if not why:
            _refuse_shared_files(items, run_cfg)
        images = _read_for_run(items.paths, pre)
    else:
        items = _named_items(cfg, split)
        images = items.pixels
        size = pre.get("input_size")
        if size and tuple(images.shape[-2:]) != tuple(size[-2:]):
            images = resize_for(images, Preprocessing.from_dict(pre)) if pre.get("crop") else \
                torch.nn.functional.interpolate(images.float(), size=tuple(size[-2:]), mode="bilinear",
                                                antialias=True).round().clamp(0, 255).to(torch.uint8)
    run_classes = list(header.get("classes") or clf.classes or [])
    if run_classes != items.classes:
        raise ValueError(f"the run's classes {run_classes} are not the classes of {cfg.data} {items.classes}")
    _say(cfg, f"scoring {len(images):,} images with {run} ...")
    probs = clf.predict_proba(images, tta=getattr(clf, "tta", None)).double().numpy()
    return items, probs, f"predictions of {run} on {why or 'data it did not train on'}"


def _heldout_files(items: ReviewItems, run_cfg: dict[str, Any], split: str) -> np.ndarray:
    """Positions of the images a run trained on ``items``'s folder held out: its ``val/`` (``test/``) folder in a
    split tree, else the seeded stratified share of a plain folder it held out."""
    if items.splits and set(items.splits) != {"all"}:
        wanted = split if split in items.splits else "val"
        return np.array([i for i, s in enumerate(items.splits) if s == wanted], dtype=np.int64)
    if "freeze_epochs" in run_cfg:  # a transfer run (TransferConfig): its own validation share and seed
        fraction, seed = float(run_cfg.get("val_fraction") or 0.2), int(run_cfg.get("seed") or 0)
    else:  # a run trained from scratch: imclass.data.load's test split of a plain folder
        fraction, seed = TEST_FRACTION, SPLIT_SEED
    return split_indices(items.labels, fraction, seed=seed)[1].numpy()


def _refuse_shared_files(items: ReviewItems, run_cfg: dict[str, Any]) -> None:
    """A run trained on another folder: refuse when some of the reviewed files are byte-identical to its files."""
    trained = Path(str(run_cfg.get("dataset", ""))).expanduser()
    if not trained.is_dir() or items.paths is None:
        return
    _, _, _, records = folder_files(trained)
    sizes = {os.path.getsize(r["path"]) for r in records}
    theirs = {sha256_of(r["path"]) for r in records}
    shared = [rel for p, rel in zip(items.paths, items.relative) if os.path.getsize(p) in sizes and sha256_of(p) in theirs]
    if shared:
        raise ValueError(f"{len(shared)} of the reviewed images are also in {trained}, which the run trained on "
                         f"(e.g. {shared[0]}): its predictions on them are not out of sample; review without --run")


def _read_for_run(paths: list[Path], pre: dict[str, Any]) -> torch.Tensor:
    if not pre.get("input_size"):
        raise ValueError("the run's model file records no input size")
    if pre.get("crop"):
        return read_for(paths, Preprocessing.from_dict(pre))
    c, h, w = pre["input_size"]
    images = torch.empty((len(paths), c, h, w), dtype=torch.uint8)
    for i, path in enumerate(paths):
        images[i] = read_image(path, (h, w), channels=c)
    return images


# ------------------------------------------------------------------------------ features

def folder_features(cfg: ReviewConfig, items: ReviewItems) -> tuple[torch.Tensor, str]:
    """Frozen-backbone features of a folder's files (cached), pooled over the last 2 stages where the
    backbone can (as ``imclass train FOLDER`` does)."""
    backbone = cfg.backbone or pick_backbone(cfg.weights_dir)
    if backbone is None:
        raise ValueError("a review of a photo folder cross-validates on a pretrained backbone's features and none was "
                         f"found: {no_weights_advice(cfg.weights_dir)}")
    try:
        model = transfer(backbone, len(items.classes), weights_dir=cfg.weights_dir, pool_stages=DEFAULT_POOL_STAGES)
    except PoolStagesUnsupported:
        model = transfer(backbone, len(items.classes), weights_dir=cfg.weights_dir)
    store = None if (cfg.cache_dir or "").lower() == "none" else FeatureCache(cfg.cache_dir or cache_dir() / "features")
    start = time.perf_counter()
    _say(cfg, f"features of {len(items.paths):,} images ({backbone}, cache: {store.folder if store else 'none'}) ...")
    feats = extract_features(model, items.paths, model.preprocessing, cache=store)
    _say(cfg, f"features {tuple(feats.shape)} in {time.perf_counter() - start:.1f} s")
    return feats, backbone


def outlier_scores(features: torch.Tensor, k: int = 10, reference: torch.Tensor | None = None) -> np.ndarray:
    """Mean cosine distance (n,) of each feature vector to its ``k`` nearest other vectors (of
    ``features`` itself, its own match left out; or of ``reference``, vectors of the same space that
    ``features`` are not among)."""
    n = len(features)
    if reference is not None:
        k = max(1, min(k, len(reference)))
        knn = KNN(k=k, metric="cosine").fit(reference, torch.zeros(len(reference), dtype=torch.long))
        return knn.kneighbors(features)[0].double().numpy().mean(1)
    k = max(1, min(k, n - 1))
    dist, idx = KNN(k=k + 1, metric="cosine").fit(features, torch.zeros(n, dtype=torch.long)).kneighbors(features)
    dist = dist.double().numpy()
    own = idx.numpy() == np.arange(n)[:, None]
    dist = np.where(own, np.nan, dist)  # drop each vector's own match (and keep k others)
    return np.array([np.sort(row[~np.isnan(row)])[:k].mean() for row in dist])


def outliers(distance: np.ndarray, z: float, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices of outliers, score of every image): the robust z-score of the distance (median and MAD,
    within each of ``groups``: distances of different feature spaces are not comparable) above ``z``;
    score = the share of images whose z-score is lower."""
    groups = np.zeros(len(distance), dtype=np.int64) if groups is None else np.asarray(groups)
    robust = np.zeros(len(distance))
    for g in np.unique(groups):
        members = groups == g
        med = np.median(distance[members])
        mad = 1.4826 * np.median(np.abs(distance[members] - med)) + 1e-12
        robust[members] = (distance[members] - med) / mad
    rank = np.argsort(np.argsort(robust, kind="stable"), kind="stable")
    return np.flatnonzero(robust > z), rank / max(len(distance) - 1, 1)


# ------------------------------------------------------------------------------ duplicates

def _duplicates(items: ReviewItems, near_distance: int) -> list[tuple[int, int, int]]:
    """Pairs (i, j, bits) of reviewed images that are exact (bits = -1) or near duplicates with different
    labels: ``imclass data check``'s detection (``check_folder``) for folders, its hash on the pixels otherwise."""
    labels = items.labels.numpy()
    pairs: list[tuple[int, int, int]] = []
    if items.root is not None:
        report = check_folder(items.root, CheckOptions(near_distance=near_distance))
        where = {rel: i for i, rel in enumerate(items.relative)}
        for key, bits_of in (("exact_duplicates", lambda g: -1), ("near_duplicates", lambda g: int(g["distance"]))):
            for group in report[key]:
                members = [where[f] for f in group["files"] if f in where]
                pairs += [(a, b, bits_of(group)) for x, a in enumerate(members) for b in members[x + 1:]
                          if labels[a] != labels[b]]
        return pairs
    for i, j, d in hamming_pairs(image_hashes(items.pixels), near_distance):
        if labels[i] != labels[j]:
            pairs.append((i, j, d))
    return pairs


# ------------------------------------------------------------------------------ the review

def review(cfg: ReviewConfig) -> ReviewResult:
    """Review ``cfg.data``: out-of-sample probabilities, confident learning, outliers, duplicates; ranked."""
    start = time.perf_counter()
    folder = Path(cfg.data).expanduser()
    distance, groups = None, None  # k-NN distance in feature space of each image (outliers), per feature space
    if cfg.run is not None:
        items, probs, method = _run_items_and_probs(cfg)
    elif folder.is_dir():
        items = folder_items(folder.resolve(), cfg.split or "all")
        if cfg.limit is not None and cfg.limit < len(items.labels):
            keep = limit_indices(items.labels, cfg.limit, seed=cfg.seed, classes=items.classes).tolist()
            items = ReviewItems(items.labels[keep], items.classes, items.split, [items.paths[i] for i in keep],
                                [items.splits[i] for i in keep], [items.relative[i] for i in keep], items.root,
                                notes=[f"{cfg.limit:,} of the folder's images (--limit, seed {cfg.seed})"])
        feats, backbone = folder_features(cfg, items)
        probs = cross_val_features(feats, items.labels, len(items.classes), folds=cfg.folds, seed=cfg.seed,
                                   C=cfg.C, verbose=cfg.verbose)
        method = f"{cfg.folds}-fold cross-validation: logistic regression on {backbone} features"
        if len(feats) > cfg.outlier_k + 1:
            distance = outlier_scores(feats, cfg.outlier_k)
    else:
        items = _named_items(cfg, cfg.split or "train")
        ds = ImageDataset(items.pixels, items.labels, items.classes, split=items.split)
        distance, groups = np.full(len(ds), np.nan), np.zeros(len(ds), dtype=np.int64)

        def fold_outliers(clf: Any, held: np.ndarray, train: np.ndarray) -> None:
            # the fold's own feature space: held-out images against the images its network trained on
            feats = clf.predict_features(ds.images)
            distance[held] = outlier_scores(feats[held], cfg.outlier_k, reference=feats[train])
            groups[held] = groups.max() + 1

        probs = cross_val_images(ds, folds=cfg.folds, seed=cfg.seed, device=cfg.device, verbose=cfg.verbose,
                                 on_fold=fold_outliers, **cfg.fast)
        method = f"{cfg.folds}-fold cross-validation: the fast recipe per fold"
    labels = items.labels.numpy()
    found = find_label_issues(probs, labels, filter_by=cfg.filter_by, rank_by=cfg.rank_by)
    issues: dict[tuple[int, str], dict[str, Any]] = {}

    def add(i: int, kind: str, suggested: int | None, score: float, **extra: Any) -> None:
        key = (int(i), kind)
        if key in issues and issues[key]["score"] >= score:
            return
        issues[key] = {"index": int(items.positions[i]) if items.positions is not None else int(i), "row": int(i),
                       "path": items.relative[i] if items.relative else None,
                       "given": items.classes[labels[i]],
                       "suggested": items.classes[suggested] if suggested is not None else None,
                       "score": float(score), "kind": kind,
                       "probability": float(probs[i, suggested]) if suggested is not None else None,
                       "given_probability": float(probs[i, labels[i]]), **extra}

    for i, s, q in zip(found.indices, found.suggested, found.quality):
        add(i, "label", int(s), 1.0 - float(q))
    predicted = probs.argmax(1)
    if distance is not None:
        far, share = outliers(distance, cfg.outlier_z, groups)
        for i in far:
            add(i, "outlier", int(predicted[i]) if predicted[i] != labels[i] else None, float(share[i]),
                distance=float(distance[i]))
    for a, b, bits in _duplicates(items, cfg.near_distance):
        for x, y in ((a, b), (b, a)):
            add(x, "duplicate", int(labels[y]), 1.0 if bits < 0 else 1.0 - bits / 64,
                duplicate_of=items.relative[y] if items.relative else
                int(items.positions[y]) if items.positions is not None else int(y), bits=None if bits < 0 else bits)
    ranked = sorted(issues.values(), key=lambda r: (-r["score"], r["index"], KINDS.index(r["kind"])))
    if items.paths is not None:
        for r in ranked:
            r["sha256"] = sha256_of(items.paths[r["row"]])
    quality = label_quality(probs, labels, cfg.rank_by)
    _say(cfg, f"{len(ranked)} findings in {len(labels):,} images ({time.perf_counter() - start:.1f} s)")
    return ReviewResult(ranked, items.classes, len(labels), str(items.root) if items.root else cfg.data, items.split,
                        method, found.estimated_errors, time.perf_counter() - start, pixels=items.pixels,
                        paths=items.paths, notes=items.notes + [f"mean label quality {quality.mean():.3f} ({cfg.rank_by})"])


def config_dict(cfg: ReviewConfig) -> dict[str, Any]:
    """The config as JSON-ready values."""
    return asdict(cfg)

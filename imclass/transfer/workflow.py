""""My folder of photos -> a good classifier" in one call: ``train_transfer(TransferConfig(dataset=FOLDER))``.

Picks a pretrained backbone found under the weights root (``pick_backbone``), reads the folder at
the backbone's input size (each photo resized on its shorter side and centre-cropped, whatever its
size or format), holds out a seeded stratified validation split unless the folder has ``val/``,
trains the head on cached frozen features, optionally fine-tunes, saves a run folder and returns
the validation accuracy and the seconds it took. ``imclass train FOLDER`` calls it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imclass import data as imdata
from imclass.data.check import quick_check
from imclass.data.dataset import ImageDataset
from imclass.data.folder import class_folders, list_images, split_folders, split_word
from imclass.data.progress import Progress
from imclass.data.source import Decoder, ImageList, open_images
from imclass.data.split import limit_indices, split_indices
from imclass.model_file.save import save
from imclass.models.transfer_net import PoolStagesUnsupported
from imclass.models.weights import KNOWN_WEIGHTS, Preprocessing, find_known_weights, resolve_weights_root
from imclass.models.weights import backbone_name, preprocessing_for
from imclass.train.run_folder import (BEST_FILE, CONFUSION_FILE, CURVES_FILE, HISTORY_FILE, LAST_FILE, MODEL_FILE,
                                      fresh_run_dir, held_out_figures, link_or_copy, save_confusion_matrix,
                                      save_curves, write_history)
from imclass.train import distributed
from imclass.train.seed import seed_everything
from imclass.transfer import finetune  # called as finetune.X: tests replace finetune.fine_tune
from imclass.transfer.features import FeatureCache, preprocessing_decoder

__all__ = ["PREFERRED_BACKBONES", "TransferConfig", "pick_backbone", "read_folder_for", "train_transfer"]

# known weights in order of preference for a user's photos (accuracy first, then speed)
PREFERRED_BACKBONES = ("mobilenetv2_100", "squeezenet1_1")


@dataclass
class TransferConfig:
    """Everything a transfer run needs (saved as the run's config.json)."""

    dataset: str
    backbone: str | None = None  # None: the first of PREFERRED_BACKBONES found under the weights root
    weights: str | None = "imagenet"  # "imagenet", a file, or None (random initialisation)
    weights_dir: str | None = None
    head: str = "course"
    pool_stages: int | None = None  # also pool the last N feature stages; None: 2 on timm backbones, else 0
    feature_augment: str | None = None  # 'flip': the head also trains on mirrored photos' features (2x features)
    image_size: int | None = None  # crop size; default: the weights' own (224)
    freeze_epochs: int = 15  # head epochs on frozen features
    epochs: int = 0  # fine-tuning epochs after that (whole network or the last `unfreeze` stages)
    unfreeze: str | int = "all"
    batch_norm: str = "eval"  # fine-tuning: 'eval' keeps the pretrained running statistics, 'train' uses batch statistics
    lr: float = 1e-3
    batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None  # at most this many training images (quick tries)
    cache_dir: str | None = None  # features cached on disk here (memory only when None)
    out: str | None = None
    exist_ok: bool = False  # write into an existing `out`; else a new run goes to out-2, out-3, ...
    class_weight: str | list | dict | None = None  # class imbalance (Classifier.fit): 'balanced', a list or a dict
    sampler: str | None = None  # 'balanced': every class drawn about equally often
    verbose: bool = False
    data_mode: str | None = None  # where the photos live: memory, cache or stream (None: chosen from the headers)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"expected 0 < val_fraction < 1, received {self.val_fraction}")
        if self.freeze_epochs < 0 or self.epochs < 0:
            raise ValueError(f"expected freeze_epochs >= 0 and epochs >= 0, received {self.freeze_epochs}, {self.epochs}")
        if self.freeze_epochs == 0 and self.epochs == 0:
            raise ValueError("expected some training: --freeze-epochs or --epochs must be > 0")
        if self.batch_norm not in finetune.BATCH_NORM_MODES:
            raise ValueError(f"expected --batch-norm in {finetune.BATCH_NORM_MODES}, received {self.batch_norm!r}")


def pick_backbone(weights_dir: str | os.PathLike | None = None) -> str | None:
    """The first of ``PREFERRED_BACKBONES`` whose ImageNet weights are under the weights root, else None."""
    for arch in PREFERRED_BACKBONES:
        if find_known_weights(arch, weights_dir) is not None:
            return arch
    return None


def no_weights_advice(weights_dir: str | os.PathLike | None = None) -> str:
    """How to get pretrained weights (for the message of a run that trains from scratch)."""
    root = resolve_weights_root(weights_dir)
    known = ", ".join(f"{root / k.path}" for k in KNOWN_WEIGHTS.values())
    return (f"transfer from a pretrained backbone would do much better: put ImageNet weights under the weights root "
            f"({known}), or point --weights-dir / $IMCLASS_WEIGHTS at a folder holding them, "
            "or pass --backbone NAME --weights PATH")


def transfer_decoder(pre: Preprocessing) -> Decoder:
    """How a photo becomes the backbone's input (``imclass.transfer.features.preprocessing_decoder``)."""
    return preprocessing_decoder(pre)


def _open(images: ImageList, pre: Preprocessing, mode: str | None, verbose: bool = True) -> Any:
    return open_images(images, transfer_decoder(pre), mode, verbose=verbose)


def _limited(paths: list[Path], labels: list[int], limit: int | None, seed: int, classes: list[str],
             split: str) -> tuple[list[Path], list[int]]:
    """The files of ``--limit`` (the one rule: :func:`imclass.data.split.limit_indices`), before decoding."""
    if limit is None or limit >= len(paths):
        return paths, labels
    pick = limit_indices(torch.tensor(labels), limit, seed=seed, classes=classes, where=f"{split} split").tolist()
    return [paths[i] for i in pick], [labels[i] for i in pick]


def read_folder_for(folder: str | os.PathLike, pre: Preprocessing, *, val_fraction: float = 0.2, seed: int = 0,
                    limit: int | None = None, mode: str | None = None, verbose: bool = True,
                    train_crop: int | None = None) -> tuple[ImageDataset, ImageDataset, ImageDataset | None]:
    """(train, val, test or None) of a class-per-folder tree, every photo prepared as ``pre`` says.

    ``val/`` is the validation split when the folder has one; otherwise ``val_fraction`` of each
    class of the training images is held out (seeded, stratified) from the file list, before
    anything is decoded. ``test/``, when present, is kept apart. ``limit``: every split is a seeded,
    stratified sample (:func:`imclass.data.split.limit_indices`) of at most that many images (the
    training part is sampled so that ``limit`` images remain after the hold-out). Each part is decoded
    in the tier ``mode`` (``imclass.data.source``; None: chosen from the headers and said on stderr).
    ``train_crop``: the training split is centre-cropped to that size instead of ``pre.crop`` (fine-tuning
    reads it at ``pre.resize``, e.g. 256 for a 224 crop: its random-resized crops then reach the margin the
    evaluation crop cuts off; its centre ``pre.crop`` square is exactly the evaluation image).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    splits = split_folders(root)
    train_dir = splits.get("train", root)
    class_dirs = {c.name for d in (splits.values() if splits else [root]) for c in class_folders(d)}
    classes = sorted(class_dirs)
    if len(classes) < 2:
        raise ValueError(f"expected at least 2 class folders in {train_dir}, found {classes or 'none'}")
    paths, labels = list_images(train_dir, classes)
    if not paths:
        raise ValueError(f"no image files in the class folders of {train_dir}")
    if limit is not None:  # files are listed class by class: a quick try reads a seeded sample of every class
        wanted = limit if "val" in splits else math.ceil(limit / (1 - val_fraction))
        paths, labels = _limited(paths, labels, wanted, seed, classes, "train")
    name = root.name
    notes: list[str] = []
    files = ImageList(paths, labels, classes, root, name=name, split="train")
    if "val" in splits:
        v_paths, v_labels = list_images(splits["val"], classes)
        v_paths, v_labels = _limited(v_paths, v_labels, limit, seed, classes, "val")
        v_files = ImageList(v_paths, v_labels, classes, root, name=name, split="val")
        notes.append(f"validation: the folder's val/ ({len(v_paths)} images)")
    else:
        keep, held = split_indices(torch.tensor(labels), val_fraction, seed=seed)
        v_files = files.subset(held.tolist())
        files = files.subset(keep.tolist())
        notes.append(f"validation: {val_fraction:.0%} of each class held out (stratified, seed {seed})")
    if limit is not None and len(files) > limit:
        files = files.subset(limit_indices(torch.tensor(files.labels), limit, seed=seed).tolist())
    files.notes, v_files.notes = list(notes), list(notes)
    v_files.split = "val"
    train_pre = pre if not train_crop or train_crop == pre.crop else dataclasses.replace(
        pre, crop=train_crop, input_size=(pre.input_size[0], train_crop, train_crop))
    train = _open(files, train_pre, mode, verbose)
    val = _open(v_files, pre, mode, verbose)
    test = None
    if "test" in splits:
        t_paths, t_labels = list_images(splits["test"], classes)
        t_paths, t_labels = _limited(t_paths, t_labels, limit, seed, classes, "test")
        if t_paths:
            test = _open(ImageList(t_paths, t_labels, classes, root, name=name, split="test"), pre, mode, verbose)
    return train, val, test


def train_transfer(cfg: TransferConfig) -> dict[str, Any]:
    """Run ``cfg``: read the folder, transfer, train (head, then optional fine-tuning), save, report.

    Returns ``accuracy`` (validation), ``seconds`` (end to end, reading included), per-stage seconds,
    image counts, the backbone and where its weights came from, and the saved ``model_file``.
    """
    t_start = time.perf_counter()
    backbone = cfg.backbone or pick_backbone(cfg.weights_dir)
    if backbone is None:
        raise ValueError("no pretrained backbone found: " + no_weights_advice(cfg.weights_dir))
    backbone_name(backbone)  # an unknown name fails before any photo is read
    pre = preprocessing_for(backbone, cfg.weights, weights_dir=cfg.weights_dir)
    if cfg.image_size:
        pre = pre.with_size(cfg.image_size)
    t0 = time.perf_counter()
    main = distributed.is_main()  # under torchrun: rank 0 writes the run folder, every rank trains
    train, val, test = read_folder_for(cfg.dataset, pre, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit,
                                       mode=cfg.data_mode, train_crop=pre.resize if cfg.epochs else None)
    seconds = {"read": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if main:
        _warn_about_data(_centre_view(train, pre.crop), val, Path(cfg.dataset).expanduser().name)
    seconds["check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seed_everything(cfg.seed)  # the new head's initial weights too: identical commands, identical model files
    model = _transfer_for(cfg, backbone, len(train.classes))
    seconds["backbone"] = time.perf_counter() - t0
    wanted = Path(cfg.out or f"runs/transfer-{backbone.replace(':', '_')}-{Path(cfg.dataset).expanduser().name}")
    out = distributed.broadcast_object(fresh_run_dir(wanted, exist_ok=cfg.exist_ok) if main else None)  # rank 0 names it
    if main:
        if out != wanted:
            warnings.warn(f"{wanted} holds an earlier run: this run goes to {out} (--exist-ok writes into {wanted})",
                          stacklevel=2)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    cache = FeatureCache(cfg.cache_dir) if cfg.cache_dir else None
    common = dict(validation=val, unfreeze_stages=cfg.unfreeze, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                  cache=cache, verbose=cfg.verbose and main, feature_augment=cfg.feature_augment,
                  class_weight=cfg.class_weight, sampler=cfg.sampler, batch_norm=cfg.batch_norm)
    head = finetune.fine_tune(model, train, epochs=0, freeze_epochs=cfg.freeze_epochs, **common) if cfg.freeze_epochs else None
    fine = None
    if cfg.epochs:  # the frozen head's weights are kept: fine-tuning must beat it to become the default model
        head_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fine = finetune.fine_tune(model, train, epochs=cfg.epochs, freeze_epochs=0, **common)
    for stage in (head, fine):
        seconds.update(stage.seconds if stage is not None else {})
    clf = (fine or head).classifier
    t_end = time.perf_counter()
    # the held-out figures of the saved (and last) models, the test split, the files: a minute on a busy CPU
    closing = Progress(len(val), f"evaluating the models on the {split_word(cfg.dataset, 'val')} images and writing "
                       "the run folder",
                       verbose=cfg.verbose and main)
    history = _joined_history(head, fine)
    last = held_out_figures(clf, val)
    head_accuracy = _last(head.head_history) if head is not None else None
    chosen = last
    # every rank holds the same weights and computes the same figures; only rank 0 writes files
    if fine is not None and head is not None:
        if main:
            save(clf, out / LAST_FILE, train_config=_train_config(cfg, clf),
                 metrics=_metrics(last, history, len(history["epoch"]), test_figures(clf, test)))
        last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(head_state)
        head_figures = held_out_figures(clf, val)
        if head_figures["accuracy"] > last["accuracy"]:
            chosen = head_figures
            if main:
                warnings.warn(f"fine-tuning ended below the frozen head ({last['accuracy']:.1%} < "
                              f"{head_figures['accuracy']:.1%} validation accuracy): the frozen head is the saved "
                              f"model ({MODEL_FILE}, {BEST_FILE}), the fine-tuned one is {LAST_FILE}; give fine-tuning "
                              f"more --epochs (3 took the flowers photos from 91.1 % to 92.1 %) or a lower --lr",
                              stacklevel=2)
                save(clf, out / BEST_FILE, train_config=_train_config(cfg, clf),
                     metrics=_metrics(head_figures, history, cfg.freeze_epochs, test_figures(clf, test)))
        else:
            model.load_state_dict(last_state)
            if main:  # the fine-tuned model beats the head: last and best are the same file
                link_or_copy(out / LAST_FILE, out / BEST_FILE)
    elif main:
        save(clf, out / LAST_FILE, train_config=_train_config(cfg, clf),
             metrics=_metrics(last, history, len(history["epoch"]), test_figures(clf, test)))
        link_or_copy(out / LAST_FILE, out / BEST_FILE)
    model_file = out / MODEL_FILE
    if main:
        link_or_copy(out / BEST_FILE, out / MODEL_FILE)
        write_history(history, out / HISTORY_FILE)
        marks = {"fine-tuning starts": cfg.freeze_epochs + 0.5} if head is not None and fine is not None else None
        save_curves(history, out / CURVES_FILE, title=f"training curves ({out.name})", marks=marks)
        save_confusion_matrix(chosen["confusion_matrix"], list(val.classes), out / CONFUSION_FILE,
                              title=f"{out.name}: {'the frozen head' if chosen is not last else 'the saved model'} "
                                    f"on the validation split")
        histories = {"head": head.head_history.to_dict() if head is not None and head.head_history else None,
                     "fine_tune": fine.fine_history.to_dict() if fine is not None and fine.fine_history else None}
        (out / "history.json").write_text(json.dumps(histories, indent=1) + "\n")
    distributed.barrier()  # the run folder is complete before any rank returns
    if test is not None:
        test_accuracy = test_figures(clf, test)["accuracy"]
    closing.close()
    seconds["evaluate + save"] = time.perf_counter() - t_end
    total = time.perf_counter() - t_start
    seconds["other"] = max(0.0, total - sum(seconds.values()))  # the breakdown adds up to the total
    report = {
        "accuracy": chosen["accuracy"],  # the saved model's (model.safetensors) validation accuracy
        "loss": chosen["loss"],
        "model_selected": "frozen head" if chosen is not last else ("fine-tuned" if fine is not None else "head"),
        "last_accuracy": last["accuracy"],
        "val_images": len(val),
        "train_images": len(train),
        "classes": list(train.classes),
        "backbone": backbone,
        "weights": model.load_report.source,
        "input_size": list(pre.input_size),
        "pool_stages": model.pool_stages,
        "head_accuracy": head_accuracy,
        "suspected_label_errors": chosen["suspected_label_errors"],  # confident learning on the held-out predictions
        "data_mode": getattr(train, "mode", "memory"),
        "processes": distributed.world_size(),
        "seconds": total,
        "seconds_per_stage": seconds,
        "model_file": str(model_file),
        "out": str(out),
        "notes": list(train.notes),
    }
    if test is not None:
        report["test_accuracy"] = test_accuracy
        report["test_images"] = len(test)
    return report


def _joined_history(head: Any, fine: Any) -> dict[str, list]:
    """One per-epoch history of both stages (head epochs 1..F, then fine-tuning F+1..F+E), with a
    ``stage`` column: what history.csv and curves.png show."""
    out: dict[str, list] = {"epoch": [], "stage": []}
    stages = [(head.head_history if head is not None else None, "head"),
              (fine.fine_history if fine is not None else None, "fine-tune")]
    keys = ["loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
    for k in keys:
        out[k] = []
    for history, name in stages:
        if history is None:
            continue
        h = history.to_dict()
        n = len(h.get("epoch", []))
        for i in range(n):
            out["epoch"].append(len(out["epoch"]) + 1)
            out["stage"].append(name)
            for k in keys:
                out[k].append(h[k][i] if k in h and i < len(h[k]) else "")
    return {k: v for k, v in out.items() if k in ("epoch", "stage") or any(x != "" for x in v)}


def _train_config(cfg: TransferConfig, clf: Any) -> dict[str, Any]:
    return {"transfer": dataclasses.asdict(cfg), **(dataclasses.asdict(clf.compile_config) if clf.compile_config is not None else {})}


def test_figures(clf: Any, test: Any) -> dict[str, Any] | None:
    """The figures on the folder's own test/ split (None without one)."""
    return None if test is None else held_out_figures(clf, test)


def _metrics(val: dict, history: dict, epoch: int, test: dict | None) -> dict[str, float]:
    """What the model file records (``GET /models/{name}`` of ``imclass serve`` answers it): the validation
    figures of the saved weights, the test figures when the folder has a test/ split, the epoch."""
    values = {"val_accuracy": float(val["accuracy"]), "val_loss": float(val["loss"]), "epoch": epoch,
              "epochs": len(history.get("epoch", []))}
    if epoch and epoch <= len(history.get("accuracy", [])) and history["accuracy"][epoch - 1] != "":
        values["accuracy"] = float(history["accuracy"][epoch - 1])  # the training accuracy of that epoch
    if test is not None:
        values.update(test_accuracy=float(test["accuracy"]), test_loss=float(test["loss"]))
    return {k: v for k, v in values.items() if math.isfinite(v)}


DEFAULT_POOL_STAGES = 2  # flowers, frozen MobileNetV2: +1.5 points over the final features alone (bench/RESULTS.md)


def _transfer_for(cfg: TransferConfig, backbone: str, num_classes: int) -> Any:
    """``transfer`` as ``cfg`` says; ``pool_stages=None`` pools the last 2 stages too where the backbone
    can (timm's ``forward_intermediates``) and only its final features elsewhere."""
    def build(stages: int) -> Any:
        return finetune.transfer(backbone, num_classes, weights=cfg.weights, head=cfg.head, weights_dir=cfg.weights_dir,
                        input_size=cfg.image_size, pool_stages=stages)

    if cfg.pool_stages is not None:
        return build(cfg.pool_stages)
    if backbone_name(backbone).startswith("timm:"):
        try:
            return build(DEFAULT_POOL_STAGES)
        except PoolStagesUnsupported:
            pass
    return build(0)


def _centre_view(ds: Any, side: int) -> Any:
    """``ds`` with its images' centre ``side`` square (a view, no copy; a memory-mapped set stays mapped):
    the fine-tuning training split, stored at the resize size, as the evaluation crop sees it."""
    images = getattr(ds, "images", None)
    if not isinstance(images, torch.Tensor) or tuple(images.shape[-2:]) == (side, side):
        return ds
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    return ImageDataset(images[..., top : top + side, left : left + side], ds.labels, list(ds.classes), name=ds.name,
                        split=ds.split, source=ds.source, mode=ds.mode)


def _warn_about_data(train: Any, val: Any, name: str) -> None:
    """The cheap check of ``imclass.data.check.quick_check`` (two labels, leakage, imbalance) as warnings."""
    for message in quick_check(train, val, name=name):
        warnings.warn(message, stacklevel=3)


def _last(history: Any) -> float | None:
    if history is None or not history.history.get("val_accuracy"):
        return None
    return float(history.history["val_accuracy"][-1])


def load_for(dataset: str, pre: Preprocessing, *, split: str = "test", root: str | os.PathLike | None = None,
             val_fraction: float = 0.2, seed: int = 0, limit: int | None = None,
             mode: str | None = None) -> ImageDataset:
    """One split of a data set prepared as ``pre`` says (shorter side resized, centre crop), for
    evaluating a transfer model. A plain folder's ``test`` split is the seeded stratified hold-out
    that ``train_transfer`` validated on (same fraction and seed); a split tree's ``test`` falls back
    to ``val/``; named data sets (cifar10, ...) are loaded and resized in batches. ``limit``: a seeded,
    stratified sample of that many images (:func:`imclass.data.split.limit_indices`), decoded alone."""
    folder = Path(dataset).expanduser()
    if not folder.is_dir():
        ds = imdata.load(dataset, split=split, root=root, limit=limit, seed=seed)
        return ImageDataset(finetune.resize_for(ds.images, pre), ds.labels, ds.classes, name=ds.name, split=ds.split)
    splits = split_folders(folder)
    if splits:
        classes = sorted({c.name for d in splits.values() for c in class_folders(d)})
        name = split if split in splits else ("val" if split == "test" and "val" in splits else None)
        if name is None:
            raise ValueError(f"{folder} has split folders {', '.join(splits)}, received split={split!r}")
        paths, labels = list_images(splits[name], classes)
    else:
        classes = [c.name for c in class_folders(folder)]
        paths, labels = list_images(folder, classes)
        if split in ("train", "test", "val"):
            keep, held = split_indices(torch.tensor(labels), val_fraction, seed=seed)
            chosen = (keep if split == "train" else held).tolist()
            paths, labels = [paths[i] for i in chosen], [labels[i] for i in chosen]
        elif split != "all":
            raise ValueError(f"expected split train, test, val or all for {folder}, received split={split!r}")
    if not paths:
        raise ValueError(f"no image files in the class folders of {folder} for split {split!r}")
    paths, labels = _limited(paths, labels, limit, seed, classes, split)
    return _open(ImageList(paths, labels, classes, folder, name=folder.name, split=split), pre, mode)

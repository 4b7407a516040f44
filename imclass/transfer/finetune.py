"""Transfer learning in two stages, all through ``Classifier.fit`` (the one training engine).

    model = transfer("mobilenetv2_100", num_classes=5, weights="imagenet", head="course")
    result = fine_tune(model, train, epochs=2, freeze_epochs=30, validation=val)
    result.classifier.evaluate(...)

Stage 1: the backbone is frozen, its pooled features computed once (``extract_features``, cached)
and the head trained on them: the engine sees the feature vectors as (N, 1, 1, D) float "images".
Stage 2: all of the backbone, or its last N stages, is unfrozen and the whole network trained on
the images with per-group (discriminative) learning rates: the head at ``lr``, the top unfrozen
stage at ``lr * backbone_lr_ratio``, each stage below it ``lr_decay`` times lower.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from imclass.data.augment import RandomResizedCrop
from imclass.data.split import split_indices
from imclass.models import create
from imclass.models.transfer_net import TransferNet, head_config
from imclass.models.transfer_net import num_features
from imclass.models.weights import Preprocessing, apply_weights, backbone_name, weights_options
from imclass.train import Classifier, cpu_has_native_bf16
from imclass.train.inputs import as_data, is_source
from imclass.transfer.features import FeatureCache, extract_features_shared

# Deferred imports (inside functions), for start-up time: timm.models, torchvision.transforms.v2
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["BATCH_NORM_MODES", "FineTuneResult", "backbone_groups", "fine_tune", "fit_head", "freeze",
           "has_folded_batch_norm", "resize_for", "transfer", "unfreeze"]

BATCH_NORM_MODES = ("eval", "train")


def transfer(
    backbone: str,
    num_classes: int,
    weights: str | os.PathLike | None = "imagenet",
    head: str | list | dict = "course",
    *,
    weights_dir: str | os.PathLike | None = None,
    input_size: int | None = None,
    strict: bool = True,
    pool_stages: int = 0,
    **backbone_options: Any,
) -> TransferNet:
    """A pretrained ``backbone`` (timm or torchvision name) without its top, then a new ``head``.

    ``head``: ``"course"`` (GAP -> Dense 1024 relu -> Dense 200 relu -> Dense ``num_classes``),
    ``"linear"``, or a list of ``imclass.layers``. ``pool_stages=N`` feeds the head the pooled
    outputs of the backbone's last N feature stages too (0: the course's global average pooling
    only; see ``imclass.models.transfer_net``). The backbone starts frozen. The model carries
    ``load_report`` (what ``apply_weights`` loaded) and ``preprocessing`` (what the weights expect,
    at ``input_size`` when given).
    """
    if num_classes < 1:
        raise ValueError(f"expected num_classes >= 1, received num_classes={num_classes}")
    name = backbone_name(backbone)
    bare = name.split(":", 1)[1]
    backbone_options = {**weights_options(bare, weights, weights_dir), **backbone_options}
    if isinstance(head, str):  # "course" / "linear": the factory sizes it from the backbone
        config: str | dict = head
    else:  # a list of layers: sized on a probe of the backbone, stored as a Sequential config
        probe = create(name, num_classes=0, **backbone_options)
        config = head_config(head, _probe_features(probe, pool_stages), num_classes)
    model = create("transfer_net", backbone=name, num_classes=num_classes, head=config,
                   backbone_options=backbone_options, pool_stages=pool_stages)
    report = apply_weights(model.backbone, bare, weights, weights_dir=weights_dir, strict=strict)
    pre = report.preprocessing or Preprocessing()
    model.load_report = report
    model.preprocessing = pre.with_size(input_size) if input_size else pre
    freeze(model.backbone)
    return model


def _probe_features(net: nn.Module, pool_stages: int = 0) -> int:
    return num_features(net, pool_stages)


# --------------------------------------------------------------------------------------------
# freezing


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``module`` (its batch norm then stays in eval mode
    inside a ``TransferNet``). Returns ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def has_folded_batch_norm(backbone: nn.Module) -> bool:
    """True when every batch norm of ``backbone`` normalises with running mean 0 and variance 1
    (within eps) while some carry a learnt shift: batch norm folded into the convolutions before
    export, so the running statistics say nothing about the data and batch statistics must not
    replace them. (A freshly initialised backbone, shift 0 everywhere, is not folded.)"""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    identity = all(bool((m.running_mean == 0).all()) and bool(((m.running_var - 1).abs() <= 2 * m.eps).all())
                   for m in bns)
    shifted = any(m.bias is not None and bool((m.bias != 0).any()) for m in bns)
    return bool(bns) and identity and shifted


def backbone_groups(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in stages, input to output: timm's coarse ``group_matcher`` when the
    model has one (stem, each block stage, head convolution), else its top-level children."""
    named = dict(backbone.named_parameters())
    if hasattr(backbone, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        return [[named[n] for n in names if n in named] for _, names in sorted(groups.items())]
    children = [m for m in backbone.children() if any(True for _ in m.parameters())]
    if len(children) == 1:  # e.g. torchvision's `features` Sequential holding every stage
        children = [m for m in children[0].children() if any(True for _ in m.parameters())]
    return [list(m.parameters()) for m in children]


def unfreeze(model: TransferNet, stages: int | str = "all") -> list[list[nn.Parameter]]:
    """Let gradients reach the head and ``stages`` ("all", or the last N backbone stages).
    Returns the unfrozen backbone groups, top (nearest the head) first."""
    groups = backbone_groups(model.backbone)
    if stages == "all":
        chosen = groups
    elif isinstance(stages, int) and not isinstance(stages, bool) and stages >= 0:
        chosen = groups[len(groups) - stages:] if stages else []
    else:
        raise ValueError(f"expected stages 'all' or an integer >= 0, received stages={stages!r}")
    freeze(model.backbone)
    for group in chosen:
        for p in group:
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return list(reversed(chosen))


# --------------------------------------------------------------------------------------------
# data


def resize_for(images: torch.Tensor, pre: Preprocessing, batch_size: int = 256, *,
               crop: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, crop, crop): shorter side to ``pre.resize``, centre crop
    (``crop``, default ``pre.crop``; ``pre.resize`` keeps the whole resized square for random crops),
    in batches (a no-op when the images already have that size)."""
    from torchvision.transforms.v2 import functional as TF

    crop = crop or pre.crop
    if tuple(images.shape[-2:]) == (crop, crop):
        return images
    mode = getattr(TF.InterpolationMode, pre.interpolation.upper())
    out = torch.empty((len(images), images.shape[1], crop, crop), dtype=torch.uint8)
    for s in range(0, len(images), batch_size):
        x = TF.resize(images[s : s + batch_size], pre.resize, interpolation=mode, antialias=True)
        out[s : s + batch_size] = TF.center_crop(x, [crop, crop])
    return out


def _pair(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    return as_data(data, name)


@dataclass
class FineTuneResult:
    """What ``fine_tune`` produced: the trained classifier (whole network, images in), the head
    stage's and the fine-tuning stage's histories, and seconds per stage."""

    classifier: Any
    head_history: Any = None
    fine_history: Any = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def val_accuracy(self) -> float | None:
        """The validation accuracy after the last stage that ran (None without validation)."""
        for h in (self.fine_history, self.head_history):
            if h is not None and h.history.get("val_accuracy"):
                return float(h.history["val_accuracy"][-1])
        return None


@contextlib.contextmanager
def _threads(n: int):
    """Run with at most ``n`` torch threads, then restore: a head's (64, 1280) x (1280, 1024) products
    are too small to split, and on a busy machine a second thread mostly waits to be scheduled."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_head(
    model: TransferNet,
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    *,
    epochs: int = 20,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
    verbose: bool = False,
    class_weight: Any = None,
    sampler: str | None = None,
) -> Any:
    """Train ``model.head`` on precomputed backbone features (N, D) with ``Classifier.fit``: the
    engine sees them as (N, 1, 1, D) float "images" (mean 0, std 1: passed through unchanged).
    ``batch_size`` None: small data sets get small batches (enough optimizer steps per epoch).
    Returns the History."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"expected features (N, D) for {len(labels)} labels, received shape {tuple(features.shape)}")
    if features.shape[1] != model.num_features:
        raise ValueError(f"expected {model.num_features} features per image (the backbone's), received {features.shape[1]}")
    head = nn.Sequential(nn.Flatten(), model.head)  # (N, 1, 1, D) -> (N, D) -> logits
    clf = Classifier(head, classes=list(classes), mean=[0.0], std=[1.0], device="cpu")
    clf.compile("adamw", lr=lr, weight_decay=weight_decay, schedule="cosine")
    as_images = lambda f: f.reshape(len(f), 1, 1, -1)  # (N, D) -> (N, 1, 1, D)
    bs = batch_size or min(64, max(8, len(features) // 16))
    with _threads(1):
        return clf.fit((as_images(features), labels), epochs=epochs, batch_size=bs, seed=seed, verbose=verbose,
                       validation=(as_images(validation[0]), validation[1]) if validation is not None else None,
                       class_weight=class_weight, sampler=sampler)


def fine_tune(
    model: TransferNet,
    data: Any,
    epochs: int = 0,
    freeze_epochs: int = 20,
    *,
    validation: Any = None,
    classes: Sequence[str] | None = None,
    unfreeze_stages: int | str = "all",
    lr: float = 1e-3,
    head_lr: float | None = None,
    backbone_lr_ratio: float = 0.1,
    lr_decay: float = 0.7,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    head_batch_size: int | None = None,
    augment: Any = "auto",
    feature_augment: str | None = None,
    seed: int = 0,
    cache: FeatureCache | str | os.PathLike | None = None,
    amp: str | None = "auto",
    callbacks: Sequence[Any] = (),
    verbose: bool = False,
    class_weight: Any = None,
    sampler: str | None = None,
    batch_norm: str = "eval",
) -> FineTuneResult:
    """Stage 1: ``freeze_epochs`` epochs of the head on cached frozen features; stage 2: ``epochs``
    epochs of the whole network (``unfreeze_stages``: "all" or the last N) with discriminative
    learning rates. ``data``/``validation``: ``(uint8 images, labels)`` of any image size (resized as
    ``model.preprocessing`` says: the training images to the ``resize`` square when fine-tuning, so
    that the random crops reach its margin), or an image source (``ImageDataset`` in memory or
    memory-mapped, or a stream source) read batch by batch, never copied; ``validation`` may be a
    fraction (seeded stratified split; not of a stream source). Stage 2's ``augment="auto"`` is
    :class:`imclass.data.augment.RandomResizedCrop` to the crop size, with a flip, drawn from the
    stored image (seeded per epoch). Under torchrun each rank extracts its share of the features
    (``extract_features_shared``), the head and stage 2 train data-parallel (``Classifier.fit``). ``feature_augment="flip"``: the head also trains on the
    features of the mirrored training images (twice the feature cost; stage 2 augments images with
    ``augment``). Returns the classifier of the whole network.
    ``class_weight`` and ``sampler`` (class imbalance) go to the ``fit`` of both stages.
    ``batch_norm``: in stage 2 the backbone's batch norms normalise with their pretrained running
    statistics and train only their scale and shift (``"eval"``, Keras's advice; the default), or
    with each batch's statistics while updating the running ones (``"train"``, PyTorch's default).
    ``"train"`` needs pretrained statistics of real data: with folded batch norm (running mean 0,
    variance 1, as in the shared MobileNetV2) it loses the pretrained features (flowers: 91 % -> 74 %)."""
    if not isinstance(model, TransferNet):
        raise TypeError(f"expected a TransferNet (from imclass.transfer.transfer), received {type(model).__name__}")
    if epochs < 0 or freeze_epochs < 0:
        raise ValueError(f"expected epochs >= 0 and freeze_epochs >= 0, received {epochs} and {freeze_epochs}")
    if feature_augment not in (None, "flip"):
        raise ValueError(f"expected feature_augment None or 'flip', received feature_augment={feature_augment!r}")
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"expected batch_norm in {BATCH_NORM_MODES}, received batch_norm={batch_norm!r}")
    if epochs and batch_norm == "train" and has_folded_batch_norm(model.backbone):
        warnings.warn("batch_norm='train' on a backbone whose batch norms are identities (running mean 0, "
                      "variance 1: folded into the convolutions): batch statistics will replace them and the "
                      "pretrained features degrade; batch_norm='eval' keeps them", stacklevel=2)
    pre: Preprocessing = getattr(model, "preprocessing", None) or Preprocessing()
    if is_source(data):  # an ImageDataset (memory or memory-mapped) or a stream source: read batch by batch
        images, labels, data_classes = data, data.labels, list(data.classes)
    else:
        images, labels, data_classes = _pair(data, "data")
    classes = list(classes) if classes is not None else data_classes or [str(i) for i in range(int(labels.max()) + 1)]
    if model.num_classes is not None and model.num_classes != len(classes):
        raise ValueError(f"the model's head has {model.num_classes} outputs but the data has {len(classes)} classes")
    if isinstance(validation, float):
        keep, held = split_indices(labels, validation, seed=seed)
        if isinstance(images, torch.Tensor):
            val: Any = (images[held], labels[held])
            images, labels = images[keep], labels[keep]
        elif hasattr(images, "subset"):
            val, images = images.subset(held), images.subset(keep)
            labels = images.labels
        else:
            raise ValueError("a validation fraction needs images in memory or in the cache tier: pass the "
                             "validation images of a stream source as validation=")
    elif validation is not None:
        val = validation if is_source(validation) else _pair(validation, "validation")[:2]
    else:
        val = None
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(images, torch.Tensor):  # the random-resized crops of stage 2 can reach the margin of `resize`
        images = resize_for(images, pre, crop=pre.resize if epochs else None)
    if isinstance(val, tuple):
        val = (resize_for(val[0], pre), val[1])
    seconds["resize"] = time.perf_counter() - t0
    result = FineTuneResult(classifier=None, seconds=seconds)
    v_images, v_labels = (None, None) if val is None else ((val[0], val[1]) if isinstance(val, tuple) else (val, val.labels))

    if freeze_epochs:
        freeze(model.backbone)
        t0 = time.perf_counter()
        # under torchrun each rank extracts its share of the images and every rank gets all the features
        feats = extract_features_shared(model, images, pre, cache=cache, amp=amp)
        v_feats = extract_features_shared(model, v_images, pre, cache=cache, amp=amp) if val is not None else None
        head_labels = labels
        if feature_augment == "flip":
            feats = torch.cat([feats, extract_features_shared(model, images, pre, cache=cache, amp=amp, mirror=True)])
            head_labels = torch.cat([labels, labels])
        seconds["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result.head_history = fit_head(model, feats, head_labels, classes, epochs=freeze_epochs,
                                       validation=(v_feats, v_labels) if val is not None else None, lr=head_lr or lr,
                                       weight_decay=weight_decay, batch_size=head_batch_size, seed=seed,
                                       verbose=verbose, class_weight=class_weight, sampler=sampler)
        seconds["head"] = time.perf_counter() - t0

    clf = Classifier(model, classes=classes, mean=list(pre.mean), std=list(pre.std), device="cpu")
    channels = images.shape[1] if isinstance(images, torch.Tensor) else images.image_shape[0]
    clf.input_size = (channels, pre.crop, pre.crop)
    if epochs:
        t0 = time.perf_counter()
        groups = unfreeze(model, unfreeze_stages)
        model.batch_norm_eval = batch_norm == "eval"
        param_groups = [{"params": [p for p in model.head.parameters()], "lr": lr}]
        for i, group in enumerate(groups):
            param_groups.append({"params": group, "lr": lr * backbone_lr_ratio * lr_decay**i})
        optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
        native = amp == "bf16" or (amp == "auto" and cpu_has_native_bf16())
        clf.compile(optimizer, schedule="cosine", amp="bf16" if native else None)
        if augment == "auto":  # timm's / torchvision's training crop, drawn from the (larger) stored image
            augment = RandomResizedCrop(pre.crop)
        train = (images, labels) if isinstance(images, torch.Tensor) else images  # a source stays a source
        if verbose:  # the epoch lines come at each epoch's end: say what starts (one fine-tuning epoch can take minutes)
            what = "the whole backbone" if unfreeze_stages == "all" else f"the last {unfreeze_stages} backbone stage(s)"
            print(f"fine-tuning {what} and the head: {epochs} epoch(s) of {len(labels):,} images ...", file=sys.stderr,
                  flush=True)
        result.fine_history = clf.fit(train, epochs=epochs, batch_size=batch_size, validation=val,
                                      augment=augment, seed=seed, callbacks=callbacks, verbose=verbose,
                                      class_weight=class_weight, sampler=sampler)
        clf.input_size = (channels, pre.crop, pre.crop)  # what the model takes: the crop, not the stored size
        seconds["fine_tune"] = time.perf_counter() - t0
        freeze(model.backbone)
        model.batch_norm_eval = False
    else:
        clf.compile("adamw", lr=lr)  # the classifier evaluates and saves like any other
    clf.model.eval()
    result.classifier = clf
    return result

"""Deep features of a (frozen) backbone: ``extract_features`` with a cache that invalidates itself.

    pre = report.preprocessing                       # from imclass.models.weights.apply_weights
    feats = extract_features(backbone, images_or_paths, pre, cache=FeatureCache("~/.cache/imclass/features"))

Images are uint8 (N, C, H, W) tensors (any size: resized on the fly, whole batches at once) or image
file paths (decoded in threads, JPEGs at reduced DCT scale, each straight to the crop size). The
backbone runs in eval mode under ``torch.no_grad``, channels-last and, on a CPU that multiplies
bfloat16 natively (AVX-512-BF16 / AMX), under bf16 autocast. Features are float32 (N, D).

The cache key hashes everything the features depend on: the model's class, its registry spec and
every tensor of its state dict, the preprocessing, the pixels (or the files' paths, sizes and
modification times) and the numerics. Change any of them and the features are computed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from imclass.data.decode import ImageError, decode_image
from imclass.data.progress import Progress
from imclass.data.source import Decoder, ImageList, open_images
from imclass.models.transfer_net import TransferNet, pooled_features
from imclass.models.weights import Preprocessing
from imclass.train import cpu_has_native_bf16
from imclass.train import distributed
from imclass.train.memory import retain_freed_memory

# Deferred imports (inside functions), for start-up time: safetensors.torch, torchvision.transforms.v2
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["FeatureCache", "embed", "extract_features", "extract_features_shared", "feature_key", "open_for",
           "preprocessing_decoder", "prepare_batch", "read_for"]

ImagesOrPaths = torch.Tensor | Sequence[str | os.PathLike]


class FeatureCache:
    """Features by key, in memory (the last ``max_items``) and, with ``folder``, on disk as safetensors."""

    def __init__(self, folder: str | os.PathLike | None = None, max_items: int = 8) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.max_items = max_items
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        """The features stored under ``key``, or None."""
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                feats = load_file(str(path))["features"]
            except Exception:  # a damaged cache file is recomputed, never trusted
                path.unlink(missing_ok=True)
            else:
                self._remember(key, feats)
                self.hits += 1
                return feats
        self.misses += 1
        return None

    def put(self, key: str, feats: torch.Tensor, info: dict | None = None) -> None:
        """Store ``feats`` under ``key`` (atomically on disk)."""
        self._remember(key, feats)
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file({"features": feats.contiguous()}, str(tmp), metadata={"imclass_features": json.dumps(info or {})})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        """Forget the in-memory features (files on disk stay)."""
        self._memory.clear()

    def _remember(self, key: str, feats: torch.Tensor) -> None:
        self._memory[key] = feats
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path | None:
        return self.folder / f"{key}.safetensors" if self.folder is not None else None


# --------------------------------------------------------------------------------------------
# preprocessing


def prepare_batch(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C, crop, crop) normalised: shorter side resized to
    ``pre.resize`` and centre-cropped to ``pre.crop`` (skipped when already crop-sized)."""
    from torchvision.transforms.v2 import functional as TF

    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, C, H, W), received shape {tuple(x.shape)}")
    if x.shape[1] == 1 and pre.input_size[0] == 3:
        x = x.expand(-1, 3, -1, -1)  # grey photos in a colour model
    if x.shape[1] != pre.input_size[0]:
        raise ValueError(f"expected images with {pre.input_size[0]} channels, received shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (pre.crop, pre.crop):
        mode = getattr(TF.InterpolationMode, pre.interpolation.upper())
        x = TF.center_crop(TF.resize(x, pre.resize, interpolation=mode, antialias=True), [pre.crop, pre.crop])
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def decode_one(path: Path, pre: Preprocessing) -> torch.Tensor:
    """One file -> uint8 (3, crop, crop): shorter side to ``resize``, centre crop, through the decoding gate
    (``imclass.data.decode``: JPEG draft, pixel limit, EXIF orientation)."""
    return decode_image(path, channels=3, resize=pre.resize, crop=pre.crop, interpolation=pre.interpolation,
                        name=str(path))


def preprocessing_decoder(pre: Preprocessing) -> Any:
    """The ``imclass.data.source.Decoder`` of ``pre``: shorter side to ``pre.resize`` (JPEG draft first),
    centre crop to ``pre.crop``, RGB; its key (part of an image cache's key) names all of it."""
    def decode(path: Path) -> Any:
        return decode_one(path, pre).permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)

    key = f"transfer:resize={pre.resize}:crop={pre.crop}:{pre.interpolation}:pil-draft"
    return Decoder(decode, (pre.crop, pre.crop), key, channels=3)


def open_for(paths: Sequence[str | os.PathLike], pre: Preprocessing, mode: str | None = None, *,
             workers: int | None = None, verbose: bool = True) -> Any:
    """Image files prepared as ``pre`` says, in the tier ``mode`` (``imclass.data.source``: memory,
    cache or stream; None: chosen from their count and size, said on stderr). Unreadable files are an
    error naming them."""
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no such image file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    root = Path(os.path.commonpath([str(p) for p in paths])) if paths else Path(".")
    files = ImageList(paths, list(range(len(paths))), ["image"], root)
    return open_images(files, preprocessing_decoder(pre), mode, strict=True, workers=workers, verbose=verbose)


def read_for(paths: Sequence[str | os.PathLike], pre: Preprocessing, *, workers: int | None = None,
             progress: bool = True) -> torch.Tensor:
    """Image files -> uint8 (N, 3, crop, crop) as ``pre`` prepares them (threads; errors name the file).
    ``progress``: a progress line on stderr (tqdm on a terminal) for 256 images or more."""
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no such image file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    bar = Progress(len(paths), f"reading images at {pre.crop} px", verbose=progress and len(paths) >= 256)

    def one(p: Path) -> torch.Tensor | str:
        try:
            return decode_one(p, pre)
        except ImageError as err:
            return str(err)
        finally:
            bar.update()

    with bar, ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(one, paths))
    bad = [d for d in decoded if isinstance(d, str)]
    if bad:
        raise ValueError(f"{len(bad)} unreadable image file(s): {bad[0]}" + ("; ..." if len(bad) > 1 else ""))
    return torch.stack(decoded) if decoded else torch.empty((0, 3, pre.crop, pre.crop), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# features


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logit features of ``model`` for a prepared batch (timm's contract when present;
    a ``TransferNet`` gives its backbone's, with its ``pool_stages``)."""
    return pooled_features(model, x)


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def model_digest(model: nn.Module) -> str:
    """A hash of the model's class, registry spec and every tensor of its state dict."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__qualname__.encode())
    h.update(json.dumps(getattr(model, "imclass_spec", None), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def _data_digest(images: ImagesOrPaths) -> str:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(images, torch.Tensor):
        _hash_tensor(h, images)
    else:
        for p in images:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def feature_key(model: nn.Module, images: ImagesOrPaths, pre: Preprocessing, amp: str | None) -> str:
    """The cache key: model digest, preprocessing, data digest and numerics, hashed together. For a
    ``TransferNet`` the model is its backbone and ``pool_stages`` (a new head reuses the features)."""
    if isinstance(model, TransferNet):
        digest = f"{model_digest(model.backbone)}|pool_stages={model.pool_stages}"
    else:
        digest = model_digest(model)
    parts = {"model": digest, "pre": pre.to_dict(), "data": _data_digest(images), "amp": amp, "v": 1}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def _resolve_amp(amp: str | None, device: torch.device) -> str | None:
    if amp == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if cpu_has_native_bf16() else None
    if amp not in (None, "bf16"):
        raise ValueError(f"expected amp 'auto', 'bf16' or None, received amp={amp!r}")
    return amp


def extract_features(
    model: nn.Module,
    images: ImagesOrPaths,
    preprocessing: Preprocessing,
    batch_size: int = 32,
    *,
    cache: FeatureCache | str | os.PathLike | None = None,
    amp: str | None = "auto",
    channels_last: bool = True,
    device: str | torch.device = "cpu",
    mode: str | None = None,
    progress: bool = True,
    rows: slice | torch.Tensor | None = None,
    mirror: bool = False,
) -> torch.Tensor:
    """Pooled features (N, D) float32 of ``images`` (uint8 (N, C, H, W), an image source such as an
    ``ImageDataset``, or file paths) by ``model``, a batch at a time. File paths are read through the
    tier ``mode`` (``imclass.data.source``: memory, cache, stream; None: chosen and said on stderr).

    ``cache``: a :class:`FeatureCache` or a folder for one; a hit returns the stored features at once.
    ``amp="auto"`` uses bf16 autocast on CUDA and on CPUs with native bf16, float32 elsewhere.
    ``progress``: a progress line on stderr (tqdm on a terminal) for 256 images or more.
    The model is put in eval mode (and left there) and, with ``channels_last``, stored NHWC.
    ``model`` may be a bare backbone or a ``TransferNet`` (its backbone's features, ``pool_stages`` included).
    Batches of 32 ran faster than 64 on the 2-core CPUs measured (bench/RESULTS.md: they stay in cache).
    ``rows`` (a slice or row numbers) restricts an image source or tensor to those images, read batch by
    batch (a stream source decodes only them); ``mirror`` extracts the features of the left-right mirrored
    images (``feature_augment="flip"``), a batch at a time, never a mirrored copy of the set.
    """
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, received batch_size={batch_size}")
    if hasattr(images, "images") and isinstance(getattr(images, "images"), torch.Tensor):
        images = images.images  # an ImageDataset
    source = None
    if not isinstance(images, torch.Tensor) and all(hasattr(images, a) for a in ("batches", "read", "labels")):
        source, images = images, None  # the stream tier: batches only
    if source is not None:
        pass
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), received {images.dtype} of shape {tuple(images.shape)}")
    elif isinstance(images, (str, os.PathLike)):
        raise TypeError("expected a list of image paths (or a uint8 tensor), received one path: wrap it in a list")
    else:
        images = [Path(p) for p in images]
    device = torch.device(device)
    amp = _resolve_amp(amp, device)
    if isinstance(cache, (str, os.PathLike)):
        cache = FeatureCache(cache)
    if rows is not None and source is None and not isinstance(images, torch.Tensor):
        images = images[rows] if isinstance(rows, slice) else [images[i] for i in torch.as_tensor(rows).tolist()]
        rows = None
    if rows is not None and isinstance(images, torch.Tensor):
        images = images[rows] if isinstance(rows, slice) else torch.index_select(images, 0, torch.as_tensor(rows))
        rows = None  # a slice is a view (of a memory-mapped set too): hashed and read as it is
    key = feature_key(model, images, preprocessing, amp) if cache is not None and source is None else None
    if key is not None and mirror:
        key = hashlib.blake2b(f"{key}|mirror".encode(), digest_size=20).hexdigest()
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    if source is None:
        source = images if isinstance(images, torch.Tensor) else open_for(images, preprocessing, mode)
    if isinstance(source, torch.Tensor):
        batches = (source[s : s + batch_size] for s in range(0, len(source), batch_size))
        total = len(source)
    elif isinstance(getattr(source, "images", None), torch.Tensor):  # memory or cache tier
        pixels = source.images if rows is None else (source.images[rows] if isinstance(rows, slice) else None)
        if pixels is None:
            picked = torch.as_tensor(rows)
            batches = (torch.index_select(source.images, 0, picked[s : s + batch_size])
                       for s in range(0, len(picked), batch_size))
            total = len(picked)
        else:
            batches = (pixels[s : s + batch_size] for s in range(0, len(pixels), batch_size))
            total = len(pixels)
    else:  # the stream tier: worker processes decode only these rows
        picked = None if rows is None else (torch.arange(len(source))[rows] if isinstance(rows, slice)
                                            else torch.as_tensor(rows))
        batches = (x for x, _ in source.batches(batch_size, picked))
        total = len(source) if picked is None else len(picked)
    if device.type == "cpu":
        retain_freed_memory()  # page faults otherwise cost ~half of a CPU forward here (bench/RESULTS.md)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = []

    # a silent phase no more: ~20 s for 3,000 photos on 2 CPU cores
    with torch.no_grad(), Progress(total, "extracting features", verbose=progress and total >= 256) as bar:
        for xb in batches:
            x = prepare_batch(xb.to(device).flip(-1) if mirror else xb.to(device), preprocessing)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                out.append(embed(model, x).float().cpu())
            bar.update(len(xb))
    feats = torch.cat(out) if out else torch.empty((0, 0))
    if key is not None:
        cache.put(key, feats, {"n": len(feats), "preprocessing": preprocessing.to_dict(), "amp": amp})
    return feats


def extract_features_shared(model: nn.Module, images: Any, preprocessing: Preprocessing, batch_size: int = 32,
                            **options: Any) -> torch.Tensor:
    """:func:`extract_features` with the work shared by the ranks of a torchrun job: rank r extracts only its
    contiguous share ``imclass.train.distributed.shard(N)`` of ``images`` (a uint8 tensor, a list of paths, an
    ``ImageDataset`` or a stream source, which then decodes only that share), then the shares are gathered so every rank returns all N features, in order. In one
    process it is :func:`extract_features`. ``options`` go to :func:`extract_features` (a ``cache`` holds each
    rank's share under its own key)."""
    if distributed.world_size() == 1:
        return extract_features(model, images, preprocessing, batch_size, **options)
    part = distributed.shard(len(images))
    if hasattr(images, "subset") and hasattr(images, "images"):  # an ImageDataset
        mine: Any = images.subset(part)  # a slice: a view, also of a memory-mapped set
    elif isinstance(images, torch.Tensor) or isinstance(images, (list, tuple)):
        mine = images[part]
    elif all(hasattr(images, a) for a in ("batches", "read", "labels")):  # a stream source: decode only this share
        mine, options = images, {**options, "rows": part}
    else:
        raise TypeError(f"expected a uint8 tensor, a list of paths, an ImageDataset or an image source to share "
                        f"among ranks, received {type(images).__name__}")
    options.setdefault("progress", distributed.is_main())
    feats = extract_features(model, mine, preprocessing, batch_size, **options)
    parts = distributed.all_gather_objects(feats)
    width = max(p.shape[1] for p in parts if p.ndim == 2 and len(p)) if any(len(p) for p in parts) else 0
    return torch.cat([p if len(p) else torch.empty((0, width)) for p in parts])

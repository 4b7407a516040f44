"""Pretrained weights: find them, read them in the formats users have, load them strictly, say what happened.

    model = imclass.models.create("timm:mobilenetv2_100", num_classes=5, pad_type="same")
    report = apply_weights(model, "mobilenetv2_100", "imagenet")     # the known file under the weights root
    report = apply_weights(model, "mobilenetv2_100", "my_finetune.pth")
    print(report)            # loaded / dropped head / missing / unexpected / shape-mismatched keys
    pre = report.preprocessing                                        # what these weights expect as input

``weights``: ``None`` keeps the model's initialisation; ``"imagenet"`` is the known file for ``arch``
under the weights root (``weights_dir=`` / ``--weights-dir``, else ``$IMCLASS_WEIGHTS``, else
``~/.cache/imclass/weights``), else timm's repository on the Hugging Face hub (``$HF_ENDPOINT``, default
huggingface.co), downloaded once through ``imclass.data.download`` with the SHA-256 the hub announces
checked, and cached under ``$IMCLASS_CACHE/hub``; offline and not cached, a ``WeightsError`` in seconds
says what to fetch and how to pass a file instead. The model options a set of weights needs (the
converted MobileNetV2 file's TF "same" padding) follow the weights actually loaded (``weights_options``):
the hub's PyTorch-trained MobileNetV2 gets timm's ordinary padding. A path is a
``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (read with ``weights_only=True``), possibly
wrapped in a checkpoint's ``state_dict`` / ``model`` key, in any float dtype. The old classifier is
dropped when its class count differs from the model's (the transfer-learning start); every other key
must match (``strict=True``) or the error lists the missing, unexpected and shape-mismatched keys.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imclass.models._registry import create
from imclass.data.download import DownloadError, cache_dir, cached_digest, download_file

__all__ = [
    "ENV_VAR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_WEIGHTS",
    "KnownWeights",
    "LoadReport",
    "Preprocessing",
    "WeightsError",
    "apply_weights",
    "backbone_name",
    "create_backbone",
    "hub_file",
    "find_known_weights",
    "imagenet_classes",
    "preprocessing_for",
    "read_state_dict",
    "resolve_weights_root",
    "weights_options",
]

ENV_VAR = "IMCLASS_WEIGHTS"
DEFAULT_ROOT = "~/.cache/imclass/weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
HUB_ENDPOINT = "https://huggingface.co"  # $HF_ENDPOINT overrides it (a mirror, or a local server in tests)
HUB_CACHE = "hub"  # under imclass.data.download.cache_dir()
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


class WeightsError(ValueError):
    """Weights that cannot be found, read or matched to the model (the message says which and why)."""


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a set of weights: resize the shorter side to ``resize``
    (``interpolation``), centre-crop ``crop``, scale to [0, 1], normalise by ``mean``/``std``.

    ``input_size`` is (C, H, W) of the cropped tensor. Travels with the weights and into model files.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"expected interpolation bilinear|bicubic|nearest, received {self.interpolation!r}")
        if self.crop > self.resize or self.crop <= 0:
            raise ValueError(f"expected 0 < crop <= resize, received crop={self.crop}, resize={self.resize}")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError(f"expected {self.input_size[0]} mean/std values, received mean={self.mean}, std={self.std}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the keys of a model file's ``preprocessing`` entry)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """Rebuild from ``to_dict()`` output (extra keys such as ``tta`` are ignored)."""
        size = tuple(int(v) for v in d["input_size"])
        crop = int(d.get("crop") or size[-1])
        return cls(
            input_size=size,  # type: ignore[arg-type]
            resize=int(d.get("resize") or crop),
            crop=crop,
            interpolation=d.get("interpolation") or "bilinear",
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    def with_size(self, crop: int) -> "Preprocessing":
        """The same preprocessing at another crop size (resize scaled by the same ratio)."""
        resize = max(crop, round(crop * self.resize / self.crop))
        return replace(self, crop=crop, resize=resize, input_size=(self.input_size[0], crop, crop))


@dataclass(frozen=True)
class KnownWeights:
    """A set of weights known by name: its file under the weights root, the model options its
    architecture needs (e.g. TF "same" padding) and its preprocessing."""

    arch: str
    family: str  # "timm" or "torchvision"
    path: str  # relative to the weights root
    preprocessing: Preprocessing
    options: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 1000


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "mobilenetv2_100": KnownWeights(
        "mobilenetv2_100", "timm", "mobilenetv2_100-imagenet/model.safetensors",
        Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), {"pad_type": "same"},
    ),
    "squeezenet1_1": KnownWeights(
        "squeezenet1_1", "torchvision", "squeezenet1_1-imagenet/squeezenet1_1.pth", Preprocessing(),
    ),
}


@dataclass
class LoadReport:
    """What ``apply_weights`` did: where the weights came from and which keys were loaded or not."""

    arch: str
    source: str | None  # a file path, "hub:<id>", or None (initialisation kept)
    loaded: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)  # the old classifier, left at its fresh init
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: model (a, b) vs file (c, d)"
    preprocessing: Preprocessing | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        """True when every key of the model (but a dropped head) came from the weights."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (key lists shortened to counts plus the first few)."""
        out: dict[str, Any] = {"arch": self.arch, "source": self.source, "sha256": self.sha256,
                               "loaded": len(self.loaded)}
        for name in ("dropped_head", "missing", "unexpected", "mismatched"):
            out[name] = list(getattr(self, name))
        out["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        return out

    def __str__(self) -> str:
        if self.source is None:
            return f"{self.arch}: no weights loaded (initialisation kept)"
        parts = [f"{self.arch}: {len(self.loaded)} tensors loaded from {self.source}"]
        if self.dropped_head:
            parts.append(f"classifier dropped (class count differs): {_few(self.dropped_head)}")
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {_few(keys)}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# where weights live


def resolve_weights_root(weights_dir: str | os.PathLike | None = None) -> Path:
    """The weights root: ``weights_dir`` when given, else ``$IMCLASS_WEIGHTS``, else ``~/.cache/imclass/weights``."""
    if weights_dir is None or str(weights_dir) == "":
        weights_dir = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(weights_dir).expanduser()


def _bare(arch: str) -> str:
    return arch.split(":", 1)[1] if ":" in arch else arch


def find_known_weights(arch: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The known ImageNet file for ``arch`` under the weights root, or None when absent or unknown."""
    known = KNOWN_WEIGHTS.get(_bare(arch))
    if known is None:
        return None
    path = resolve_weights_root(weights_dir) / known.path
    return path if path.is_file() else None


def imagenet_classes(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """The 1,000 ImageNet class names in index order (``imagenet_classes.txt`` under the weights root)."""
    path = resolve_weights_root(weights_dir) / "imagenet_classes.txt"
    if not path.is_file():
        raise WeightsError(
            f"no ImageNet class names at {path}: put imagenet_classes.txt (1,000 lines) there, "
            f"or point --weights-dir / ${ENV_VAR} at a folder holding it"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != 1000:
        raise WeightsError(f"{path}: expected 1,000 ImageNet class names, found {len(names)}")
    return names


def backbone_name(arch: str) -> str:
    """The registry name of a backbone: ``timm:<arch>`` for a timm model, ``torchvision:<arch>`` for a
    torchvision classic that timm lacks (e.g. squeezenet1_1); prefixed names are kept."""
    if ":" in arch:
        return arch
    known = KNOWN_WEIGHTS.get(arch)
    if known is not None:
        return f"{known.family}:{arch}"
    import timm

    if timm.is_model(arch):
        return f"timm:{arch}"
    import torchvision

    if arch in torchvision.models.list_models(module=torchvision.models):
        return f"torchvision:{arch}"
    import difflib

    close = difflib.get_close_matches(arch, timm.list_models() + list(KNOWN_WEIGHTS), n=5)
    raise ValueError(f"unknown backbone {arch!r}: not a timm or torchvision model." + (f" Did you mean {close}?" if close else ""))


# --------------------------------------------------------------------------------------------
# preprocessing


def _timm_preprocessing(arch: str) -> Preprocessing | None:
    import timm

    if not timm.is_model(arch):
        return None
    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # some names have no default config
        cfg = None
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
    crop = size[-1]
    resize = int(round(crop / float(cfg.get("crop_pct") or 0.875)))
    interp = cfg.get("interpolation") or "bilinear"
    return Preprocessing(
        input_size=size, resize=max(resize, crop), crop=crop,
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
    )


def preprocessing_for(arch: str, weights: str | os.PathLike | None = "imagenet",
                      *, weights_dir: str | os.PathLike | None = None) -> Preprocessing:
    """The preprocessing that ``weights`` for ``arch`` expect.

    Known weights (``"imagenet"`` or the known file itself) carry their own (e.g. mean = std = 0.5 for
    the TF-converted MobileNetV2); an imclass model file carries what it was trained with; anything
    else gets timm's pretrained config for ``arch``, else ImageNet's resize 256 / crop 224 / mean / std.
    """
    bare = _bare(arch)
    known = KNOWN_WEIGHTS.get(bare)
    if weights is not None and str(weights) != "imagenet":
        path = Path(weights)
        recorded = _recorded_preprocessing(path)
        if recorded is not None:
            return recorded
        if known is not None and _is_known_file(bare, path, weights_dir):
            return known.preprocessing
    elif known is not None and (weights is None or find_known_weights(bare, weights_dir) is not None):
        return known.preprocessing
    return _timm_preprocessing(bare) or Preprocessing()


def _recorded_preprocessing(path: Path) -> Preprocessing | None:
    """The preprocessing an imclass model file records, when it records a complete one."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open
        import json

        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("imclass")
        pre = json.loads(meta).get("preprocessing") if meta else None
        if pre and pre.get("mean") and pre.get("std") and pre.get("input_size"):
            return Preprocessing.from_dict(pre)
    except Exception:
        return None
    return None


# --------------------------------------------------------------------------------------------
# reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: ``.safetensors``, or a ``.pth``/``.pt``/``.bin`` state dict read with
    ``torch.load(weights_only=True)`` (never unpickling code), unwrapped from a checkpoint's
    ``state_dict``/``model`` key and from DDP's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as err:
            raise WeightsError(f"{path}: not a readable .safetensors file (corrupted or truncated?): {err}") from None
    elif path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(
                f"{path}: not a readable weights-only torch file (a pickled model object, or corrupted?): "
                f"{str(err).splitlines()[0][:300]}"
            ) from None
        for _ in range(2):  # {"state_dict": ...} or {"model": {"state_dict": ...}}
            if isinstance(state, dict):
                inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
                if inner is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
                    state = inner
    else:
        raise WeightsError(f"{path}: expected a .safetensors, .pth, .pt or .bin weights file, received {path.suffix!r}")
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), received {type(state).__name__}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: holds no tensors (expected a state dict name -> tensor)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_known_file(arch: str, path: Path, weights_dir: str | os.PathLike | None) -> bool:
    """True when ``path`` is the known file of ``arch`` under the weights root (or a byte-identical copy)."""
    local = find_known_weights(arch, weights_dir)
    if local is None or not path.is_file():
        return False
    if local.resolve() == path.resolve():
        return True
    return local.stat().st_size == path.stat().st_size and _sha256(local) == _sha256(path)


def weights_options(arch: str, weights: str | os.PathLike | None,
                    weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The model options the weights that will be loaded need: the known file's (e.g. ``pad_type="same"``
    for the TF-converted MobileNetV2) when ``weights`` resolves to it, else none (the hub's timm weights
    and other files were trained with timm's defaults; pass options explicitly for anything else)."""
    bare = _bare(arch)
    known = KNOWN_WEIGHTS.get(bare)
    if known is None or weights is None:
        return {}
    if str(weights) == "imagenet":
        return dict(known.options) if find_known_weights(bare, weights_dir) is not None else {}
    return dict(known.options) if _is_known_file(bare, Path(weights).expanduser(), weights_dir) else {}


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")


def hub_file(arch: str) -> tuple[str, str, str]:
    """``(repo_id, filename, url)`` of the ImageNet weights timm publishes for ``arch`` on the hub."""
    import timm

    bare = _bare(arch)
    cfg = timm.get_pretrained_cfg(bare) if timm.is_model(bare) else None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise WeightsError(f"timm publishes no hub weights for {bare!r}")
    filename = cfg.get("hf_hub_filename") or "model.safetensors"
    return repo, filename, f"{_hub_endpoint()}/{repo}/resolve/main/{filename}"


def _announced_sha256(url: str, timeout: float) -> str | None:
    """The SHA-256 the hub announces for an LFS file (``X-Linked-Etag``/``ETag`` of a HEAD request on the
    resolve URL, read before following the redirect to the file store), or None."""
    import re
    import urllib.error
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # keep the hub's own headers
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout)
        headers = response.headers
    except urllib.error.HTTPError as err:
        if err.code not in (301, 302, 303, 307, 308):
            raise WeightsError(f"the hub answered {err.code} for {url}") from None
        headers = err.headers
    for name in ("X-Linked-Etag", "ETag"):
        tag = (headers.get(name) or "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _hub_state(arch: str, weights_dir: str | os.PathLike | None) -> tuple[dict[str, torch.Tensor], str, str]:
    """ImageNet weights for ``arch`` from timm's hub repository: the cached copy when there is one, else
    downloaded (SHA-256 checked) into the cache; a WeightsError in seconds when offline and not cached."""
    import timm

    bare = _bare(arch)
    known = KNOWN_WEIGHTS.get(bare)
    root = resolve_weights_root(weights_dir)
    where = f"{root / known.path}" if known else f"a file such as {root / (bare + '-imagenet')}/model.safetensors"
    advice = (
        f"fetch the ImageNet weights of {bare!r} (e.g. timm's `{bare}` from the Hugging Face hub) and put them at "
        f"{where}, or pass weights=PATH / --weights PATH (a .safetensors or .pth state dict)"
    )
    if not timm.is_model(bare):
        raise WeightsError(f"no ImageNet weights for {bare!r} under {root} and timm's hub does not know it: {advice}")
    try:
        repo, filename, url = hub_file(bare)
    except WeightsError as err:
        raise WeightsError(f"no ImageNet weights for {bare!r} under {root} and {err}: {advice}") from None
    cached = cache_dir() / HUB_CACHE / repo / filename
    expected_file = cached.with_name(cached.name + ".sha256")
    if cached.is_file() and expected_file.is_file():
        expected = expected_file.read_text().strip()
        if cached_digest(cached, "sha256", lambda: _sha256(cached)) == expected:
            return read_state_dict(cached), f"hub:{repo}", expected
        cached.unlink(missing_ok=True)  # damaged since it was downloaded: fetch it again
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not _online():
        raise WeightsError(f"no ImageNet weights for {bare!r} under {root}, none cached under {cached.parent}, and "
                           f"the hub ({_hub_endpoint()}) cannot be reached (offline): {advice}")
    try:
        expected = _announced_sha256(url, timeout=30.0)
        if expected is None:
            raise WeightsError(f"the hub gave no SHA-256 for {url}, so the download could not be checked")
        download_file(url, cached, sha256=expected)
    except (DownloadError, OSError) as err:
        raise WeightsError(f"could not fetch {bare!r} from the hub ({err}): {advice}") from None
    expected_file.write_text(expected + "\n")
    return read_state_dict(cached), f"hub:{repo}", expected


def _online(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    from urllib.parse import urlsplit

    parts = urlsplit(_hub_endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# loading


def _head_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's classifier module(s): timm's ``pretrained_cfg["classifier"]``, the
    module ``get_classifier()`` returns, else the last module holding parameters."""
    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(declared, str):
        names.append(declared)
    elif isinstance(declared, (tuple, list)):
        names.extend(declared)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                names.append(name)
                break
    if not names:
        with_params = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        if with_params:
            names.append(with_params[-1])
    return sorted(set(names))


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def apply_weights(
    model: nn.Module,
    arch: str,
    weights: str | os.PathLike | None,
    *,
    weights_dir: str | os.PathLike | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load ``weights`` into ``model`` (architecture ``arch``) and report what was loaded.

    ``None`` keeps the initialisation; ``"imagenet"`` = the known file under the weights root, else
    timm's hub when online; else a path. The old classifier is dropped when its shape differs from
    the model's (or the model has none); with ``strict`` any other missing, unexpected or
    shape-mismatched key raises ``WeightsError`` listing them and the model is left untouched.
    With ``strict=False`` the matching tensors are loaded and the rest reported.
    """
    if weights is None:
        return LoadReport(arch=arch, source=None, preprocessing=preprocessing_for(arch, None, weights_dir=weights_dir))
    sha = None
    if str(weights) == "imagenet":
        local = find_known_weights(arch, weights_dir)
        if local is not None:
            state, source, sha = read_state_dict(local), str(local), _sha256(local)
        else:
            state, source, sha = _hub_state(arch, weights_dir)
    else:
        path = Path(weights).expanduser()
        state, source, sha = read_state_dict(path), str(path), _sha256(path)

    own = model.state_dict()
    heads = _head_names(model)
    report = LoadReport(arch=arch, source=source, sha256=sha,
                        preprocessing=preprocessing_for(arch, weights, weights_dir=weights_dir))
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = own.get(key)
        if _under(key, heads) and (target is None or target.shape != tensor.shape):
            report.dropped_head.append(key)
        elif target is None:
            report.unexpected.append(key)
        elif target.shape != tensor.shape:
            report.mismatched.append(f"{key}: model {tuple(target.shape)} vs file {tuple(tensor.shape)}")
        else:
            to_load[key] = tensor.to(target.dtype) if tensor.is_floating_point() else tensor
    # the model's own classifier stays at its fresh initialisation when the file's was dropped or absent
    report.missing = [k for k in own if k not in state and not _under(k, heads)]
    report.loaded = sorted(to_load)
    if strict and not report.ok:
        raise WeightsError(f"{source}: the weights do not match {arch} ({_problems(report)}); nothing was loaded "
                           "(strict=False loads the matching tensors only)")
    if not to_load:
        raise WeightsError(f"{source}: no tensor in the file matches {arch} by name and shape ({_problems(report)})")
    model.load_state_dict(to_load, strict=False)
    return report


def _problems(report: LoadReport) -> str:
    parts = []
    for name, label in (("missing", "missing from the file"), ("unexpected", "not in the model"),
                        ("mismatched", "shape mismatch")):
        keys = getattr(report, name)
        if keys:
            parts.append(f"{label}: {_few(keys)}")
    return "; ".join(parts) or "nothing to load"


def create_backbone(
    arch: str,
    num_classes: int = 0,
    weights: str | os.PathLike | None = "imagenet",
    *,
    weights_dir: str | os.PathLike | None = None,
    strict: bool = True,
    **options: Any,
) -> tuple[nn.Module, LoadReport]:
    """Build backbone ``arch`` (timm or torchvision, by name) with ``num_classes`` outputs (0: pooled
    features) and the options the weights to be loaded need (``weights_options``), then ``apply_weights``."""
    name = backbone_name(arch)
    options = {**weights_options(arch, weights, weights_dir), **options}
    model = create(name, num_classes=num_classes, **options)
    report = apply_weights(model, _bare(arch), weights, weights_dir=weights_dir, strict=strict)
    return model, report


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

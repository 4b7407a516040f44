"""Where pretrained weights live and how they are read: the weights root, the known files by name
(``KNOWN_WEIGHTS``), state dicts in the formats users have, and timm's hub (cached; offline, an error
in seconds). ``imclass.models.weights`` applies them to a model."""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from imclass.data.download import DownloadError, cache_dir, cached_digest, download_file
from imclass.data.preprocessing import Preprocessing

# Deferred imports (inside functions), for start-up time: safetensors.torch, timm, torchvision
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["DEFAULT_ROOT", "ENV_VAR", "HUB_CACHE", "HUB_ENDPOINT", "KNOWN_WEIGHTS", "KnownWeights", "TORCH_SUFFIXES",
           "WeightsError", "backbone_name", "bare_arch", "find_known_weights", "hub_file", "hub_state",
           "imagenet_classes", "is_known_file", "online", "read_state_dict", "resolve_weights_root", "sha256_of",
           "weights_options"]

ENV_VAR = "IMCLASS_WEIGHTS"
DEFAULT_ROOT = "~/.cache/imclass/weights"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
HUB_ENDPOINT = "https://huggingface.co"  # $HF_ENDPOINT overrides it (a mirror, or a local server in tests)
HUB_CACHE = "hub"  # under imclass.data.download.cache_dir()
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


class WeightsError(ValueError):
    """Weights that cannot be found, read or matched to the model (the message says which and why)."""


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


def resolve_weights_root(weights_dir: str | os.PathLike | None = None) -> Path:
    """The weights root: ``weights_dir`` when given, else ``$IMCLASS_WEIGHTS``, else ``~/.cache/imclass/weights``."""
    if weights_dir is None or str(weights_dir) == "":
        weights_dir = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(weights_dir).expanduser()


def bare_arch(arch: str) -> str:
    """The architecture name without its family prefix (``timm:``)."""
    return arch.split(":", 1)[1] if ":" in arch else arch


def find_known_weights(arch: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The known ImageNet file for ``arch`` under the weights root, or None when absent or unknown."""
    known = KNOWN_WEIGHTS.get(bare_arch(arch))
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
    close = difflib.get_close_matches(arch, timm.list_models() + list(KNOWN_WEIGHTS), n=5)
    raise ValueError(f"unknown backbone {arch!r}: not a timm or torchvision model." + (f" Did you mean {close}?" if close else ""))


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
                inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
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


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_known_file(arch: str, path: Path, weights_dir: str | os.PathLike | None) -> bool:
    """True when ``path`` is the known file of ``arch`` under the weights root (or a byte-identical copy)."""
    local = find_known_weights(arch, weights_dir)
    if local is None or not path.is_file():
        return False
    if local.resolve() == path.resolve():
        return True
    return local.stat().st_size == path.stat().st_size and sha256_of(local) == sha256_of(path)


def weights_options(arch: str, weights: str | os.PathLike | None,
                    weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The model options the weights that will be loaded need: the known file's (e.g. ``pad_type="same"``
    for the TF-converted MobileNetV2) when ``weights`` resolves to it, else none (the hub's timm weights
    and other files were trained with timm's defaults; pass options explicitly for anything else)."""
    bare = bare_arch(arch)
    known = KNOWN_WEIGHTS.get(bare)
    if known is None or weights is None:
        return {}
    if str(weights) == "imagenet":
        return dict(known.options) if find_known_weights(bare, weights_dir) is not None else {}
    return dict(known.options) if is_known_file(bare, Path(weights).expanduser(), weights_dir) else {}


def hub_endpoint() -> str:
    """The hub's base URL: ``$HF_ENDPOINT``, else ``HUB_ENDPOINT``."""
    return (os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")


def hub_file(arch: str) -> tuple[str, str, str]:
    """``(repo_id, filename, url)`` of the ImageNet weights timm publishes for ``arch`` on the hub."""
    import timm

    bare = bare_arch(arch)
    cfg = timm.get_pretrained_cfg(bare) if timm.is_model(bare) else None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise WeightsError(f"timm publishes no hub weights for {bare!r}")
    filename = cfg.get("hf_hub_filename") or "model.safetensors"
    return repo, filename, f"{hub_endpoint()}/{repo}/resolve/main/{filename}"


def announced_sha256(url: str, timeout: float) -> str | None:
    """The SHA-256 the hub announces for an LFS file (``X-Linked-Etag``/``ETag`` of a HEAD request on the
    resolve URL, read before following the redirect to the file store), or None."""
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


def hub_state(arch: str, weights_dir: str | os.PathLike | None) -> tuple[dict[str, torch.Tensor], str, str]:
    """ImageNet weights for ``arch`` from timm's hub repository: the cached copy when there is one, else
    downloaded (SHA-256 checked) into the cache; a WeightsError in seconds when offline and not cached."""
    import timm

    bare = bare_arch(arch)
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
        if cached_digest(cached, "sha256", lambda: sha256_of(cached)) == expected:
            return read_state_dict(cached), f"hub:{repo}", expected
        cached.unlink(missing_ok=True)  # damaged since it was downloaded: fetch it again
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not online():
        raise WeightsError(f"no ImageNet weights for {bare!r} under {root}, none cached under {cached.parent}, and "
                           f"the hub ({hub_endpoint()}) cannot be reached (offline): {advice}")
    try:
        expected = announced_sha256(url, timeout=30.0)
        if expected is None:
            raise WeightsError(f"the hub gave no SHA-256 for {url}, so the download could not be checked")
        download_file(url, cached, sha256=expected)
    except (DownloadError, OSError) as err:
        raise WeightsError(f"could not fetch {bare!r} from the hub ({err}): {advice}") from None
    expected_file.write_text(expected + "\n")
    return read_state_dict(cached), f"hub:{repo}", expected


def online(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    parts = urlsplit(hub_endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False

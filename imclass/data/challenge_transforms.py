"""The course's recognition challenges as deterministic, seeded image transforms of growing severity.

    x = apply_challenge(images, "occlusion", severity=3, seed=0)     # uint8 (N, C, H, W) in and out

Five challenges, each a family of ``torchvision.transforms.v2`` functional operations whose
strength grows linearly with ``severity`` (0 = the image untouched, 5 = the strongest level):

- ``illumination``: brightness (darker or brighter), contrast (lower), gamma (darker or brighter);
- ``viewpoint``: rotation, scale (zoom in or out), perspective (a random corner warp);
- ``deformation``: an elastic displacement field (``v2.functional.elastic``);
- ``occlusion``: a grey square covering a growing fraction of the image;
- ``clutter``: the image blended with another image's texture (its tiles shuffled) or with
  structured (low-frequency coloured) noise, at a growing blend weight.

A batch is split into ``groups`` random groups (seeded); each group gets one variant of the family
with its own random parameters, so one batched call per group (no per-image Python loop). The
random draws do not depend on the severity: the same image gets the same variant, the same
occluder position and the same displacement field at every severity, only stronger.

The same transforms train a model to resist them: :class:`ChallengeAugment` is an augment callable
for ``Classifier.fit``. Images may be uint8 (returned as uint8) or float on [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torchvision.transforms.v2 import functional as TF

from imclass.data.augment import make_augment
from imclass.data.loader import derive_seed

__all__ = [
    "CHALLENGES",
    "MAX_SEVERITY",
    "ChallengeAugment",
    "apply_challenge",
    "brightness",
    "clutter",
    "contrast",
    "describe",
    "elastic",
    "gamma",
    "occlusion",
    "parse_challenges",
    "perspective",
    "rotation",
    "scale",
]

CHALLENGES = ("illumination", "viewpoint", "deformation", "occlusion", "clutter")
MAX_SEVERITY = 5
GREY = 0.5  # fill of uncovered borders and of the occluder, on the [0, 1] scale

# strength per unit of severity
BRIGHTNESS_DOWN, BRIGHTNESS_UP = 0.15, 0.3  # factor 1 - 0.15 s (0.25 at 5), 1 + 0.3 s (2.5 at 5)
CONTRAST_DOWN = 0.17  # factor 1 - 0.17 s (0.15 at 5)
GAMMA_STEP = 0.4  # gamma 1 + 0.4 s (3.0 at 5), or its inverse
ROTATION_DEG = 8.0  # degrees, 40 at 5
ZOOM_OUT, ZOOM_IN = 0.15, 0.12  # scale 1 / (1 + 0.15 s) (0.57 at 5), 1 + 0.12 s (1.6 at 5)
PERSPECTIVE_STEP = 0.08  # corner displacement as a fraction of the half size, 0.4 at 5
ELASTIC_PIXELS = 0.7  # mean displacement ~ 0.7 s pixels per 32 pixels of image size
ELASTIC_SIGMA = 0.1  # smoothness of the field: sigma = 0.1 * image size
OCCLUSION_AREA = 0.07  # occluded fraction of the image 0.07 s (35 % at 5)
CLUTTER_WEIGHT = 0.1  # blend weight of the clutter 0.1 s (0.5 at 5)


def _check(x: torch.Tensor, severity: float) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, C, H, W), received shape {tuple(x.shape)}")
    if not 0 <= severity <= MAX_SEVERITY or not math.isfinite(severity):
        raise ValueError(f"expected 0 <= severity <= {MAX_SEVERITY}, received severity={severity}")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Back to the input's dtype (uint8: rounded and clamped)."""
    if x.dtype == torch.uint8:
        return (out.clamp(0, 1) * 255).round().to(torch.uint8)
    return out.clamp(0, 1).to(x.dtype)


def _fill(x: torch.Tensor) -> list[float]:
    return [float(round(GREY * 255)) if x.dtype == torch.uint8 else GREY] * x.shape[1]


# ---------------------------------------------------------------------------- illumination
def brightness(x: torch.Tensor, severity: float, *, brighter: bool = False) -> torch.Tensor:
    """Scale every pixel by ``1 - 0.15 s`` (darker) or ``1 + 0.3 s`` (brighter)."""
    _check(x, severity)
    factor = 1 + BRIGHTNESS_UP * severity if brighter else 1 - BRIGHTNESS_DOWN * severity
    return TF.adjust_brightness(x, factor)


def contrast(x: torch.Tensor, severity: float) -> torch.Tensor:
    """Blend each image toward its mean grey: contrast factor ``1 - 0.17 s``."""
    _check(x, severity)
    return TF.adjust_contrast(x, 1 - CONTRAST_DOWN * severity)


def gamma(x: torch.Tensor, severity: float, *, brighter: bool = False) -> torch.Tensor:
    """Gamma curve ``p ** g`` with ``g = 1 + 0.4 s`` (darker mid-tones) or ``1 / g`` (brighter)."""
    _check(x, severity)
    g = 1 + GAMMA_STEP * severity
    return TF.adjust_gamma(x, 1 / g if brighter else g)


# ---------------------------------------------------------------------------- viewpoint
def rotation(x: torch.Tensor, severity: float, *, sign: int = 1) -> torch.Tensor:
    """Rotate by ``sign * 8 s`` degrees counter-clockwise about the centre (bilinear; uncovered corners grey)."""
    _check(x, severity)
    return TF.rotate(x, sign * ROTATION_DEG * severity, interpolation=TF.InterpolationMode.BILINEAR, fill=_fill(x))


def scale(x: torch.Tensor, severity: float, *, zoom_in: bool = False) -> torch.Tensor:
    """Zoom out to ``1 / (1 + 0.15 s)`` of the size (grey border) or in by ``1 + 0.12 s`` (crops the object)."""
    _check(x, severity)
    factor = 1 + ZOOM_IN * severity if zoom_in else 1 / (1 + ZOOM_OUT * severity)
    return TF.affine(x, angle=0.0, translate=[0.0, 0.0], scale=factor, shear=[0.0, 0.0],
                     interpolation=TF.InterpolationMode.BILINEAR, fill=_fill(x))


def perspective(x: torch.Tensor, severity: float, corners: torch.Tensor) -> torch.Tensor:
    """Move each image corner inward by ``corners * 0.08 s`` of the half size (``corners``: (4, 2) in [0, 1])."""
    _check(x, severity)
    h, w = x.shape[-2:]
    half = torch.tensor([(w - 1) / 2, (h - 1) / 2])
    start = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=torch.float64)
    inward = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float64)
    end = start + inward * corners.double() * half * PERSPECTIVE_STEP * severity
    return TF.perspective(x, start.tolist(), end.tolist(), interpolation=TF.InterpolationMode.BILINEAR, fill=_fill(x))


# ---------------------------------------------------------------------------- deformation
def elastic_field(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A smooth random displacement field (1, H, W, 2) of unit mean magnitude in pixels (as
    ``v2.ElasticTransform`` draws it: uniform noise blurred by a Gaussian, then normalised)."""
    h, w = size
    noise = torch.rand((2, 1, h, w), generator=generator, device=generator.device).cpu() * 2 - 1
    sigma = max(ELASTIC_SIGMA * min(h, w), 0.5)
    k = int(8 * sigma + 1) | 1
    k = min(k, (min(h, w) // 2) * 2 - 1) if min(h, w) > 2 else 1
    smooth = TF.gaussian_blur(noise, [k, k], [sigma, sigma]) if k > 1 else noise  # (2, 1, H, W)
    smooth = smooth / smooth.abs().mean().clamp_min(1e-12)
    return smooth[:, 0].permute(1, 2, 0)[None]  # (2, H, W) -> (1, H, W, 2)


def elastic(x: torch.Tensor, severity: float, field: torch.Tensor) -> torch.Tensor:
    """Warp by ``field`` (from :func:`elastic_field`) scaled to ``0.7 s`` pixels per 32 pixels of size."""
    _check(x, severity)
    h, w = x.shape[-2:]
    pixels = ELASTIC_PIXELS * severity * min(h, w) / 32
    # v2.functional.elastic takes the displacement in normalised [-1, 1] coordinates: 2 / size per pixel
    scale_xy = torch.tensor([2.0 / w, 2.0 / h]) * pixels
    disp = (field.to(torch.float32) * scale_xy).to(x.device)
    out = TF.elastic(_to_float(x), disp, interpolation=TF.InterpolationMode.BILINEAR, fill=[GREY] * x.shape[1])
    return _like(out, x)


# ---------------------------------------------------------------------------- occlusion
def occluder_side(size: tuple[int, int], severity: float) -> int:
    """Side in pixels of the square covering ``0.07 s`` of an image of ``size`` (H, W)."""
    h, w = size
    return min(round(math.sqrt(OCCLUSION_AREA * severity * h * w)), h, w)


def occlusion(x: torch.Tensor, severity: float, position: torch.Tensor) -> torch.Tensor:
    """A grey square of :func:`occluder_side` pixels, fully inside each image; ``position`` (N, 2) in
    [0, 1] places its top-left corner along the free range (rows, columns)."""
    _check(x, severity)
    n, _, h, w = x.shape
    side = occluder_side((h, w), severity)
    if side == 0:
        return x
    top = (position[:, 0].cpu() * (h - side)).round().long().to(x.device)
    left = (position[:, 1].cpu() * (w - side)).round().long().to(x.device)
    r = torch.arange(h, device=x.device)[None, :] - top[:, None]  # (N, H)
    c = torch.arange(w, device=x.device)[None, :] - left[:, None]  # (N, W)
    inside = ((r >= 0) & (r < side))[:, :, None] & ((c >= 0) & (c < side))[:, None, :]  # (N, H, W)
    return x.masked_fill(inside[:, None], _fill(x)[0])


# ---------------------------------------------------------------------------- clutter
def texture_of(images: torch.Tensor, generator: torch.Generator, tiles: int = 4) -> torch.Tensor:
    """Each image cut into ``tiles`` x ``tiles`` blocks shuffled in place: its colours and texture
    without its shape (one random order for the batch)."""
    n, c, h, w = images.shape
    th, tw = h // tiles, w // tiles
    if th == 0 or tw == 0:
        return images
    core = images[:, :, : th * tiles, : tw * tiles]
    blocks = core.reshape(n, c, tiles, th, tiles, tw).permute(0, 1, 2, 4, 3, 5).reshape(n, c, tiles * tiles, th, tw)
    order = torch.randperm(tiles * tiles, generator=generator, device=generator.device).to(images.device)
    blocks = blocks[:, :, order].reshape(n, c, tiles, tiles, th, tw).permute(0, 1, 2, 4, 3, 5)
    out = images.clone()
    out[:, :, : th * tiles, : tw * tiles] = blocks.reshape(n, c, th * tiles, tw * tiles)
    return out


def structured_noise(shape: tuple[int, int, int, int], generator: torch.Generator) -> torch.Tensor:
    """Low-frequency coloured noise on [0, 1] (N, C, H, W): uniform noise at 1/4 and 1/8 of the size,
    upsampled bilinearly and summed (blobs and stripes rather than pixel noise)."""
    n, c, h, w = shape
    out = torch.zeros(shape)
    for div, weight in ((4, 0.6), (8, 0.4)):
        coarse = torch.rand((n, c, max(h // div, 2), max(w // div, 2)), generator=generator, device=generator.device)
        out += weight * torch.nn.functional.interpolate(coarse.cpu(), size=(h, w), mode="bilinear", align_corners=False)
    return out


def clutter(x: torch.Tensor, severity: float, background: torch.Tensor) -> torch.Tensor:
    """Blend ``background`` (same shape, [0, 1] float or uint8) into ``x`` with weight ``0.1 s``."""
    _check(x, severity)
    weight = CLUTTER_WEIGHT * severity
    out = (1 - weight) * _to_float(x) + weight * _to_float(background.to(x.device))
    return _like(out, x)


# ---------------------------------------------------------------------------- families
VARIANTS: dict[str, tuple[str, ...]] = {
    "illumination": ("darker", "brighter", "low contrast", "gamma darker", "gamma brighter"),
    "viewpoint": ("rotate left", "rotate right", "zoom out", "zoom in", "perspective"),
    "deformation": ("elastic",),
    "occlusion": ("grey square",),
    "clutter": ("texture", "noise"),
}


def describe(name: str, severity: float) -> str:
    """The parameters of ``name`` at ``severity`` in words (for reports)."""
    s = severity
    if s == 0:
        return "clean"
    if name == "illumination":
        return (f"brightness x{1 - BRIGHTNESS_DOWN * s:.2f} or x{1 + BRIGHTNESS_UP * s:.2f}, "
                f"contrast x{1 - CONTRAST_DOWN * s:.2f}, gamma {1 + GAMMA_STEP * s:.1f} or 1/{1 + GAMMA_STEP * s:.1f}")
    if name == "viewpoint":
        return (f"rotation +-{ROTATION_DEG * s:.0f} deg, scale x{1 / (1 + ZOOM_OUT * s):.2f} or x{1 + ZOOM_IN * s:.2f}, "
                f"perspective {PERSPECTIVE_STEP * s:.2f}")
    if name == "deformation":
        return f"elastic, mean displacement {ELASTIC_PIXELS * s:.1f} px per 32 px"
    if name == "occlusion":
        return f"grey square over {OCCLUSION_AREA * s:.0%} of the image"
    if name == "clutter":
        return f"blend {CLUTTER_WEIGHT * s:.0%} of another image's texture or of structured noise"
    raise ValueError(_unknown(name))


def _unknown(name: str) -> str:
    return f"expected a challenge in {list(CHALLENGES)}, received {name!r}"


def parse_challenges(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"challenge"`` or ``"all"`` -> every challenge; ``"illumination,occlusion"`` -> those two (checked)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in (["challenge"], ["all"]):
        return CHALLENGES
    if not names:
        raise ValueError(f"expected challenge names from {list(CHALLENGES)}, received {spec!r}")
    for n in names:
        if n not in CHALLENGES:
            raise ValueError(_unknown(n))
    return tuple(dict.fromkeys(names))


def _apply_group(x: torch.Tensor, name: str, variant: int, severity: float, g: torch.Generator,
                 pool: torch.Tensor | None) -> torch.Tensor:
    """One variant of the family ``name`` on the group ``x``, its random parameters drawn from ``g``."""
    dev = g.device
    if name == "illumination":
        ops = (lambda: brightness(x, severity), lambda: brightness(x, severity, brighter=True),
               lambda: contrast(x, severity), lambda: gamma(x, severity), lambda: gamma(x, severity, brighter=True))
        return ops[variant]()
    if name == "viewpoint":
        corners = torch.rand((4, 2), generator=g, device=dev).cpu()  # drawn for every variant: same stream
        ops = (lambda: rotation(x, severity, sign=1), lambda: rotation(x, severity, sign=-1),
               lambda: scale(x, severity), lambda: scale(x, severity, zoom_in=True),
               lambda: perspective(x, severity, corners))
        return ops[variant]()
    if name == "deformation":
        return elastic(x, severity, elastic_field(tuple(x.shape[-2:]), g))
    if name == "occlusion":
        return occlusion(x, severity, torch.rand((len(x), 2), generator=g, device=dev))
    if name == "clutter":
        if variant == 1:
            return clutter(x, severity, structured_noise(tuple(x.shape), g).to(x.device))
        source = pool if pool is not None else x
        pick = torch.randint(0, len(source), (len(x),), generator=g, device=dev).to(source.device)
        return clutter(x, severity, texture_of(source[pick], g))
    raise ValueError(_unknown(name))


def apply_challenge(
    images: torch.Tensor,
    name: str,
    severity: float,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    groups: int = 16,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """``images`` (N, C, H, W; uint8 or float on [0, 1]) under challenge ``name`` at ``severity`` (0..5).

    Deterministic: the random draws come from ``generator`` or, by default, from a generator seeded
    with ``(seed, challenge)``, so one seed gives the same images at every call. Severity 0 returns
    ``images`` itself. ``pool`` (clutter only) holds the images whose textures are blended in
    (default: the batch itself).
    """
    if name not in CHALLENGES:
        raise ValueError(_unknown(name))
    _check(images, severity)
    if severity == 0 or len(images) == 0:
        return images
    if groups < 1:
        raise ValueError(f"expected groups >= 1, received groups={groups}")
    if generator is None:
        generator = torch.Generator().manual_seed(derive_seed(seed, CHALLENGES.index(name), 11))
    n = len(images)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    chunks = perm.tensor_split(min(groups, n))
    variants = torch.randint(0, len(VARIANTS[name]), (len(chunks),), generator=generator, device=generator.device)
    out = images.clone()
    for idx, variant in zip(chunks, variants.tolist()):
        out[idx] = _apply_group(images[idx], name, variant, severity, generator, pool)
    return out


# ---------------------------------------------------------------------------- training
@dataclass
class ChallengeAugment:
    """Robustness training: the challenge transforms as an augment callable for ``Classifier.fit``.

    Each batch is split into ``groups`` groups; each group, with probability ``p``, gets one of
    ``challenges`` at a severity drawn uniformly from ``(0, max_severity]`` (else stays clean).
    The engine hands augmentations normalised float batches, so the transforms run on pixels
    recovered with ``mean`` / ``std``: give them, or pass the same object in ``callbacks=`` too
    (as the fast recipe's ``FlipTranslate``) and ``on_train_begin`` reads the classifier's.
    ``base`` (an augment name such as ``"crop_flip"``, or a callable) runs first, on every image.
    """

    challenges: tuple[str, ...] = CHALLENGES
    max_severity: float = 3.0
    p: float = 0.5
    groups: int = 8
    mean: list[float] | None = None
    std: list[float] | None = None
    base: Any = None
    order: int = field(default=-30, repr=False)

    def __post_init__(self) -> None:
        self.challenges = parse_challenges(self.challenges)
        if not 0 < self.max_severity <= MAX_SEVERITY:
            raise ValueError(f"expected 0 < max_severity <= {MAX_SEVERITY}, received {self.max_severity}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"expected 0 <= p <= 1, received p={self.p}")
        if self.groups < 1:
            raise ValueError(f"expected groups >= 1, received groups={self.groups}")
        self._base = make_augment(self.base)

    def on_train_begin(self, state) -> None:
        """Take the classifier's normalisation (``Classifier.fit`` knows it by now)."""
        self.mean, self.std = list(state.classifier.mean), list(state.classifier.std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, epoch: int = 0) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError(
                "ChallengeAugment needs the input normalisation: create it with mean= and std=, or pass the same "
                "object in fit(callbacks=[...]) as well as augment="
            )
        if self._base is not None:
            x = self._base(x, generator, epoch)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        pixels = (x * std + mean).clamp(0, 1)  # normalised -> [0, 1]
        n = len(x)
        perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
        draws = torch.rand((self.groups, 3), generator=generator, device=generator.device).cpu()
        out = pixels.clone()
        for idx, (use, which, level) in zip(perm.tensor_split(min(self.groups, n)), draws.tolist()):
            if use >= self.p:
                continue
            name = self.challenges[min(int(which * len(self.challenges)), len(self.challenges) - 1)]
            severity = max(level, 1e-3) * self.max_severity
            out[idx] = apply_challenge(pixels[idx], name, severity, generator=generator, groups=1)
        return ((out - mean) / std).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format

"""``Preprocessing``: how images must be prepared for a set of pretrained weights, as plain data (it
travels with the weights and into model files)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

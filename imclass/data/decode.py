"""The one image-decoding gate: every path that turns bytes or a file into pixels goes through here
(folders, ``imclass predict``, ``imclass serve``, transfer features, ``data check``, label review).

    array = decode_array("photo.jpg", mode="RGB", size=(224, 224))     # uint8 (H, W, 3), numpy
    x = decode_image(upload_bytes, channels=3, resize=256, crop=224)   # uint8 (C, H, W), torch
    info = probe_image("photo.jpg")                                    # format, mode, height, width; no pixels

What it guarantees, the same way on every path:

* **formats**: only ``ALLOWED_FORMATS`` (JPEG, PNG, BMP, GIF, WebP, TIFF) are ever opened; Pillow's other
  ~40 readers (PostScript/EPS runs Ghostscript, PSD, ICO, ...) are never tried, whatever the file's name:
  such a file is "not a readable image in an accepted format" (``ImageError`` status 415);
* **size**: the pixel count comes from the header and is checked against ``max_pixels`` before any
  pixel is decoded (413); decodes running at the same time share one memory budget (``PixelBudget``,
  ``SHARED_BUDGET``): a decode waits until the raster it needs fits, so concurrent uploads of huge
  images queue instead of multiplying the peak memory;
* **reduced decoding**: when the output is small (``size`` or ``resize`` given), JPEGs are decoded at
  1/2..1/8 scale (Pillow's ``draft``) and large rasters are box-reduced before resampling;
* **pixel values**: 16-bit images (``I;16``, ``I``) are scaled by 1/257 to 8 bits, float images
  (``F``) are read as [0, 1] (clipped; NaN -> 0) and scaled to 0..255; nothing is clipped to white;
* **orientation**: the EXIF orientation tag is applied (photos from phones stand upright), and
  ``probe_image`` reports the size after it;
* **files**: only regular files are opened (a FIFO named ``x.jpg`` is refused without blocking);
* **errors**: one ``ImageError`` (a ValueError with an HTTP ``status``: 413, 415 or 422) naming the image
  by the label the caller gave, never with the decoder's own message (which can hold temporary paths
  or command lines).
"""
from __future__ import annotations

import io
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# Deferred imports (inside functions), for start-up time: PIL, ctypes
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = [
    "ALLOWED_FORMATS", "DEFAULT_BUDGET_BYTES", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageError", "ImageInfo",
    "PixelBudget", "SHARED_BUDGET", "decode_array", "decode_image", "is_image_name", "probe_image", "stack_images",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow format names; nothing else is opened
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMAT_NAMES = "JPEG, PNG, BMP, GIF, WebP or TIFF"
DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,700 x 5,200 photo; anything bigger is refused before decoding
DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024  # decoded rasters alive at once, across all threads
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_BYTES_PER_PIXEL = 8  # Pillow's raster (up to 4 B/px) + the converted copy (4 B/px RGBX)
_TRIM_ABOVE = 64 * 1024 * 1024  # after a decode this large, hand freed memory back to the OS
_INTERPOLATION = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


class ImageError(ValueError):
    """An image that cannot be used; ``status`` is the HTTP status that fits (413, 415 or 422)."""

    def __init__(self, message: str, status: int = 422, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or message  # the message without the image's name


def _error(label: str, reason: str, status: int) -> ImageError:
    return ImageError(f"{label}: {reason}", status, reason)


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: Pillow ``format`` and ``mode``, and the size after EXIF orientation."""

    format: str
    mode: str
    height: int
    width: int

    @property
    def grey(self) -> bool:
        """Whether the image has one channel (decoded as grey unless colour is asked for)."""
        return self.mode in GREY_MODES


class PixelBudget:
    """A byte budget shared by concurrent decodes: ``with budget.hold(n):`` waits until ``n`` more bytes
    fit under ``capacity``. One request larger than the whole budget still runs, alone."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"expected a positive capacity in bytes, received {capacity!r}")
        self.capacity = int(capacity)
        self.in_use = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes fit (or nothing else is held), then hold them."""
        with self._cond:
            while self.in_use and self.in_use + n > self.capacity:
                self._cond.wait()
            self.in_use += n

    def release(self, n: int) -> None:
        """Give back ``n`` bytes held by :meth:`acquire`."""
        with self._cond:
            self.in_use -= n
            self._cond.notify_all()

    def hold(self, n: int) -> "_Held":
        """A context manager holding ``n`` bytes of the budget."""
        return _Held(self, n)


class _Held:
    def __init__(self, budget: PixelBudget, n: int) -> None:
        self.budget, self.n = budget, n

    def __enter__(self) -> None:
        self.budget.acquire(self.n)

    def __exit__(self, *exc: Any) -> None:
        self.budget.release(self.n)


SHARED_BUDGET = PixelBudget(DEFAULT_BUDGET_BYTES)  # the process-wide budget every decode uses by default


def is_image_name(name: str) -> bool:
    """Whether a file name has one of ``IMAGE_EXTENSIONS`` (any case) and is not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


# ------------------------------------------------------------------------------------------ opening

def _label(source: Any, name: str | None) -> str:
    if name is not None:
        return name
    return "upload" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _read_source(source: Any, label: str) -> bytes:
    """The bytes of an upload or of a regular file (opened non-blocking: a FIFO is refused, not waited on)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
    else:
        try:
            fd = os.open(os.fspath(source), os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise _error(label, "no such image file", 422) from None
        except OSError as err:
            raise _error(label, f"cannot open the file ({err.strerror or type(err).__name__})", 422) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                kind = "a folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "not a regular file (FIFO, socket or device)"
                raise _error(label, f"{kind}, expected an image file", 415)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(fd)
    if not data:
        raise _error(label, f"empty file, expected an image ({FORMAT_NAMES})", 415)
    return data


def _open(data: bytes, label: str) -> Any:
    """Pillow image of ``data``, header only, through the allowed formats' readers alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _error(label, f"not a readable image in an accepted format (expected {FORMAT_NAMES} data)", 415) from None
    except Image.DecompressionBombError:  # Pillow's own limit (2 x MAX_IMAGE_PIXELS), above ours
        raise _error(label, "refused, the image header claims too many pixels", 413) from None
    except Exception as err:  # the decoder's message is not echoed: it may name temporary files
        raise _error(label, f"not a readable image: corrupt header ({type(err).__name__})", 422) from None


def _orientation(im: Any, loaded: bool = False) -> int:
    """The EXIF orientation (1..8) from the header; a PNG whose eXIf chunk comes after the pixels is
    read as 1 here (Pillow would decode the whole image to find it) and turned after decoding."""
    if im.format == "PNG" and "exif" not in im.info and not loaded:
        return 1
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is ignored, as every viewer does
        return 1
    return value if 1 <= value <= 8 else 1


def _check_pixels(im: Any, label: str, max_pixels: int) -> None:
    width, height = im.size
    if width < 1 or height < 1:
        raise _error(label, f"not a readable image: empty ({width} x {height} pixels)", 422)
    if width * height > max_pixels:
        raise _error(
            label, f"image of {width} x {height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}", 413)


def probe_image(source: bytes | str | os.PathLike, *, name: str | None = None,
                max_pixels: int | None = None) -> ImageInfo:
    """Format, mode and (EXIF-oriented) size from the header of an image, without decoding pixels.

    Raises ``ImageError`` like :func:`decode_array` (415 not an accepted image, 413 more than
    ``max_pixels`` when given, 422 corrupt header, missing file or not a regular file).
    """
    label = _label(source, name)
    with _open(_read_source(source, label), label) as im:
        if max_pixels is not None:
            _check_pixels(im, label, max_pixels)
        width, height = im.size
        if _orientation(im) >= 5:  # 5..8 turn the image by 90 degrees
            width, height = height, width
        return ImageInfo(format=im.format or "?", mode=im.mode, height=height, width=width)


# ------------------------------------------------------------------------------------------ pixels

def _to_8bit(im: Any) -> Any:
    """16-bit and 32-bit integer images scaled by 1/257, float images read as [0, 1]: one 8-bit grey image."""
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        a = np.clip(a, 0.0, 1.0) * 255.0
    else:  # I;16*, I: 16-bit data (Pillow reads 16-bit PNG/TIFF as I;16, older files as I)
        a = np.clip(a.astype(np.float32), 0, 65535) / 257.0
    return Image.fromarray(np.rint(a).astype(np.uint8), "L")


def _target_wh(size: tuple[int, int] | None, resize: int | None, w: int, h: int) -> tuple[int, int] | None:
    """The smallest (width, height) the decoded image must keep before the final resize/crop."""
    if size is not None:
        return size[1], size[0]
    if resize is not None:
        scale = resize / min(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))
    return None


def _as_hw(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    values = [int(v) for v in value]
    if len(values) == 1:
        return values[0], values[0]
    return values[-2], values[-1]


def _as_side(value: Any) -> int | tuple[int, int] | None:
    """``resize``: one int (the shorter side), or an exact (h, w)."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer)):
        return int(value)
    values = [int(v) for v in value]
    return values[0] if len(values) == 1 else (values[-2], values[-1])


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it per thread arena otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def decode_array(
    source: bytes | str | os.PathLike,
    *,
    mode: str | None = None,
    size: tuple[int, int] | None = None,
    resize: int | None = None,
    crop: int | tuple[int, int] | None = None,
    interpolation: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """One image (bytes or a file) as uint8 (H, W) grey or (H, W, 3) RGB, through every check of this module.

    ``mode`` "L" / "RGB" forces grey / colour (default: grey images stay grey, everything else RGB).
    ``size`` (h, w) resizes to exactly that. With ``resize`` and/or ``crop`` (a pretrained backbone's
    evaluation), ``resize`` scales the shorter side to that many pixels (each side kept >= the crop;
    an (h, w) pair resizes exactly) and ``crop`` (default: ``size``) cuts the centre (h, w) out.
    ``interpolation`` names the filter (bilinear, bicubic, nearest, lanczos, box, hamming). ``budget``
    defaults to ``SHARED_BUDGET``. Raises ``ImageError`` (415 / 413 / 422).
    """
    from PIL import Image

    if mode not in (None, "L", "RGB"):
        raise ValueError(f"expected mode 'L', 'RGB' or None, received mode={mode!r}")
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"expected interpolation one of {sorted(_INTERPOLATION)}, received {interpolation!r}")
    size = _as_hw(size)
    crop_hw = _as_hw(crop)
    resize = _as_side(resize)
    if resize is not None or crop_hw is not None:  # the backbone's way: size is only the default crop
        crop_hw = crop_hw if crop_hw is not None else size
        size = None
    if isinstance(resize, tuple):  # an exact (h, w) resize, then the crop
        size, resize = resize, None
    label = _label(source, name)
    budget = budget or SHARED_BUDGET
    data = _read_source(source, label)
    with _open(data, label) as im:
        _check_pixels(im, label, max_pixels)
        turn = _orientation(im)
        w, h = im.size if turn < 5 else im.size[::-1]  # as the image stands after orientation
        target = _target_wh(size, resize, w, h)  # None: full size (a crop alone cuts from the original)
        if target is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
            tw, th = target
            if crop_hw is not None:
                tw, th = max(tw, crop_hw[1]), max(th, crop_hw[0])
            im.draft(im.mode, (tw, th) if turn < 5 else (th, tw))  # DCT-domain downscale, to >= the target
        cost = im.size[0] * im.size[1] * _BYTES_PER_PIXEL
        try:
            with budget.hold(cost):
                out = _pixels(im, turn, mode, size, resize, crop_hw, _INTERPOLATION[interpolation])
        except Image.DecompressionBombError:
            raise _error(label, "refused, the image has too many pixels", 413) from None
        except MemoryError:
            raise _error(label, "not enough memory to decode this image", 413) from None
        except Exception as err:  # truncated data, bad chunks: the decoder's own message is not echoed
            raise _error(label, f"not a readable image: corrupt or truncated data ({type(err).__name__})",
                         422) from None
        finally:
            if cost > _TRIM_ABOVE:
                _trim()
    return out


def _pixels(im: Any, turn: int, mode: str | None, size: tuple[int, int] | None, resize: int | None,
            crop_hw: tuple[int, int] | None, resample: int) -> np.ndarray:
    from PIL import Image

    im.load()
    if turn == 1 and im.format == "PNG":
        turn = _orientation(im, loaded=True)  # an eXIf chunk after the pixels: known only now
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    want = mode or ("L" if im.mode in GREY_MODES else "RGB")
    if im.mode != want:
        im = im.convert(want)
    if turn != 1:
        im = im.transpose([None, None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180,
                           Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
                           Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90][turn])
    w, h = im.size
    if size is not None:
        if (w, h) != (size[1], size[0]):
            im = im.resize((size[1], size[0]), resample, reducing_gap=3.0)  # PIL sizes are (width, height)
    elif resize is not None:
        scale = resize / min(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if crop_hw is not None:
            nw, nh = max(crop_hw[1], nw), max(crop_hw[0], nh)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample, reducing_gap=3.0)
    if crop_hw is not None:
        w, h = im.size
        ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    return np.array(im, dtype=np.uint8)  # a writable copy (torch warns about read-only arrays)


def decode_image(
    source: bytes | str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = 3,
    resize: Any = None,
    crop: Any = None,
    interpolation: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    budget: PixelBudget | None = None,
) -> torch.Tensor:
    """One image as a uint8 tensor (C, H, W) ready for a model: :func:`decode_array` as a tensor.

    ``channels`` 3 (default) or 1 converts to RGB or grey; None keeps a grey image grey.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"expected channels 1, 3 or None, received channels={channels!r}")
    array = decode_array(source, mode={None: None, 1: "L", 3: "RGB"}[channels], size=size, resize=resize, crop=crop,
                         interpolation=interpolation, max_pixels=max_pixels, name=name, budget=budget)
    t = torch.from_numpy(array)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)


def stack_images(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Same-size decoded arrays as one uint8 (N, C, H, W) tensor: grey if all are grey, else RGB."""
    grey = all(a.ndim == 2 for a in arrays)
    h, w = arrays[0].shape[:2]
    out = torch.empty((len(arrays), 1 if grey else 3, h, w), dtype=torch.uint8)
    for i, a in enumerate(arrays):
        t = torch.from_numpy(a)
        if grey:
            out[i, 0] = t
        elif a.ndim == 2:
            out[i] = t.unsqueeze(0)  # grey image in a colour set: broadcast to 3 channels
        else:
            out[i] = t.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return out


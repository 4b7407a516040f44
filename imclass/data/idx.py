"""Reader for the IDX files of MNIST and Fashion-MNIST (big-endian header, then raw uint8 data)."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051  # 0x00000803: uint8 data, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: uint8 data, 1 dimension (count)
_KINDS = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}


class IdxFormatError(ValueError):
    """An IDX file whose header or size is not what its kind requires."""


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"cannot read {path}: {err}; expected a gzip-compressed IDX file") from err


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) whose header must start with ``magic``.

    Returns uint8 (count, rows, cols) for images (magic 2051) or (count,) for labels (2049);
    raises IdxFormatError naming the file when the magic number or the size is wrong.
    """
    if magic not in _KINDS:
        raise ValueError(f"expected magic {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels), received {magic}")
    path = Path(path)
    data = _read_bytes(path)
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise IdxFormatError(f"{path} is too short ({len(data)} bytes) for an IDX {_KINDS[magic]} header")
    found, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if found != magic:
        what = _KINDS.get(found, "not an IDX uint8 file")
        raise IdxFormatError(
            f"{path} has IDX magic number {found} ({what}), expected {magic} ({_KINDS[magic]})"
        )
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise IdxFormatError(
            f"{path} holds {len(data)} bytes, expected {expected} for {'x'.join(map(str, dims))} {_KINDS[magic]} "
            f"(truncated or corrupt file: delete it to download it again)"
        )
    # copy: a writable array (np.frombuffer over bytes is read-only, which torch warns about)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()

"""Readers for CIFAR-10 in its three common layouts, each checked against published checksums.

- the official python batches (``cifar-10-batches-py/``, pickles read by a restricted unpickler);
- the official binary batches (``cifar-10-batches-bin/*.bin``: 3,073-byte records, a label byte then
  the R, G and B planes of 1,024 bytes each); a file of the official size must have its published
  SHA-1, as MXNet Gluon's ``CIFAR10`` checks;
- a Keras-style ``cifar10.npz`` (``x_train`` (50000, 32, 32, 3) uint8, ...): arrays of the official
  shapes must have the SHA-256 of their raw C-order bytes given in the data's ``PROVENANCE.md``.

Digests are computed once per file state and remembered (``download.cached_digest``), so a damaged
copy gives a clear error naming the file instead of silently wrong figures, and later loads pay nothing.
All readers return images as uint8 (N, 3, 32, 32) tensors and int64 labels, in the original order.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from imclass.data.download import cached_digest

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"
NPZ_FILE = "cifar10.npz"
BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
BINARY_FILES = {split: [f + ".bin" for f in files] for split, files in BATCH_FILES.items()}
RECORD_BYTES = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes
OFFICIAL_RECORDS = 10_000  # images per official batch file

# Published SHA-1 of the official binary batches (MXNet Gluon's CIFAR10; PROVENANCE.md of the shared data).
BINARY_SHA1 = {
    "data_batch_1.bin": "aadd24acce27caa71bf4b10992e9e7b2d74c2540",
    "data_batch_2.bin": "c0ba65cce70568cd57b4e03e9ac8d2a5367c1795",
    "data_batch_3.bin": "1dd00a74ab1d17a6e7d73e185b69dbf31242f295",
    "data_batch_4.bin": "aab85764eb3584312d3c7f65fd2fd016e36a258e",
    "data_batch_5.bin": "26e2849e66a845b7f1e4614ae70f4889ae604628",
    "test_batch.bin": "67eb016db431130d61cd03c7ad570b013799c88c",
}
# SHA-256 of the raw C-order bytes of each array of the complete Keras-style npz: (shape, dtype, sha256).
NPZ_SHA256: dict[str, tuple[tuple[int, ...], str, str]] = {
    "x_train": ((50000, 32, 32, 3), "uint8", "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a"),
    "y_train": ((50000,), "uint8", "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253"),
    "x_test": ((10000, 32, 32, 3), "uint8", "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"),
    "y_test": ((10000,), "uint8", "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5"),
}

# What unpickling the official batches needs (a dict of bytes, lists and a numpy array), and nothing more:
# a pickle naming any other callable is refused instead of run.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class CifarFormatError(ValueError):
    """A CIFAR-10 file that does not hold what the official distribution holds."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were written by Python 2 (keys are b"data", b"labels")
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as err:  # any unpickling failure means a bad file; name it
        raise CifarFormatError(f"cannot read CIFAR-10 batch {path}: {err}") from err
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path} holds a {type(obj).__name__}, expected the dict of a CIFAR-10 batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batches(folder: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read ``data_batch_1..5`` (train) or ``test_batch`` (test) and ``batches.meta`` from ``folder``."""
    folder = Path(folder)
    if split not in BATCH_FILES:
        raise ValueError(f"expected split 'train' or 'test' for CIFAR-10, received {split!r}")
    missing = [f for f in BATCH_FILES[split] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}")
    xs, ys = [], []
    for fname in BATCH_FILES[split]:
        batch = _unpickle(folder / fname)
        if "data" not in batch or "labels" not in batch:
            raise CifarFormatError(f"{folder / fname} has keys {sorted(batch)}, expected 'data' and 'labels'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise CifarFormatError(
                f"{folder / fname}: expected data of shape (N, 3072) and N labels, "
                f"received data {data.shape} and {len(labels)} labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane: already (C, H, W)
        ys.append(labels)
    classes = CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        names = _unpickle(meta_path).get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    _check_labels(y, len(classes), folder)
    return x, y, classes


def read_npz(
    path: str | os.PathLike, split: str, *, expected: Mapping[str, tuple[tuple[int, ...], str, str]] = NPZ_SHA256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``x_<split>``/``y_<split>`` (channels last, Keras layout) from a ``cifar10.npz``.

    Arrays with the shape and dtype listed in ``expected`` (name -> (shape, dtype, sha256); by default
    the complete CIFAR-10) must have that SHA-256 of their raw bytes: checked once per file state.
    """
    path = Path(path)
    if split not in ("train", "test"):
        raise ValueError(f"expected split 'train' or 'test' for CIFAR-10, received {split!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {f"x_{split}", f"y_{split}"} - keys:
                raise CifarFormatError(f"{path} has arrays {sorted(keys)}, expected x_{split} and y_{split}")
            x, y = z[f"x_{split}"], z[f"y_{split}"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, CifarFormatError):
            raise
        raise CifarFormatError(f"cannot read {path}: {err}; expected an .npz written by numpy.savez") from err
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y  # Keras stores labels as (N, 1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != (len(x),):
        raise CifarFormatError(
            f"{path}: expected x_{split} uint8 (N, 32, 32, 3) and y_{split} (N,), "
            f"received x_{split} {x.dtype} {x.shape} and y_{split} {y.shape}"
        )
    for name, arr in ((f"x_{split}", x), (f"y_{split}", y)):
        check_array(path, name, arr, expected)
    # (N, H, W, C) -> (N, C, H, W); numpy's transposing copy of uint8 is ~4x faster than torch's here
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(y.astype(np.int64))
    _check_labels(labels, len(CLASSES), path)
    return images, labels


def _check_labels(labels: torch.Tensor, num_classes: int, where: Path) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CifarFormatError(
            f"{where}: expected labels in 0..{num_classes - 1}, received {int(labels.min())}..{int(labels.max())}"
        )


def array_sha256(arr: np.ndarray) -> str:
    """The hex SHA-256 of an array's raw C-order bytes (independent of how the file packs it)."""
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()


def check_array(
    path: str | os.PathLike, name: str, arr: np.ndarray, expected: Mapping[str, tuple[tuple[int, ...], str, str]]
) -> None:
    """Raise CifarFormatError when array ``name`` of ``path`` has its listed shape and dtype but not its SHA-256.

    Arrays of other shapes (a subset, Keras's (N, 1) labels) are not the listed release and are not checked.
    """
    if name not in expected:
        return
    shape, dtype, sha256 = expected[name]
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        return
    got = cached_digest(path, f"sha256:{name}", lambda: array_sha256(arr))
    if got != sha256:
        raise CifarFormatError(
            f"{path}: array {name} is damaged: the SHA-256 of its bytes is {got}, expected {sha256} "
            f"(the official CIFAR-10 {name}); replace the file with a good copy"
        )


def read_binary_batches(
    folder: str | os.PathLike, split: str, *, checksums: Mapping[str, str] = BINARY_SHA1
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read the official binary batches ``data_batch_1..5.bin`` (train) or ``test_batch.bin`` (test).

    Each 3,073-byte record is a label byte then the R, G and B planes (1,024 bytes each, row-major).
    A file holding the official 10,000 records must have its published SHA-1 (``checksums``, MXNet
    Gluon's values); smaller files (subsets) are read unchecked. Class names come from
    ``batches.meta.txt`` when present.
    """
    folder = Path(folder)
    if split not in BINARY_FILES:
        raise ValueError(f"expected split 'train' or 'test' for CIFAR-10, received {split!r}")
    missing = [f for f in BINARY_FILES[split] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}")
    xs, ys = [], []
    for fname in BINARY_FILES[split]:
        path = folder / fname
        raw = path.read_bytes()
        if len(raw) == 0 or len(raw) % RECORD_BYTES:
            raise CifarFormatError(
                f"{path} is truncated or not a CIFAR-10 binary batch: {len(raw):,} bytes is not a whole number "
                f"of {RECORD_BYTES:,}-byte records (a label byte, then 3,072 pixel bytes)"
            )
        if len(raw) == OFFICIAL_RECORDS * RECORD_BYTES and fname in checksums:
            got = cached_digest(path, "sha1", lambda: hashlib.sha1(raw).hexdigest())
            if got != checksums[fname]:
                raise CifarFormatError(
                    f"{path} is damaged: its SHA-1 is {got}, expected {checksums[fname]} (the official {fname}); "
                    f"delete it and download cifar-10-binary.tar.gz again"
                )
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
        ys.append(records[:, 0].astype(np.int64))
        xs.append(records[:, 1:].reshape(-1, 3, 32, 32))  # R, G, B planes: already (C, H, W)
        _check_labels(torch.from_numpy(ys[-1]), len(CLASSES), path)
    classes = CLASSES
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
        if len(names) == len(CLASSES):
            classes = names
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), list(classes)


def write_binary_batch(path: str | os.PathLike, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Path:
    """Write uint8 images (N, 3, 32, 32) and labels in the official binary record layout (to test or convert)."""
    x = np.asarray(images, dtype=np.uint8)
    y = np.asarray(labels).astype(np.uint8)
    if x.ndim != 4 or x.shape[1:] != (3, 32, 32) or y.shape != (len(x),):
        raise ValueError(f"expected images (N, 3, 32, 32) and labels (N,), received {x.shape} and {y.shape}")
    path = Path(path)
    path.write_bytes(np.concatenate([y[:, None], x.reshape(len(x), -1)], axis=1).tobytes())
    return path

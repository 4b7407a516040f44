"""Readers for CIFAR-10: the official python batches and a Keras-style ``cifar10.npz``.

Both return images as uint8 (N, 3, 32, 32) tensors and int64 labels, in the original order.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES_DIR = "cifar-10-batches-py"
NPZ_FILE = "cifar10.npz"
BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

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


def read_npz(path: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``x_<split>``/``y_<split>`` (channels last, Keras layout) from a ``cifar10.npz``."""
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

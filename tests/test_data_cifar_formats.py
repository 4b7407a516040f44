"""CIFAR-10's three layouts (npz, python batches, binary batches) and their published checksums."""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from imclass import data
from imclass.data import cifar
from imclass.data import download as dl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test remembers digests in its own cache folder, and starts with an empty in-memory cache."""
    monkeypatch.setenv(dl.CACHE_ENV_VAR, str(tmp_path / "cache"))
    data.clear_cache()
    yield tmp_path / "cache"
    data.clear_cache()


def _nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def _write_test_batch(root, x_nhwc, y) -> "object":
    folder = root / "cifar10" / cifar.BINARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return cifar.write_binary_batch(folder / "test_batch.bin", _nchw(x_nhwc), y)


def test_binary_record_layout_is_label_then_rgb_planes(cifar_npz, tmp_path):
    x, y = cifar_npz["x_test"][:3], cifar_npz["y_test"][:3]
    raw = _write_test_batch(tmp_path, x, y).read_bytes()
    assert len(raw) == 3 * 3073
    rec = np.frombuffer(raw, np.uint8)[3073:2 * 3073]  # the second image, written by hand from the definition
    assert rec[0] == y[1]
    for c in range(3):  # R, G, B planes of 1,024 bytes, row-major
        np.testing.assert_array_equal(rec[1 + 1024 * c:1 + 1024 * (c + 1)], x[1][:, :, c].reshape(-1))


def test_full_binary_test_batch_passes_its_published_sha1_and_equals_the_npz(cifar_npz, tmp_path):
    _write_test_batch(tmp_path, cifar_npz["x_test"], cifar_npz["y_test"])
    test = data.load("cifar10", "test", root=tmp_path, download=False)
    assert test.source.endswith(cifar.BINARY_DIR) and test.notes == []
    assert torch.equal(test.images, _nchw(cifar_npz["x_test"]))
    assert torch.equal(test.labels, torch.from_numpy(cifar_npz["y_test"].astype(np.int64)))
    assert test.class_counts() == [1000] * 10


def test_small_binary_train_batches_round_trip_to_the_npz_tensors(cifar_npz, tmp_path):
    folder = tmp_path / "cifar10" / cifar.BINARY_DIR
    folder.mkdir(parents=True)
    x, y = cifar_npz["x_train"], cifar_npz["y_train"]
    picks = [np.arange(i * 10000, i * 10000 + 4) for i in range(5)]  # 4 real images from each official batch
    for i, idx in enumerate(picks, start=1):
        cifar.write_binary_batch(folder / f"data_batch_{i}.bin", _nchw(x[idx]), y[idx])
    (folder / "batches.meta.txt").write_text("\n".join(c.upper() for c in cifar.CLASSES) + "\n\n")
    with pytest.warns(UserWarning, match=r"cifar10 train split has 20 of the official 50,000 images"):
        train = data.load("cifar10", "train", root=tmp_path, download=False)
    idx = np.concatenate(picks)
    assert torch.equal(train.images, _nchw(x[idx])) and train.labels.tolist() == y[idx].tolist()
    assert train.classes == [c.upper() for c in cifar.CLASSES]
    assert train.notes == ["cifar10 train split has 20 of the official 50,000 images"]


def test_binary_batch_with_a_wrong_sha1_names_the_file(cifar_npz, tmp_path):
    path = _write_test_batch(tmp_path, cifar_npz["x_test"], cifar_npz["y_test"])
    raw = bytearray(path.read_bytes())
    raw[5000 * 3073 + 100] ^= 1  # one pixel of image 5000 off by one
    path.write_bytes(bytes(raw))
    with pytest.raises(cifar.CifarFormatError) as err:
        data.load("cifar10", "test", root=tmp_path, download=False)
    assert str(path) in str(err.value) and "is damaged: its SHA-1 is" in str(err.value)
    assert cifar.BINARY_SHA1["test_batch.bin"] in str(err.value)
    # the expected digests are a parameter: the same file passes against its own SHA-1
    own = {"test_batch.bin": hashlib.sha1(bytes(raw)).hexdigest()}
    x, _, _ = cifar.read_binary_batches(path.parent, "test", checksums=own)
    assert int(x[5000].reshape(-1)[99]) == int(cifar_npz["x_test"][5000][:, :, 0].reshape(-1)[99]) ^ 1


def test_truncated_binary_batch_and_bad_labels_name_the_file(cifar_npz, tmp_path):
    path = _write_test_batch(tmp_path, cifar_npz["x_test"][:5], cifar_npz["y_test"][:5])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(cifar.CifarFormatError, match=r"test_batch.bin is truncated or not a CIFAR-10 binary batch: "
                                                    r"15,355 bytes is not a whole number of 3,073-byte records"):
        data.load("cifar10", "test", root=tmp_path, download=False)
    raw = bytearray(3073 * 2)
    raw[3073] = 12  # the second record's label byte
    path.write_bytes(bytes(raw))
    with pytest.raises(cifar.CifarFormatError, match=r"test_batch.bin: expected labels in 0..9, received 0..12"):
        cifar.read_binary_batches(path.parent, "test")
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_1.bin, data_batch_2.bin"):
        cifar.read_binary_batches(path.parent, "train")


def test_npz_sha256_mismatch_names_file_and_array(cifar_npz, tmp_path):
    x, y = cifar_npz["x_test"][:6].copy(), cifar_npz["y_test"][:6].copy()
    expected = {"x_test": (x.shape, "uint8", cifar.array_sha256(x)), "y_test": (y.shape, "uint8", cifar.array_sha256(y))}
    path = tmp_path / "small.npz"
    np.savez_compressed(path, x_test=x, y_test=y)
    images, labels = cifar.read_npz(path, "test", expected=expected)  # the intact copy passes
    assert torch.equal(images, _nchw(x)) and labels.tolist() == y.tolist()
    x[3, 10, 10, 1] ^= 4
    tampered = tmp_path / "tampered.npz"
    np.savez_compressed(tampered, x_test=x, y_test=y)
    with pytest.raises(cifar.CifarFormatError) as err:
        cifar.read_npz(tampered, "test", expected=expected)
    msg = str(err.value)
    assert str(tampered) in msg and "array x_test is damaged" in msg and expected["x_test"][2] in msg
    # arrays not of the listed shape (a subset, Keras's (N, 1) labels) are not the listed release: unchecked
    np.savez_compressed(tampered, x_test=x[:5], y_test=y[:5, None])
    assert len(cifar.read_npz(tampered, "test", expected=expected)[0]) == 5


def test_the_shared_npz_passes_and_its_check_is_remembered(data_root, private_cache, monkeypatch):
    npz = data_root / "cifar10" / cifar.NPZ_FILE
    calls = []
    real = cifar.array_sha256

    def counting(arr):
        calls.append(arr.shape)
        return real(arr)

    monkeypatch.setattr(cifar, "array_sha256", counting)
    x, y = cifar.read_npz(npz, "test")
    assert x.shape == (10000, 3, 32, 32) and calls == [(10000, 32, 32, 3), (10000,)]
    record = json.loads((private_cache / dl.DIGESTS_FILE).read_text())
    assert record[f"{npz.resolve()}|sha256:x_test"]["digest"] == cifar.NPZ_SHA256["x_test"][2]
    cifar.read_npz(npz, "test")  # a second load (a new process reads the same record) hashes nothing
    assert len(calls) == 2
    # a record for another file state (size or mtime changed) is not trusted
    key = f"{npz.resolve()}|sha256:y_test"
    record[key]["mtime_ns"] += 1
    (private_cache / dl.DIGESTS_FILE).write_text(json.dumps(record))
    cifar.read_npz(npz, "test")
    assert calls[2:] == [(10000,)]


def test_unwritable_cache_still_checks(cifar_npz, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(dl.CACHE_ENV_VAR, str(blocker))  # mkdir fails: the digest is computed, nothing cached
    path = _write_test_batch(tmp_path, cifar_npz["x_test"], cifar_npz["y_test"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _, _ = cifar.read_binary_batches(path.parent, "test")
    assert len(x) == 10000


def test_binary_download_resource_is_the_official_one(monkeypatch, tmp_path):
    (res,) = dl.FORMATS["cifar10"]["binary"]
    assert res.url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert res.md5 == "c32a1d4ab5d03f1284b67883e8d87530" and res.extracts_to == cifar.BINARY_DIR
    assert dl.FORMATS["cifar10"]["python"] == dl.RESOURCES["cifar10"]
    with pytest.raises(ValueError, match=r"unknown format 'jpeg' for cifar10: expected one of python, binary"):
        dl.fetch("cifar10", tmp_path, fmt="jpeg")
    # an offline machine fails fast, naming the file and URL
    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(
        dl.urllib.error.URLError("no network")))
    with pytest.raises(dl.DownloadError, match=r"could not download cifar-10-binary.tar.gz from https://www.cs.toronto"):
        dl.fetch("cifar10", tmp_path, fmt="binary")
    assert not (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").exists()

"""Known data sets (CIFAR-10 npz and python batches, MNIST, Fashion-MNIST), arrays, splits, downloads."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import imclass.data as data
from imclass.data import catalog as datasets, download as dl
from imclass.data.cifar import CifarFormatError
from imclass.data.idx import IdxFormatError, read_idx

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TEST_1K_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Let the once-per-process warnings fire again in this test."""
    monkeypatch.setattr(datasets, "_WARNED", set())


# --- CIFAR-10 from the Keras-style npz ---------------------------------------------------------

def test_cifar10_npz_train(data_root, cifar_npz):
    ds = data.load("cifar10", split="train", root=data_root)
    assert ds.images.shape == (50000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (50000,) and ds.labels.dtype == torch.int64
    assert ds.images.is_contiguous()
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.classes == data.CLASSES["cifar10"]
    assert ds.class_counts() == [5000] * 10
    assert ds.labels[:20].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3, 4, 7, 7, 2, 9, 9, 9, 3, 2, 6]
    assert torch.equal(ds.labels, torch.from_numpy(cifar_npz["y_train"]).long())
    for i in (0, 1, 12345, 49999):  # pixel (c, h, w) of the tensor is pixel (h, w, c) of the npz
        assert torch.equal(ds.images[i], torch.from_numpy(cifar_npz["x_train"][i]).permute(2, 0, 1))
    assert ds.notes == [] and ds.name == "cifar10" and ds.split == "train"


def test_cifar10_npz_test_split_is_complete(data_root, cifar_npz):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full official split: no "smaller than official" warning
        ds = data.load("cifar10", split="test", root=data_root)
    assert len(ds) == 10000 and ds.class_counts() == [1000] * 10
    assert ds.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert ds.class_counts() == np.bincount(cifar_npz["y_test"], minlength=10).tolist()
    for i in (0, 999, 1000, 9999):
        assert torch.equal(ds.images[i], torch.from_numpy(cifar_npz["x_test"][i]).permute(2, 0, 1))
    assert ds.notes == []


def test_cifar10_npz_smaller_test_split_says_so(tmp_path, cifar_npz, fresh_warnings):
    """A copy holding only the first 1,000 test images (as the shared data once did) is noted and warned about."""
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10.npz", x_train=cifar_npz["x_train"][:100],
             y_train=cifar_npz["y_train"][:100], x_test=cifar_npz["x_test"][:1000], y_test=cifar_npz["y_test"][:1000])
    with pytest.warns(UserWarning, match="cifar10 test split has 1,000 of the official 10,000 images"):
        ds = data.load("cifar10", split="test", root=tmp_path)
    assert len(ds) == 1000 and ds.class_counts() == CIFAR_TEST_1K_COUNTS
    assert torch.equal(ds.images[999], torch.from_numpy(cifar_npz["x_test"][999]).permute(2, 0, 1))
    assert ds.notes == ["cifar10 test split has 1,000 of the official 10,000 images"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes once per process; the note stays
        again = data.load("cifar10", split="test", root=tmp_path)
    assert again.notes == ds.notes
    with pytest.warns(UserWarning, match="cifar10 train split has 100 of the official 50,000 images"):
        train = data.load("cifar10", split="train", root=tmp_path)
    assert train.notes == ["cifar10 train split has 100 of the official 50,000 images"]


def test_repeated_loads_are_independent_copies(data_root):
    a = data.load("cifar10", split="test", root=data_root)
    a.images.zero_()
    b = data.load("cifar10", split="test", root=data_root)
    assert int(b.images.max()) == 255


# --- CIFAR-10 from the official python batches -------------------------------------------------

def _write_batches(folder, x_nhwc, y, x_test, y_test, per_batch):
    """Pickle arrays the way the official cifar-10-batches-py files are laid out (protocol 2, bytes keys)."""
    folder.mkdir(parents=True)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def rows(x):  # (N, H, W, C) -> (N, 3072): the R plane, then G, then B, each row-major
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), -1)

    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        dump(f"data_batch_{b + 1}", {b"batch_label": b"training batch", b"labels": [int(v) for v in y[sl]],
                                     b"data": rows(x_nhwc[sl]), b"filenames": [b"x.png"] * per_batch})
    dump("test_batch", {b"batch_label": b"testing batch", b"labels": [int(v) for v in y_test],
                        b"data": rows(x_test), b"filenames": [b"x.png"] * len(y_test)})
    dump("batches.meta", {b"label_names": [c.encode() for c in data.CLASSES["cifar10"]],
                          b"num_cases_per_batch": per_batch, b"num_vis": 3072})


def test_cifar10_python_batches_load_like_the_arrays(tmp_path, cifar_npz, fresh_warnings):
    x, y = cifar_npz["x_train"][:20], cifar_npz["y_train"][:20]
    xt, yt = cifar_npz["x_test"][:6], cifar_npz["y_test"][:6]
    _write_batches(tmp_path / "cifar10" / "cifar-10-batches-py", x, y, xt, yt, per_batch=4)
    with pytest.warns(UserWarning, match="cifar10 train split has 20 of the official 50,000 images"):
        train = data.load("cifar10", "train", root=tmp_path, download=False)
    assert torch.equal(train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert torch.equal(train.labels, torch.from_numpy(y).long())
    assert train.classes == data.CLASSES["cifar10"]
    with pytest.warns(UserWarning, match="test split has 6 of the official 10,000"):
        test = data.load("cifar10", "test", root=tmp_path, download=False)
    assert torch.equal(test.images, torch.from_numpy(xt).permute(0, 3, 1, 2))
    assert test.labels.tolist() == yt.tolist()


@pytest.mark.filterwarnings("ignore:cifar10 train split has")
def test_cifar10_batches_refuse_foreign_pickles(tmp_path, cifar_npz):
    x, y = cifar_npz["x_train"][:5], cifar_npz["y_train"][:5]
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    _write_batches(folder, x, y, x[:1], y[:1], per_batch=1)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(CifarFormatError, match="data_batch_3.*refusing to load (__builtin__|builtins).print"):
        data.load("cifar10", root=tmp_path, download=False)


def test_cifar10_bad_npz_is_named(tmp_path):
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10.npz", x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2))
    with pytest.raises(CifarFormatError, match=r"cifar10.npz: expected x_train uint8 \(N, 32, 32, 3\)"):
        data.load("cifar10", root=tmp_path, download=False)
    with pytest.raises(CifarFormatError, match=r"expected x_test and y_test"):
        data.load("cifar10", "test", root=tmp_path, download=False)


# --- MNIST and Fashion-MNIST -------------------------------------------------------------------

def test_mnist_matches_the_official_counts(data_root):
    train = data.load("mnist", root=data_root)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.class_counts() == MNIST_TRAIN_COUNTS
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert train.classes == [str(i) for i in range(10)]
    assert int(train.images[0].max()) == 255 and int(train.images[0, 0, 0, 0]) == 0  # ink on a 0 background
    test = data.load("mnist", split="test", root=data_root)
    assert test.class_counts() == MNIST_TEST_COUNTS and test.notes == []


def test_fashion_mnist_matches_the_official_counts(data_root):
    train = data.load("fashion-mnist", root=data_root)
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.class_counts() == [6000] * 10
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert data.load("Fashion_MNIST", "test", root=data_root).class_counts() == [1000] * 10


def _idx_bytes(magic, dims, payload):
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def test_idx_reader_checks_magic_and_size(tmp_path):
    good = tmp_path / "good-idx3-ubyte.gz"
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8)
    good.write_bytes(gzip.compress(_idx_bytes(2051, (2, 3, 4), pixels.tobytes())))
    assert np.array_equal(read_idx(good, 2051), pixels.reshape(2, 3, 4))

    with pytest.raises(IdxFormatError, match=r"good-idx3-ubyte.gz has IDX magic number 2051 \(images\), expected 2049"):
        read_idx(good, 2049)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(_idx_bytes(2051, (2, 3, 4), pixels.tobytes()[:-5])))
    with pytest.raises(IdxFormatError, match=r"short.gz holds 35 bytes, expected 40 for 2x3x4 images"):
        read_idx(short, 2051)
    notgz = tmp_path / "notgz.gz"
    notgz.write_bytes(b"this is not gzip data at all")
    with pytest.raises(IdxFormatError, match=r"cannot read .*notgz.gz"):
        read_idx(notgz, 2049)


def test_load_names_a_bad_mnist_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(2051, (2, 2, 2), bytes(8))))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(2051, (3,), bytes(3))))
    with pytest.raises(IdxFormatError, match="t10k-labels-idx1-ubyte.gz has IDX magic number 2051"):
        data.load("mnist", "test", root=tmp_path, download=False)


# --- names, splits and arrays ------------------------------------------------------------------

def test_unknown_names_and_bad_splits_are_explained(data_root):
    with pytest.raises(ValueError, match="unknown data set 'cifar100': expected one of cifar10, mnist, fashion-mnist"):
        data.load("cifar100", root=data_root)
    with pytest.raises(ValueError, match=r"expected split 'train' or 'test' for cifar10.*train_val_split"):
        data.load("cifar10", split="val", root=data_root)
    with pytest.raises(TypeError, match="from_arrays"):
        data.load(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"expected a positive image_size, received 0"):
        data.load("mnist", image_size=0, root=data_root)


def test_image_size_resizes_a_known_set(data_root):
    ds = data.load("mnist", split="test", root=data_root, image_size=(32, 40))
    assert ds.images.shape == (10000, 1, 32, 40) and ds.images.dtype == torch.uint8
    assert ds.notes == ["resized from 28x28 to 32x40"]
    assert ds.labels.tolist()[:3] == [7, 2, 1]
    from PIL import Image  # oracle: Pillow's antialiased bilinear resize, within rounding

    original = data.load("mnist", split="test", root=data_root).images[:5]
    for img, small in zip(ds.images[:5], original):
        pil = np.asarray(Image.fromarray(small[0].numpy()).resize((40, 32), Image.BILINEAR))
        assert np.abs(pil.astype(int) - img[0].numpy().astype(int)).max() <= 1


def test_from_arrays_accepts_channels_last_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    ds = data.from_arrays(x, np.array([0, 1, 2, 2, 1, 0]), classes=["a", "b", "c"])
    assert ds.images.shape == (6, 3, 5, 7) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ds.class_counts() == [2, 2, 2] and ds.classes == ["a", "b", "c"]
    ints = data.from_arrays(torch.full((2, 1, 4, 4), 200, dtype=torch.int64), [0, 3])
    assert ints.images.dtype == torch.uint8 and ints.classes == ["0", "1", "2", "3"]


def test_from_arrays_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected uint8 images .* received float32 in 0.0..1.0"):
        data.from_arrays(np.linspace(0, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3), [0, 1])
    with pytest.raises(ValueError, match=r"expected labels in 0..1 for 2 classes, received 2"):
        data.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 2], classes=["a", "b"])
    with pytest.raises(ValueError, match=r"expected 3 labels \(one per image\), received 2"):
        data.from_arrays(np.zeros((3, 4, 4, 3), np.uint8), [0, 1])


@pytest.mark.parametrize("seed", range(5))
def test_train_val_split_is_stratified_disjoint_and_reproducible(cifar_small, seed):
    x, y, _, _ = cifar_small
    ds = data.from_arrays(x, y, data.CLASSES["cifar10"], split="train")
    train, val = data.train_val_split(ds, val_fraction=0.1, seed=seed)
    counts = torch.bincount(y, minlength=10)
    assert val.class_counts() == [round(0.1 * int(c)) for c in counts]
    assert len(train) + len(val) == len(ds) and train.split == "train" and val.split == "val"
    train2, val2 = data.train_val_split(ds, val_fraction=0.1, seed=seed)
    assert torch.equal(val.images, val2.images) and torch.equal(train.labels, train2.labels)
    _, other = data.train_val_split(ds, val_fraction=0.1, seed=seed + 100)
    assert not torch.equal(val.images, other.images)
    keep, held = data.split_indices(y, 0.1, seed=seed)
    assert set(keep.tolist()).isdisjoint(held.tolist()) and len(keep) + len(held) == len(y)
    assert torch.equal(val.images, x[held]) and torch.equal(keep, keep.sort().values)  # original order kept
    assert "seed" in val.notes[-1]


def test_train_val_split_checks_the_fraction():
    ds = data.from_arrays(np.zeros((4, 2, 2), np.uint8), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="strictly between 0 and 1, received 1.5"):
        data.train_val_split(ds, val_fraction=1.5)
    train, val = data.train_val_split(ds, val_fraction=0.5, stratified=False, seed=3)
    assert len(train) == len(val) == 2


# --- data root and downloads -------------------------------------------------------------------

def test_resolve_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("IMCLASS_DATA", str(tmp_path / "env"))
    assert data.resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_root() == tmp_path / "env"
    monkeypatch.delenv("IMCLASS_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.resolve_root() == tmp_path / "home" / ".cache" / "imclass"


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mnist not found: expected the four IDX files .*IMCLASS_DATA"):
        data.load("mnist", root=tmp_path, download=False)


def test_offline_download_error_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DownloadError) as err:
        data.load("mnist", root=tmp_path)
    message = str(err.value)
    assert "could not download train-images-idx3-ubyte.gz" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert "Temporary failure in name resolution" in message
    assert f"put the file at {tmp_path / 'mnist' / 'train-images-idx3-ubyte.gz'}" in message
    assert "IMCLASS_DATA" in message
    assert list((tmp_path / "mnist").iterdir()) == []


def test_checksum_mismatch_leaves_no_partial_file(tmp_path):
    src = tmp_path / "src" / "payload.bin"
    src.parent.mkdir()
    src.write_bytes(b"not the real data" * 1000)
    dest = tmp_path / "out" / "payload.bin"
    actual = hashlib.md5(src.read_bytes()).hexdigest()
    with pytest.raises(data.DownloadError, match=f"expected MD5 {'0' * 32}, received {actual}"):
        dl.download_file(src.as_uri(), dest, md5="0" * 32)
    assert list(dest.parent.iterdir()) == []
    dl.download_file(src.as_uri(), dest, md5=actual)
    assert dest.read_bytes() == src.read_bytes() and list(dest.parent.iterdir()) == [dest]


def test_cifar10_download_extracts_the_tarball(tmp_path, monkeypatch, cifar_npz, fresh_warnings):
    x, y = cifar_npz["x_train"][:10], cifar_npz["y_train"][:10]
    _write_batches(tmp_path / "build" / "cifar-10-batches-py", x, y, x[:2], y[:2], per_batch=2)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    res = dl.Resource("cifar-10-python.tar.gz", tarball.as_uri(), md5, extracts_to="cifar-10-batches-py")
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (res,))
    root = tmp_path / "root"
    with pytest.warns(UserWarning, match="train split has 10 of the official"):
        ds = data.load("cifar10", root=root)
    assert torch.equal(ds.images, torch.from_numpy(x).permute(0, 3, 1, 2)) and ds.labels.tolist() == y.tolist()
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["cifar-10-batches-py"]  # tarball removed

    bad = dl.Resource("cifar-10-python.tar.gz", tarball.as_uri(), "f" * 32, extracts_to="cifar-10-batches-py")
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (bad,))
    with pytest.raises(data.DownloadError, match="checksum mismatch for cifar-10-python.tar.gz"):
        data.load("cifar10", root=tmp_path / "other")
    assert list((tmp_path / "other" / "cifar10").iterdir()) == []


def test_official_resources_are_the_documented_ones():
    md5s = {r.filename: r.md5 for r in dl.RESOURCES["fashion-mnist"]}
    assert md5s["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    (cifar,) = dl.RESOURCES["cifar10"]
    assert cifar.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar.md5 == "c58f30108f718f92721af3b95e74349a"
    assert all(r.url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for r in dl.RESOURCES["mnist"])


def test_shared_mnist_files_have_the_official_md5(data_root):
    for res in dl.RESOURCES["mnist"]:
        assert dl.md5sum(data_root / "mnist" / res.filename) == res.md5


def test_subset_by_slice_indices_and_mask():
    ds = data.from_arrays(torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1), [0, 1, 0, 1, 1], ["a", "b"],
                          name="toy", split="train")
    assert ds.subset(slice(1, 3)).images.flatten().tolist() == [1, 2]
    assert ds.subset([4, 0]).labels.tolist() == [1, 0]
    picked = ds.subset(ds.labels == 1, split="val")
    assert picked.images.flatten().tolist() == [1, 3, 4] and picked.split == "val" and picked.name == "toy"
    assert repr(picked) == "ImageDataset(toy/val: 3 images of 1x1x1 uint8, 2 classes)"
    assert picked.describe()["class_counts"] == [0, 3]


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=60), fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**31))
def test_split_indices_partition_every_class(labels, fraction, seed):
    y = torch.tensor(labels)
    keep, held = data.split_indices(y, fraction, seed=seed)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(y)))
    assert keep.tolist() == sorted(keep.tolist()) and held.tolist() == sorted(held.tolist())
    for c in set(labels):
        assert int((y[held] == c).sum()) == round(fraction * labels.count(c))

"""Bad input that used to end in a traceback ends in one `error:` line (issue 22, item 10): a full disk
while saving, unknown or absent devices, hostile model-file metadata, NaN weights; and a class with no
training images is named."""
from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import imclass
from imclass.cli import app
from imclass.io import ModelFileError, load
from imclass.serve.app import create_app
from imclass.serve.predictor import Predictor


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("mlp", hidden=[8], num_classes=3, in_chans=1, img_size=8),
                             classes=["a", "b", "c"], mean=[0.5], std=[0.25])
    clf.input_size = (1, 8, 8)
    imclass.save(clf, root / "m.safetensors")
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(root / "x.png")
    return root / "m.safetensors"


def _rewrite(src, dst, edit=None, metadata=None, tensors=None):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["imclass"])
    if edit:
        edit(header)
    save_file(tensors or load_file(str(src)), str(dst), metadata={"imclass": metadata or json.dumps(header)})
    return dst


def test_a_full_disk_while_saving_is_one_line(tmp_path, data_root):
    def limit():  # every file this process writes stops at 100 kB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "imclass", "train", "--model", "lenet5", "--dataset", "mnist",
                             "--data", str(data_root), "--limit", "100", "--epochs", "1", "--device", "cpu",
                             "--out", str(out)], preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out / 'checkpoint.pt'}: writing failed (")
    assert last.endswith("disk full or a file size limit? The previous checkpoint is kept")
    assert "Traceback" not in result.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file left


@pytest.mark.parametrize("device, message", [
    ("nope", "error: expected --device auto, cpu, cuda, cuda:N or mps, received 'nope'"),
    pytest.param("cuda", "error: --device cuda: no CUDA GPU is available on this machine (use --device cpu or auto)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_devices_are_one_line(tmp_path, device, message):
    result = cli("train", "--model", "lenet5", "--dataset", "mnist", "--device", device, "--out", tmp_path / "r")
    assert (result.exit_code, result.output.strip()) == (2, message)
    assert not (tmp_path / "r").exists()


def test_deep_json_metadata_is_a_model_file_error(model_file, tmp_path):
    deep = _rewrite(model_file, tmp_path / "deep.safetensors", metadata="[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError, match="metadata is nested too deeply"):
        load(deep)
    result = cli("predict", deep, model_file.parent / "x.png")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "nested too deeply" in result.output


def test_a_huge_num_classes_is_refused_before_allocating(model_file, tmp_path):
    def huge(h):
        h["architecture"]["options"]["num_classes"] = 100_000_000

    bad = _rewrite(model_file, tmp_path / "huge.safetensors", huge)
    before = _peak_kb()
    with pytest.raises(ModelFileError, match=r"shape mismatch: .*model \(100000000, 8\) vs file \(3, 8\)"):
        load(bad)
    assert _peak_kb() - before < 200_000  # the 100 M x 8 head (3.2 GB) was never allocated


def _peak_kb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.__setitem__("preprocessing", "bilinear"),
     "expected preprocessing as a table (mean, std, input_size, ...) in the model file, received \"bilinear\""),
    (lambda h: h["preprocessing"].__setitem__("input_size", "1x8x8"),
     "expected preprocessing.input_size as a list of 3 positive integers in the model file, received \"1x8x8\""),
    (lambda h: h.__setitem__("classes", [1, 2, 3]),
     "expected classes as a list of class names in the model file, received [1, 2, 3]"),
    (lambda h: h["preprocessing"].__setitem__("mean", ["x"]),
     "expected preprocessing.mean as a list of numbers in the model file, received [\"x\"]"),
])
def test_wrong_metadata_types_are_one_line(model_file, tmp_path, edit, message):
    bad = _rewrite(model_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ModelFileError) as err:
        load(bad)
    assert str(err.value) == f"{bad}: {message}"
    result = cli("predict", bad, model_file.parent / "x.png")
    assert (result.exit_code, result.output.strip()) == (2, f"error: {bad}: {message}")


def test_nan_weights_give_valid_json_from_predict_and_serve_refuses(model_file, tmp_path):
    tensors = load_file(str(model_file))
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    nan = _rewrite(model_file, tmp_path / "nan.safetensors", tensors=tensors)
    result = cli("predict", nan, model_file.parent / "x.png", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # strict JSON: no NaN
    assert report["predictions"] == []
    assert "the model gave NaN or infinite probabilities" in report["errors"][0]["error"]
    with pytest.raises(ValueError, match=r"model 'nan' has \d+ NaN or infinite weights .* refusing to serve it"):
        create_app([Predictor.load(nan)])
    served = cli("serve", nan, "--port", "0")
    assert served.exit_code == 2 and served.output.startswith("error: model 'nan' has") and served.output.count("\n") == 1


def test_a_class_without_training_images_is_named(tmp_path):
    from imclass.workflows.training import RunConfig, _warn_about_data

    root = tmp_path / "f"
    for cls, n in (("a", 4), ("b", 4), ("c", 0)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(root / cls / f"{i}.png")
    train = imclass.data.load(root, split="train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_about_data(RunConfig(model="mlp", dataset=str(root)), train, None)
    assert any(str(w.message) == f"1 class(es) of {root} have no training images (c): the model can never learn to "
               "predict them" for w in caught)

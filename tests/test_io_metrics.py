"""Training metrics in the model file: ``imclass.save(..., metrics=)`` validates and stores them, ``load`` and
the predictor read them back, ``imclass train`` records its final figures, and ``GET /models/{name}`` of
``imclass serve`` answers them (falling back to history.csv for files written without them)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import imclass
from imclass.io import read_metadata
from imclass.serve.app import ServeConfig, create_app
from imclass.serve.predictor import Predictor

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HISTORY = "epoch,loss,accuracy,val_loss,val_accuracy\n1,2.1,0.25,2.0,0.3125\n"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _mlp() -> imclass.Classifier:
    torch.manual_seed(0)
    model = imclass.models.create("mlp", num_classes=10, hidden=[8])
    return imclass.Classifier(model, classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3)


def test_metrics_round_trip_through_save_and_load(tmp_path, cifar_small):
    metrics = {"test_accuracy": 0.8125, "val_loss": 0.53125, "epochs": 7, "seconds": 12.5,
               "np_float": np.float32(0.25), "tensor": torch.tensor(3)}
    path = imclass.save(_mlp(), tmp_path / "run", metrics=metrics)
    header = read_metadata(path)
    assert header["metrics"] == {"test_accuracy": 0.8125, "val_loss": 0.53125, "epochs": 7, "seconds": 12.5,
                                 "np_float": 0.25, "tensor": 3}
    assert isinstance(header["metrics"]["epochs"], int) and isinstance(header["metrics"]["np_float"], float)
    clf = imclass.load(tmp_path / "run")
    assert clf.training_metrics == header["metrics"]
    # a k-NN keeps them too
    x, y, _, _ = cifar_small
    knn = imclass.KNN(k=3).fit(x[:50], y[:50])
    imclass.save(knn, tmp_path / "knn", classes=CLASSES, metrics={"val_accuracy": 0.5, "k": 3})
    assert imclass.load(tmp_path / "knn").training_metrics == {"val_accuracy": 0.5, "k": 3}
    # without metrics: the header says null and load gives None
    imclass.save(_mlp(), tmp_path / "plain")
    assert read_metadata(tmp_path / "plain")["metrics"] is None
    assert imclass.load(tmp_path / "plain").training_metrics is None


@pytest.mark.parametrize("metrics, message", [
    ({"test_accuracy": float("nan")}, "metric 'test_accuracy' as a finite number, received nan"),
    ({"loss": math.inf}, "metric 'loss' as a finite number, received inf"),
    ({"loss": -math.inf}, "metric 'loss' as a finite number"),
    ({"ok": 1.0, "accuracy": "0.9"}, "metric 'accuracy' as a finite number, received '0.9' (str)"),
    ({"stopped": True}, "metric 'stopped' as a finite number, received True (bool)"),
    ({"val": None}, "metric 'val' as a finite number, received None"),
    ({"per_class": [0.1, 0.2]}, "metric 'per_class' as a finite number"),
    ({3: 0.5}, "metric names as strings, received the key 3 (int)"),
    ([("accuracy", 0.5)], "expected metrics as a dict of name -> number, received list"),
])
def test_bad_metrics_raise_a_value_error_naming_the_key_and_write_nothing(tmp_path, metrics, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        imclass.save(_mlp(), tmp_path / "bad", metrics=metrics)
    assert not (tmp_path / "bad").exists()


def test_train_records_its_final_metrics_and_serve_answers_them(tmp_path, data_root):
    from imclass.workflows.training import RunConfig, train_from_config

    out = tmp_path / "mlp-run"
    result = train_from_config(RunConfig(model="mlp", model_options={"hidden": [16]}, dataset="cifar10",
                                         data_root=str(data_root), limit=300, epochs=2, val_fraction=0.2,
                                         out=str(out), verbose=False))
    saved = read_metadata(out)["metrics"]
    assert saved["test_accuracy"] == pytest.approx(result["accuracy"]) and saved["test_loss"] == pytest.approx(result["loss"])
    assert saved["epochs"] == 2 == saved["epoch"]
    assert "seconds" not in saved  # wall time is no model fact: identical commands give identical files
    # the last epoch of history.csv, as the engine logged it (the file keeps the total seconds, not the epoch's)
    rows = (out / "history.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert saved[key] == pytest.approx(float(last[key]))
    # the file's test accuracy is what the model scores on the same 300 test images
    test = imclass.data.load("cifar10", split="test", root=str(data_root), limit=300)
    assert imclass.load(out).evaluate(test)["accuracy"] == pytest.approx(saved["test_accuracy"])

    # history.csv is rewritten: the served metrics are the file's, not the CSV's
    (out / "history.csv").write_text(HISTORY)
    with TestClient(create_app([Predictor.load(out)], ServeConfig())) as client:
        info = client.get("/models/mlp-run").json()
    assert info["metrics"] == json.loads(json.dumps(saved))
    assert info["metrics"]["val_accuracy"] != 0.3125


def test_a_file_without_metrics_falls_back_to_history_csv(tmp_path):
    imclass.save(_mlp(), tmp_path / "old")  # as files written before metrics existed
    (tmp_path / "old" / "history.csv").write_text(HISTORY)
    imclass.save(_mlp(), tmp_path / "new", metrics={"test_accuracy": 0.75, "epochs": 3})
    (tmp_path / "new" / "history.csv").write_text(HISTORY)
    imclass.save(_mlp(), tmp_path / "bare")  # neither metrics nor history.csv
    predictors = [Predictor.load(tmp_path / n) for n in ("old", "new", "bare")]
    with TestClient(create_app(predictors, ServeConfig())) as client:
        old = client.get("/models/old").json()["metrics"]
        new = client.get("/models/new").json()["metrics"]
        bare = client.get("/models/bare").json()["metrics"]
    assert old == {"epoch": 1.0, "loss": 2.1, "accuracy": 0.25, "val_loss": 2.0, "val_accuracy": 0.3125}
    assert new == {"test_accuracy": 0.75, "epochs": 3}
    assert bare == {}
    # an in-memory predictor of a loaded object keeps the file's metrics
    assert Predictor.from_object(imclass.load(tmp_path / "new"), name="x").metrics == new

"""Training config files and the `imclass train / evaluate / predict` commands, end to end on tiny runs."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imclass.cli import app
from imclass.workflows.training import RunConfig, config_from_dict, load_config

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# config files


def test_toml_config_then_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'model = "mlp"\ndataset = "mnist"\nepochs = 3\nlr = 1\nbatch-size = 64\n'
        '[model_options]\nhidden = [32]\n'
    )
    cfg = load_config(path, epochs=5, lr=None, optimizer="sgd")
    assert (cfg.model, cfg.dataset, cfg.batch_size, cfg.optimizer) == ("mlp", "mnist", 64, "sgd")
    assert cfg.epochs == 5  # the flag wins over the file
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # a flag left out (None) keeps the file's value
    assert cfg.model_options == {"hidden": [32]}
    assert cfg.momentum == RunConfig().momentum  # neither file nor flag: the default


def test_json_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "keras_cnn", "epochs": 2, "augment": "crop_flip", "schedule": "none"}))
    cfg = load_config(path)
    assert (cfg.model, cfg.epochs, cfg.augment, cfg.schedule) == ("keras_cnn", 2, "crop_flip", None)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("epochs = 2\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.toml: unknown key\(s\) \['learning_rate'\]"):
        load_config(path)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "expected epochs >= 1, received epochs=0"),
        ({"lr": -0.1}, "expected lr > 0"),
        ({"optimizer": "adagrad"}, "expected optimizer in"),
        ({"augment": "mixup"}, "expected augment in"),
        ({"target": 99}, "expected target in"),
        ({"epochs": "ten"}, "expected epochs as int, received 'ten'"),
        ({"epochs": True}, "expected epochs as int, received True"),
        ({"model_options": [1]}, "expected model_options as dict, received \\[1\\]"),
        ({"val_fraction": 1.0}, "expected 0 <= val_fraction < 1"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)


def test_bad_config_file(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(ValueError, match=r"x\.toml: cannot parse"):
        load_config(bad)
    with pytest.raises(ValueError, match="expected a .json or .toml config file"):
        load_config(tmp_path / "x.yaml") if (tmp_path / "x.yaml").write_text("a: 1") else None
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_cifar10_without_model_is_the_fast_recipe():
    assert RunConfig(dataset="cifar10").uses_fast_recipe
    assert not RunConfig(dataset="cifar10", model="keras_cnn").uses_fast_recipe
    assert RunConfig(dataset="mnist", model="mlp", recipe="fast").uses_fast_recipe


# --------------------------------------------------------------------------------------------
# the commands, end to end on tiny runs


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def json_out(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, data_root):
    """A 1-epoch MLP on 256 MNIST images, trained through the CLI with a config file and a flag."""
    folder = tmp_path_factory.mktemp("runs")
    config = folder / "mlp.toml"
    config.write_text(
        f'model = "mlp"\ndataset = "mnist"\nepochs = 1\nlr = 0.002\nlimit = 256\ndata_root = "{data_root}"\n'
        "[model_options]\nhidden = [64]\n"
    )
    out = folder / "mlp"
    result = invoke("train", "--config", config, "--batch-size", "16", "--out", out, "--json")
    return out, json_out(result)


def test_train_writes_a_run_folder(mnist_run):
    out, result = mnist_run
    assert set(result) >= {"accuracy", "loss", "seconds", "model_file"}
    assert 0.2 < result["accuracy"] <= 1.0  # 1 epoch on 256 images: well above chance (0.1)
    assert result["train_images"] == 256 and result["test_images"] == 256
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "history.csv", "checkpoint.pt", "curves.png"} <= names
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["lr"], config["epochs"]) == (16, 0.002, 1)  # flag over file over default
    assert config["model_options"] == {"hidden": [64]}
    from imclass.io import read_metadata

    meta = read_metadata(out)
    assert meta["architecture"]["name"] == "mlp" and meta["preprocessing"]["input_size"] == [1, 28, 28]
    assert meta["classes"] == [str(i) for i in range(10)]


def test_train_prints_one_summary_line(tmp_path, data_root):
    result = invoke("train", "--model", "mlp", "--dataset", "mnist", "--data", data_root, "--limit", 128,
                    "--epochs", 1, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    summary, timing = result.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"test accuracy \d+\.\d\d% on 128 test images, loss \d+\.\d{4}; saved .*model\.safetensors",
                        summary), summary
    # the end-of-run breakdown names every stage and adds up to the total (each figure rounded to 0.1 s)
    total, stages = re.fullmatch(r"time (\d+\.\d) s = (.*)", timing).groups()
    parts = dict(re.fullmatch(r"(.+) (\d+\.\d) s", p).groups() for p in stages.split(", "))
    assert list(parts) == ["start-up", "read", "check", "training", "evaluate + save", "other"], parts
    assert sum(float(v) for v in parts.values()) == pytest.approx(float(total), abs=0.3)


def test_evaluate_matches_training_figures(mnist_run, data_root):
    out, trained = mnist_run
    report = json_out(invoke("evaluate", out, "mnist", "--data", data_root, "--limit", 256, "--confusion", "--json"))
    assert report["accuracy"] == pytest.approx(trained["accuracy"])
    assert report["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 256
    assert cm.trace() / 256 == pytest.approx(report["accuracy"])
    per_class = report["per_class_accuracy"]
    assert per_class["0"] == pytest.approx(cm[0, 0] / cm[0].sum())
    text = invoke("evaluate", out, "mnist", "--data", data_root, "--limit", 256)
    assert text.exit_code == 0 and f"accuracy {report['accuracy']:.2%}" in text.stdout


def test_predict_pngs_and_a_bad_image(mnist_run, data_root, tmp_path):
    out, _ = mnist_run
    from imclass.data import load

    test = load("mnist", split="test", root=data_root).subset(slice(0, 3))
    paths = []
    for i in range(3):  # saved larger than 28x28: predict resizes to the model's input size
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).resize((56, 56), Image.NEAREST).save(path)
        paths.append(path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    result = invoke("predict", out, paths[0], tmp_path / "broken.png", tmp_path / "absent.png", *paths[1:],
                    "--top", 3, "--json")
    assert result.exit_code == 1  # some images failed, the others are still predicted
    report = json.loads(result.stdout)
    assert [p["image"] for p in report["predictions"]] == [str(p) for p in paths]
    assert {e["image"] for e in report["errors"]} == {str(tmp_path / "broken.png"), str(tmp_path / "absent.png")}
    assert "not a readable image" in report["errors"][0]["error"]
    assert "no such image file" in report["errors"][1]["error"]

    import imclass

    clf = imclass.load(out)  # the CLI's probabilities are the model's on the resized images
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).resize((28, 28), Image.BILINEAR))).unsqueeze(0)
                     for p in paths])
    probs = clf.predict_proba(x)
    for row, pred in zip(probs, report["predictions"]):
        top = row.topk(3)
        assert [t["class"] for t in pred["top"]] == [clf.classes[i] for i in top.indices.tolist()]
        assert [t["probability"] for t in pred["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert sum(t["probability"] for t in pred["top"]) <= 1 + 1e-6


def test_resume_continues_the_run(mnist_run, data_root, tmp_path):
    out, _ = mnist_run
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    # the run's own config.json supplies model, data, batch size, lr...; the flags extend it to 2 epochs
    result = json_out(invoke("train", "--out", run, "--resume", "--epochs", 2, "--json"))
    assert result["epochs"] == 2 and result["model"] == "mlp"
    assert json.loads((run / "config.json").read_text())["batch_size"] == 16
    history = (run / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]  # epoch 1 kept, epoch 2 added


def test_fine_tune_a_saved_model_on_new_classes(mnist_run, data_root, tmp_path):
    """--weights: the MNIST MLP gets a new 3-class head and learns digits 0/1/2 from a folder of PNGs."""
    out, _ = mnist_run
    from imclass.data import load

    digits = load("mnist", split="train", root=data_root).subset(slice(0, 600))
    for split, part in (("train", slice(0, 500)), ("test", slice(500, 600))):
        for i in torch.nonzero(digits.labels[part] < 3).flatten().tolist():
            folder = tmp_path / "digits" / split / f"d{int(digits.labels[part][i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(digits.images[part][i, 0].numpy()).save(folder / f"{i}.png")
    result = json_out(invoke("train", "--weights", out, "--dataset", tmp_path / "digits", "--epochs", 3,
                             "--lr", 0.002, "--out", tmp_path / "ft", "--json"))
    assert result["accuracy"] > 0.8  # three easy digits, from pretrained features

    import imclass

    clf = imclass.load(tmp_path / "ft")
    assert clf.classes == ["d0", "d1", "d2"]
    assert clf.model.imclass_spec["options"]["num_classes"] == 3  # the file rebuilds the new head
    before = imclass.load(out).model.state_dict()
    after = clf.model.state_dict()
    assert after["dense_1.weight"].shape == (3, 64)  # the new head
    assert not torch.equal(after["dense.weight"], before["dense.weight"])  # the hidden layer was fine-tuned


def test_train_fast_recipe_is_the_cifar10_default(data_root, tmp_path):
    out = tmp_path / "fast"
    result = json_out(invoke("train", "--dataset", "cifar10", "--data", data_root, "--limit", 256, "--epochs", 1,
                             "-o", "widths=[8,16,16]", "-o", "depth=1", "--out", out, "--json"))
    assert result["model"] == "fastnet" and result["target"] == 90
    import imclass

    clf = imclass.load(out)
    assert clf.train_config["fast_recipe"]["widths"] == [8, 16, 16]
    assert clf.model.imclass_spec["name"] == "fastnet"
    # one number everywhere: the model file records the TTA training evaluated with; evaluate applies it
    assert result["tta"] == "flip_translate" and clf.tta == "flip_translate"
    report = json_out(invoke("evaluate", out, "cifar10", "--data", data_root, "--limit", 256, "--json"))
    assert report["tta"] == "flip_translate" and report["images"] == result["test_images"] == 256
    assert report["accuracy"] == pytest.approx(result["accuracy"])
    plain = json_out(invoke("evaluate", out, "cifar10", "--data", data_root, "--limit", 256, "--no-tta", "--json"))
    test = imclass.data.load("cifar10", split="test", root=data_root, limit=256)
    assert plain["tta"] == "none" and plain["accuracy"] == pytest.approx(clf.evaluate(test)["accuracy"])
    assert report["accuracy"] == pytest.approx(clf.evaluate(test, tta="flip_translate")["accuracy"])
    text = invoke("evaluate", out, "cifar10", "--data", data_root, "--limit", 256)
    assert text.exit_code == 0 and "(tta: flip_translate)" in text.stdout
    image = tmp_path / "plane.png"
    Image.fromarray(test.images[3].permute(1, 2, 0).numpy()).save(image)
    with_tta = json_out(invoke("predict", out, image, "--top", 10, "--json"))
    without = json_out(invoke("predict", out, image, "--top", 10, "--no-tta", "--json"))
    assert with_tta["tta"] == "flip_translate" and without["tta"] == "none"
    by_class = {t["class"]: t["probability"] for t in with_tta["predictions"][0]["top"]}
    expected = clf.predict_proba(test.images[3:4], tta="flip_translate")[0]
    assert [by_class[c] for c in clf.classes] == pytest.approx(expected.tolist(), abs=1e-5)
    assert with_tta["predictions"][0]["top"] != without["predictions"][0]["top"]


def test_evaluate_and_predict_a_saved_knn(data_root, tmp_path):
    import imclass
    from imclass.data import load

    train = load("fashion-mnist", split="train", root=data_root).subset(slice(0, 500))
    test = load("fashion-mnist", split="test", root=data_root, limit=50)
    knn = imclass.KNN(k=1, metric="l1", backend="torch").fit(train.images, train.labels)
    path = imclass.save(knn, tmp_path / "knn.safetensors", classes=train.classes)
    report = json_out(invoke("evaluate", path, "fashion-mnist", "--data", data_root, "--limit", 50, "--json"))
    expected = (knn.predict(test.images) == test.labels).double().mean().item()
    assert report["accuracy"] == pytest.approx(expected) and report["loss"] is None

    image = tmp_path / "item.png"
    Image.fromarray(test.images[0, 0].numpy()).save(image)
    pred = json_out(invoke("predict", path, image, "--top", 1, "--json"))["predictions"][0]["top"][0]
    assert pred == {"class": train.classes[int(knn.predict(test.images[:1])[0])], "probability": 1.0}
    assert report["tta"] == "none"
    forced = invoke("evaluate", path, "fashion-mnist", "--data", data_root, "--limit", 50, "--tta")
    assert forced.exit_code == 2 and "--tta applies to neural networks" in forced.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "mnist", "--limit", "10"], "expected a model name (--model)"),
        (["train", "--model", "no_such_net", "--dataset", "mnist", "--limit", "10"], "unknown model 'no_such_net'"),
        (["train", "--model", "mlp", "--epochs", "0"], "expected epochs >= 1, received epochs=0"),
        (["train", "--model", "mlp", "-o", "hidden"], "expected --model-option KEY=VALUE, received 'hidden'"),
        (["evaluate", "/nonexistent/run", "mnist"], "/nonexistent/run: no such model file or run folder"),
        (["predict", "/nonexistent/run", "x.png"], "/nonexistent/run: no such model file or run folder"),
    ],
)
def test_errors_are_one_line(args, message, data_root):
    result = runner.invoke(app, args + (["--data", str(data_root)] if args[0] == "train" else []))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_a_mistyped_model_fails_before_any_data_is_read_and_leaves_no_run_folder(tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_folder"  # never read: the model name is checked first
    result = runner.invoke(app, ["train", str(missing), "--model", "resnet_2O"])
    assert result.exit_code == 2 and "unknown model 'resnet_2O'" in result.stderr
    assert not (tmp_path / "runs").exists()
    # a run that fails after its folder was made (here: a model that cannot take these images) removes it again
    result = runner.invoke(app, ["train", "mnist", "--model", "mlp", "--limit", "10", "--epochs", "1", "--data",
                                 str(data_root), "-o", "no_such_option=1"])
    assert result.exit_code != 0
    assert not (tmp_path / "runs" / "mlp-mnist").exists()


def test_limit_on_a_folder_samples_every_class(tmp_path, cifar_small):
    """A folder lists its files class by class: --limit takes a seeded sample of all classes, not the first class."""
    from imclass.models.weights import Preprocessing
    from imclass.workflows.training import _load_data
    from imclass.transfer.workflow import read_folder_for

    x, y, _, _ = cifar_small
    for name in ("cat", "dog", "ship"):
        (tmp_path / name).mkdir()
    for i, label in enumerate([3, 5, 8]):
        for j in torch.nonzero(y == label).flatten()[:10].tolist():
            Image.fromarray(x[j].permute(1, 2, 0).numpy()).save(tmp_path / ["cat", "dog", "ship"][i] / f"{j}.png")
    train, test = _load_data(RunConfig(dataset=str(tmp_path), model="mlp", limit=9, seed=0))
    assert len(train) == 9 and len(set(train.labels.tolist())) == 3
    pre = Preprocessing(input_size=(3, 32, 32), resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tr, val, _ = read_folder_for(tmp_path, pre, val_fraction=0.25, seed=0, limit=9)
    assert len(tr) <= 9 and len(set(tr.labels.tolist())) == 3 and len(set(val.labels.tolist())) == 3


def test_choose_tta_is_the_one_tta_rule():
    from imclass.tta import choose_tta

    assert choose_tta("flip_translate", None) == "flip_translate" and choose_tta(None, None) == "none"
    assert choose_tta("flip_translate", False) == "none" and choose_tta(None, True) == "flip_translate"
    assert choose_tta("flip", True) == "flip" and choose_tta(None, "mirror") == "flip"
    assert choose_tta("flip_translate", None, knn=True) == "none"
    with pytest.raises(ValueError, match="--tta applies to neural networks"):
        choose_tta(None, True, knn=True)

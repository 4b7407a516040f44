"""Model files: save/load round trips, metadata, errors on bad files, fine-tuning after a load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import imclass
from imclass import models
from imclass.io import ModelFileError, load, load_weights, read_metadata, save

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def small_fastnet() -> torch.nn.Module:
    """A registry model with batch-norm buffers, a frozen weight and tuple options."""
    return models.create("fastnet", num_classes=10, widths=(8, 16, 16), depth=1)


def small_mlp() -> torch.nn.Module:
    """A cheap registry model (a Sequential of Dense layers) for tests that train."""
    return models.create("mlp", num_classes=10, hidden=[32])


def course_cnn():
    """A small course-style Sequential (Keras layers), softmax output kept as logits."""
    from imclass.layers import Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential

    return Sequential(
        [
            Conv2D(8, 3, padding="same", activation="relu"),
            MaxPooling2D(),
            Dropout(0.25),
            Flatten(),
            Dense(16, activation="relu"),
            Dense(10, activation="softmax"),
        ],
        input_shape=(32, 32, 3),
    )


@pytest.fixture(scope="module")
def images(cifar_small):
    x, y, xt, yt = cifar_small
    return x[:256], y[:256], xt[:64], yt[:64]


def trained_classifier(model, images, steps: int = 4):
    from imclass.train import Classifier

    x, y, _, _ = images
    clf = Classifier(model, classes=CLASSES, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), device="cpu")
    clf.compile("adam", lr=1e-3)
    clf.fit((x[: steps * 32], y[: steps * 32]), epochs=1, batch_size=32, seed=0, verbose=False)
    return clf


def assert_same_model(loaded, original, images):
    """Bit-identical weights; the same predictions (probabilities up to float rounding: the trained
    model may run its convolutions in channels_last layout, the loaded one in NCHW until compiled)."""
    for (name, a), b in zip(loaded.model.state_dict().items(), original.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), name
    assert torch.equal(loaded.predict(images), original.predict(images))
    torch.testing.assert_close(loaded.predict_proba(images), original.predict_proba(images), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# round trips


def test_bare_registry_model_round_trip(tmp_path):
    model = small_fastnet()
    with torch.no_grad():  # make the batch-norm buffers non-default, so they must travel too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_()
                m.running_var.uniform_(0.5, 2)
    model.eval()
    path = save(model, tmp_path / "net.safetensors", input_size=(3, 32, 32))
    again = load(path)
    assert isinstance(again, type(model)) and not again.training
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_registry_classifier_round_trip_and_metadata(tmp_path, images):
    clf = trained_classifier(small_mlp(), images)
    path = save(clf, tmp_path / "run", train_config={"epochs": 1, "lr": 1e-3})
    assert path == tmp_path / "run" / "model.safetensors"

    header = read_metadata(path)
    assert header["format"] == 1 and header["kind"] == "classifier"
    assert header["architecture"] == {"name": "mlp", "options": {"num_classes": 10, "hidden": [32]}}
    assert header["preprocessing"]["input_size"] == [3, 32, 32]  # from the Sequential's input shape
    assert header["classes"] == CLASSES
    assert header["preprocessing"]["mean"] == pytest.approx([0.49, 0.48, 0.45])
    assert header["preprocessing"]["std"] == pytest.approx([0.25, 0.24, 0.26])
    assert header["final_activation"] == "softmax"
    assert header["train_config"] == {"epochs": 1, "lr": 1e-3}
    with safe_open(str(path), framework="pt") as f:  # the raw file: weights + a str metadata value
        assert set(f.keys()) == set(clf.model.state_dict())
        assert json.loads(f.metadata()["imclass"]) == header

    again = imclass.load(tmp_path / "run")  # a run folder works as well as the file
    assert type(again) is type(clf) and not again.model.training
    assert list(again.classes) == CLASSES
    assert_same_model(again, clf, images[2])


def test_sequential_classifier_round_trip(tmp_path, images):
    clf = trained_classifier(course_cnn(), images)
    path = save(clf, tmp_path / "cnn.safetensors")
    header = read_metadata(path)
    assert "sequential" in header["architecture"]
    assert header["preprocessing"]["input_size"] == [3, 32, 32]
    assert_same_model(load(path), clf, images[2])


def test_knn_round_trip(tmp_path, images):
    x, y, xt, _ = images
    knn = imclass.KNN(k=3, metric="l1", backend="torch").fit(x, y)
    path = save(knn, tmp_path / "knn.safetensors", classes=CLASSES)
    header = read_metadata(path)
    assert (header["kind"], header["classes"], header["knn"]["k"], header["knn"]["metric"]) == ("knn", CLASSES, 3, "l1")
    assert header["preprocessing"]["input_size"] == [3, 32, 32]
    again = load(path)
    assert type(again) is type(knn) and (again.k, again.metric) == (3, "l1")
    assert torch.equal(again.predict(xt), knn.predict(xt))
    torch.testing.assert_close(again.predict_proba(xt), knn.predict_proba(xt), rtol=0, atol=0)


def test_a_reset_classifier_is_saved(tmp_path):
    model = small_fastnet()
    model.reset_classifier(3)  # transfer learning: a new head after create()
    again = load(save(model, tmp_path / "m.safetensors"))
    assert again.head.out_features == 3
    assert torch.equal(again.head.weight, model.head.weight)


def test_a_model_started_from_a_local_weights_file_loads_without_that_file(tmp_path):
    # transfer learning: backbone weights from a local file; the saved model file must stand alone
    source = models.create("timm:resnet10t", num_classes=10)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    tuned = models.create("timm:resnet10t", num_classes=3, pretrained_file=str(tmp_path / "backbone.safetensors")).eval()
    path = save(tuned, tmp_path / "tuned.safetensors", input_size=(3, 32, 32))
    (tmp_path / "backbone.safetensors").unlink()
    again = load(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), tuned(x), rtol=0, atol=0)


def test_overwrite_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save(small_fastnet(), path)
    save(models.create("fastnet", num_classes=4, widths=(8, 8, 8), depth=1), path)
    assert read_metadata(path)["architecture"]["options"]["num_classes"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# --------------------------------------------------------------------------------------------
# weights from a file are real: fine-tune after a load


def test_fine_tune_after_load(tmp_path, images):
    clf = trained_classifier(small_mlp(), images)
    save(clf, tmp_path / "run")
    again = load(tmp_path / "run")
    x, y, xt, yt = images
    assert_same_model(again, clf, xt)

    before = {k: v.clone() for k, v in again.model.state_dict().items()}
    loss_before = again.evaluate((x[:128], y[:128]))["loss"]
    again.compile("adam", lr=3e-3)
    again.fit((x[:128], y[:128]), epochs=4, batch_size=32, seed=1, verbose=False)
    after = again.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert again.evaluate((x[:128], y[:128]))["loss"] < loss_before


def test_load_weights_into_a_model_from_safetensors_and_pt(tmp_path):
    source = small_fastnet()
    save(source, tmp_path / "a.safetensors")
    torch.save(source.state_dict(), tmp_path / "a.pt")
    for name in ("a.safetensors", "a.pt"):
        target = small_fastnet()
        load_weights(target, tmp_path / name)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    # strict=False: transfer what matches (a new 4-class head keeps its own weights)
    target = models.create("fastnet", num_classes=4, widths=(8, 16, 16), depth=1)
    head = target.head.weight.clone()
    load_weights(target, tmp_path / "a.safetensors", strict=False)
    assert torch.equal(target.whiten.weight, source.whiten.weight)
    assert torch.equal(target.head.weight, head)


def test_load_weights_from_a_training_checkpoint(tmp_path, images):
    clf = trained_classifier(small_mlp(), images, steps=1)
    x, y, _, _ = images
    clf.fit((x[:32], y[:32]), epochs=1, batch_size=32, checkpoint_dir=tmp_path, verbose=False)
    model = load_weights(small_mlp(), tmp_path / "checkpoint.pt")  # its "model" entry, weights_only
    for (name, v), w in zip(model.state_dict().items(), clf.model.state_dict().values()):
        assert torch.equal(v, w), name


def test_pt_file_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match=r"evil\.pt: not a readable weights-only torch file"):
        load_weights(small_fastnet(), tmp_path / "evil.pt")


# --------------------------------------------------------------------------------------------
# bad files


def test_truncated_file(tmp_path):
    path = save(small_fastnet(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cut = r"cut\.safetensors: not a readable \.safetensors file \(corrupted or truncated\?\)"
    with pytest.raises(ModelFileError, match=cut):
        load(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:40])
    with pytest.raises(ModelFileError, match=r"head\.safetensors: not a readable \.safetensors file"):
        load(tmp_path / "head.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, not a model")
    with pytest.raises(ModelFileError, match=r"text\.safetensors: not a readable"):
        load(tmp_path / "text.safetensors")


def test_safetensors_file_that_is_not_an_imclass_model(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"other\.safetensors: not an imclass model file .*\['format'\]"):
        load(tmp_path / "other.safetensors")


def _rewrite(path, out, **changes):
    """Copy a model file, changing keys of its imclass header."""
    from safetensors.torch import load_file

    header = read_metadata(path)
    header.update(changes)
    save_file(load_file(path), out, metadata={"imclass": json.dumps(header)})
    return out


def test_unknown_architecture_and_format(tmp_path):
    path = save(small_fastnet(), tmp_path / "m.safetensors")
    bad = _rewrite(path, tmp_path / "arch.safetensors", architecture={"name": "no_such_net", "options": {}})
    unknown = r"arch\.safetensors: cannot rebuild the architecture .*unknown model 'no_such_net'"
    with pytest.raises(ModelFileError, match=unknown):
        load(bad)
    bad = _rewrite(path, tmp_path / "fmt.safetensors", format=7)
    with pytest.raises(ModelFileError, match=r"fmt\.safetensors: expected model file format 1, received format=7"):
        load(bad)
    bad = _rewrite(path, tmp_path / "kind.safetensors", kind="pipeline")
    with pytest.raises(ModelFileError, match=r"expected kind in .*received kind='pipeline'"):
        load(bad)


def test_weights_that_do_not_match_the_architecture(tmp_path):
    path = save(small_fastnet(), tmp_path / "m.safetensors")
    wider = {"name": "fastnet", "options": {"widths": [8, 16, 32], "depth": 1}}
    bad = _rewrite(path, tmp_path / "wide.safetensors", architecture=wider)
    mismatch = (
        r"wide\.safetensors: the weights do not match the architecture \(.*shape mismatch: "
        r"groups\.2\.layers\.0\.weight: model \(32, 16, 3, 3\) vs file \(16, 16, 3, 3\)"
    )
    with pytest.raises(ModelFileError, match=mismatch):
        load(bad)
    deeper = {"name": "fastnet", "options": {"widths": [8, 16, 16], "depth": 2}}
    bad = _rewrite(path, tmp_path / "deep.safetensors", architecture=deeper)
    with pytest.raises(ModelFileError, match=r"do not match the architecture \(missing from the file: groups\."):
        load(bad)


def test_missing_paths(tmp_path):
    with pytest.raises(ModelFileError, match=r"nope\.safetensors: no such model file or run folder"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match=r"expected a run folder holding model\.safetensors, found none$"):
        load(tmp_path)
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ModelFileError, match=r"found none \(training not finished\?"):
        load(tmp_path)
    with pytest.raises(ModelFileError, match=r"checkpoint\.pt: expected an imclass \.safetensors model.*load_weights"):
        load(tmp_path / "checkpoint.pt")


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    with pytest.raises(TypeError, match="cannot save a Linear: expected a model built by imclass.models.create"):
        save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="expected a Classifier, a KNN or a torch.nn.Module to save, received str"):
        save("model", tmp_path / "x.safetensors")

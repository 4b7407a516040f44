"""Classifier: learning on real CIFAR-10, inputs, reproducibility, divergence, errors, schedules, metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import imclass
from imclass.data import ImageDataset
from imclass.evaluate import accuracy, confusion_matrix, per_class_accuracy, top_k_accuracy
from imclass.train import Classifier, Schedule, TrainingDiverged, load_checkpoint, make_optimizer, make_schedule


def tiny_cnn(num_classes=10, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),  # (N, 16, 16, 16)
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # (N, 32, 8, 8)
        nn.MaxPool2d(2), nn.Flatten(),  # (N, 512)
        nn.Dropout(dropout), nn.Linear(512, num_classes),
    )


@pytest.fixture(scope="module")
def small(cifar_small):
    x, y, xt, yt = cifar_small
    return x[:1000], y[:1000], xt, yt


def test_tiny_cnn_learns_real_cifar_subset(small):
    x, y, xt, yt = small
    train = ImageDataset(x, y, [f"c{i}" for i in range(10)])
    clf = imclass.Classifier(tiny_cnn()).compile("adam", lr=3e-3)
    history = clf.fit(train, epochs=4, batch_size=32, validation=(xt, yt), seed=0, verbose=False)
    assert history["epoch"] == [1, 2, 3, 4]
    assert set(history.keys()) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    assert history["loss"][-1] < history["loss"][0]
    result = clf.evaluate((xt, yt))
    assert result["accuracy"] > 0.28  # chance is 0.10; seeds 0-2 reach 0.35-0.39 (500 images: sd about 0.02)
    assert result["accuracy"] == pytest.approx(history["val_accuracy"][-1])
    assert clf.classes == train.classes
    # mean/std computed from the training images, on the [0, 1] scale
    assert clf.mean == pytest.approx((x.double() / 255).mean((0, 2, 3)).tolist())
    assert clf.std == pytest.approx((x.double() / 255).std((0, 2, 3), unbiased=False).tolist(), rel=1e-6)
    pred, proba = clf.predict(xt), clf.predict_proba(xt)
    assert pred.dtype == torch.int64 and pred.shape == (500,)
    assert torch.allclose(proba.sum(1), torch.ones(500), atol=1e-5)
    assert torch.equal(proba.argmax(1), pred)
    assert accuracy(pred, yt) == pytest.approx(result["accuracy"])


def test_numpy_channels_last_and_float_inputs_give_the_same_predictions(small, cifar_npz):
    x, y, xt, yt = small
    clf = Classifier(tiny_cnn(), mean=[0.5] * 3, std=[0.25] * 3)
    as_numpy_hwc = cifar_npz["x_test"][:500]
    p_tensor = clf.predict_logits(xt)
    assert torch.equal(clf.predict_logits(as_numpy_hwc), p_tensor)
    assert torch.allclose(clf.predict_logits(xt.float() / 255), p_tensor, atol=1e-5)
    # evaluate works without compile when mean/std are known (plain cross-entropy)
    expected = nn.functional.cross_entropy(p_tensor, yt).item()
    assert clf.evaluate((as_numpy_hwc, cifar_npz["y_test"][:500]))["loss"] == pytest.approx(expected, rel=1e-5)
    # test-time augmentation: "flip" averages the logits of the images and their mirror images
    mirrored = clf.predict_logits(xt.flip(-1))
    assert torch.allclose(clf.predict_logits(xt, tta="flip"), (p_tensor + mirrored) / 2, atol=1e-5)
    assert clf.evaluate((xt, yt), tta="flip")["n"] == 500
    # fit accepts numpy arrays (NHWC uint8, uint8 labels)
    clf.compile("sgd", lr=0.01)
    h = clf.fit((cifar_npz["x_train"][:64], cifar_npz["y_train"][:64]), epochs=1, batch_size=32, verbose=False)
    assert len(h) == 1 and clf.classes == [str(i) for i in range(10)] and clf.input_size == (3, 32, 32)


def test_same_seed_repeats_bit_for_bit_and_other_seed_differs(small):
    x, y, _, _ = small
    data = (x[:256], y[:256])

    def run(seed):
        clf = Classifier(tiny_cnn(dropout=0.3)).compile("sgd", lr=0.05, schedule="onecycle", label_smoothing=0.1)
        h = clf.fit(data, epochs=2, batch_size=32, validation=0.25, augment="crop_flip_cutout", seed=seed, verbose=False)
        return clf.model.state_dict(), h

    (w1, h1), (w2, h2), (w3, _) = run(3), run(3), run(4)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert h1["loss"] == h2["loss"] and h1["val_accuracy"] == h2["val_accuracy"]
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_schedules_give_the_expected_learning_rates():
    # 10 epochs of 10 steps
    step = Schedule("step", total_steps=100, steps_per_epoch=10, step_size=3, gamma=0.5)
    assert [step(s) for s in (0, 29, 30, 59, 60, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.125]
    expo = Schedule("exponential", total_steps=100, steps_per_epoch=10, gamma=0.9)
    assert expo(0) == 1 and expo(10) == pytest.approx(0.9) and expo(25) == pytest.approx(0.9**2.5)
    cos = Schedule("cosine", total_steps=100, steps_per_epoch=10, min_factor=0.1)
    assert cos(0) == 1 and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    assert cos(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    lin = Schedule("linear", total_steps=100, steps_per_epoch=10)
    assert lin(0) == 1 and lin(75) == pytest.approx(0.25)
    one = Schedule("onecycle", total_steps=100, steps_per_epoch=10, pct_start=0.2, start_factor=0.1)
    assert one(0) == pytest.approx(0.1) and one(10) == pytest.approx(0.55) and one(20) == 1
    assert one(60) == pytest.approx(0.5) and one(100) == pytest.approx(0.0)
    warm = make_schedule("cosine", total_steps=100, steps_per_epoch=10, warmup_steps=10)
    assert warm(0) == pytest.approx(0.1 * 1) and warm(4) == pytest.approx(0.5 * cos_at(4, 100))
    assert warm(10) == pytest.approx(cos_at(10, 100))
    custom = make_schedule(lambda s: 0.5, total_steps=10, steps_per_epoch=1, warmup_steps=4)
    assert [custom(s) for s in (0, 3, 9)] == [0.125, 0.5, 0.5]
    with pytest.raises(ValueError, match="expected schedule in"):
        make_schedule("triangle", total_steps=10, steps_per_epoch=1)


def cos_at(step, total):
    return 0.5 * (1 + math.cos(math.pi * step / total))


def test_fit_applies_the_schedule_per_batch(small):
    x, y, _, _ = small
    clf = Classifier(tiny_cnn()).compile("sgd", lr=0.1, schedule={"name": "step", "step_size": 1, "gamma": 0.5},
                                         warmup_epochs=0)
    lrs = []

    class Record:
        def on_batch_end(self, state):
            lrs.append(state.optimizer.param_groups[0]["lr"])

    h = clf.fit((x[:64], y[:64]), epochs=3, batch_size=16, callbacks=[Record()], verbose=False)
    assert lrs == [0.1] * 4 + [0.05] * 4 + [0.025] * 4
    assert h["lr"] == [0.1, 0.05, 0.025]


def test_optimizers_by_name_and_given_torch_optimizer(small):
    model = tiny_cnn()
    assert isinstance(make_optimizer("sgd", model.parameters(), lr=0.1, nesterov=True), torch.optim.SGD)
    assert make_optimizer("adamw", model.parameters(), weight_decay=0.05).param_groups[0]["weight_decay"] == 0.05
    assert isinstance(make_optimizer("RMSprop", model.parameters()), torch.optim.RMSprop)
    with pytest.raises(ValueError, match="expected optimizer in"):
        make_optimizer("lbfgs2", model.parameters())
    # a caller-built optimizer with param groups and a torch scheduler stepped per batch
    x, y, _, _ = small
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest}], lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    clf = Classifier(model).compile(opt, schedule=sched)
    clf.fit((x[:64], y[:64]), epochs=1, batch_size=16, verbose=False)  # 4 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    assert clf.training_config()["optimizer"] == "sgd"


def test_nan_loss_stops_with_the_epoch_and_step_and_keeps_the_last_checkpoint(small, tmp_path):
    x, y, _, _ = small

    class BreaksAfter(nn.Module):
        def __init__(self, calls):
            super().__init__()
            self.net, self.calls = tiny_cnn(), calls

        def forward(self, x):
            self.calls -= 1
            out = self.net(x)
            return out * float("nan") if self.calls < 0 and self.training else out

    clf = Classifier(BreaksAfter(calls=6)).compile("sgd", lr=0.01)  # 4 steps per epoch: breaks at step 7
    with pytest.raises(TrainingDiverged, match=r"epoch 2, at or before batch 3 \(step 7\)"):
        clf.fit((x[:64], y[:64]), epochs=3, batch_size=16, checkpoint_dir=tmp_path, verbose=False)
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1 and saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # an absurd learning rate diverges too
    clf = Classifier(tiny_cnn()).compile("sgd", lr=1e6)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        clf.fit((x[:256], y[:256]), epochs=5, batch_size=32, verbose=False)


def test_clear_errors(small):
    x, y, xt, yt = small
    clf = Classifier(tiny_cnn())
    with pytest.raises(RuntimeError, match="compile"):
        clf.fit((x[:32], y[:32]))
    with pytest.raises(RuntimeError, match="call fit"):
        clf.evaluate((xt, yt))
    with pytest.raises(RuntimeError, match="call fit"):
        clf.predict(xt)
    clf.compile("adam")
    with pytest.raises(ValueError, match=r"expected 32 data labels \(one per image\), received 31"):
        clf.fit((x[:32], y[:31]))
    with pytest.raises(TypeError, match="ImageDataset or an \\(images, labels\\) pair"):
        clf.fit(x[:32])
    with pytest.raises(ValueError, match="classes"):
        Classifier(tiny_cnn(num_classes=5)).compile("adam").fit((x[:32], y[:32]), verbose=False)
    with pytest.raises(ValueError, match=r"labels in 0..2 \(3 classes\)"):
        Classifier(tiny_cnn(), classes=["a", "b", "c"]).compile("adam").fit((x[:32], y[:32]), verbose=False)
    with pytest.raises(ValueError, match="optimizer in"):
        Classifier(tiny_cnn()).compile("sgdd")
    with pytest.raises(ValueError, match="label_smoothing"):
        Classifier(tiny_cnn()).compile(label_smoothing=1.5)
    with pytest.raises(ValueError, match="validation fraction"):
        clf.fit((x[:32], y[:32]), validation=1.5, verbose=False)
    with pytest.raises(ValueError, match="amp None"):
        Classifier(tiny_cnn()).compile(amp="int8")
    with pytest.warns(UserWarning, match="CUDA only"):
        Classifier(tiny_cnn(), device="cpu").compile(amp="bf16", compile=True)
    with pytest.raises(ValueError, match="mean and std"):
        Classifier(tiny_cnn(), mean=[0.5, 0.5, 0.5])


def test_l2_and_channels_last_train(small):
    x, y, _, _ = small
    clf = Classifier(tiny_cnn()).compile("sgd", lr=0.05, l2=1e-3, channels_last=True, grad_clip=1.0)
    h = clf.fit((x[:128], y[:128]), epochs=1, batch_size=32, verbose=False)
    assert math.isfinite(h["loss"][0])
    # the l2 term is part of the reported loss: larger than the plain cross-entropy of a fresh model
    assert clf.predict(x[:8]).shape == (8,)


def test_metrics_match_sklearn():
    from sklearn import metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    assert accuracy(p, y) == pytest.approx(metrics.accuracy_score(y, p))
    cm = confusion_matrix(p, y, 5)
    assert cm.tolist() == metrics.confusion_matrix(y, p, labels=range(5)).tolist()
    assert per_class_accuracy(p, y, 5).tolist() == pytest.approx(metrics.recall_score(y, p, average=None).tolist())
    logits = torch.from_numpy(rng.normal(size=(300, 5)))
    assert top_k_accuracy(logits, y, 2) == pytest.approx(metrics.top_k_accuracy_score(y, logits.numpy(), k=2))
    with pytest.raises(ValueError, match="received 299"):
        accuracy(p[:299], y)


def test_fast_recipe_amp_auto_follows_the_cpu(monkeypatch):
    """'auto' trains in bf16 only on a CPU with native bf16 (AVX-512-BF16/AMX); elsewhere float32."""
    from imclass.workflows import recipes

    monkeypatch.setattr(recipes, "cpu_has_native_bf16", lambda: True)
    assert recipes.resolve_amp("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(recipes, "cpu_has_native_bf16", lambda: False)
    assert recipes.resolve_amp("auto", torch.device("cpu")) is None
    assert recipes.resolve_amp(None, torch.device("cpu")) is None


def test_bf16_autocast_on_cpu_runs_convolutions_in_bfloat16():
    """amp='bf16' is honoured on a CPU (autocast): convolutions see bf16, weights stay float32."""
    from imclass.workflows.recipes import resolve_amp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    seen = []
    model[0].register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    clf = Classifier(model, classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3, device="cpu")
    clf.compile("sgd", lr=0.1, amp="bf16")
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (16,))
    history = clf.fit((x, y), epochs=2, batch_size=8, verbose=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert clf.predict_proba(x).dtype == torch.float32
    seen.clear()
    clf.predict(x)  # predictions stay float32 on a CPU: the same figures as the model loaded from its file
    assert set(seen) == {torch.float32}
    with pytest.warns(UserWarning, match="fp16 amp and compile apply on CUDA only"):
        Classifier(torch.nn.Linear(3, 2), device="cpu").compile("sgd", amp="fp16")
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16" and resolve_amp(None, torch.device("cuda")) is None


def test_predict_features_are_the_penultimate_layer_on_normalised_images():
    from imclass.layers import Dense, Flatten, Sequential

    torch.manual_seed(0)
    model = Sequential([Flatten(input_shape=(3, 4, 4)), Dense(5, activation="relu"), Dense(3, activation="softmax")])
    mean, std = torch.tensor([0.5, 0.25, 0.4]), torch.tensor([0.2, 0.1, 0.3])
    clf = Classifier(model, classes=["a", "b", "c"], mean=mean.tolist(), std=std.tolist(), device="cpu")
    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    x = (images.float() / 255 - mean[:, None, None]) / std[:, None, None]
    expected = torch.relu(model.dense(x.flatten(1)))  # the hidden Dense's output: what the classifier sees
    torch.testing.assert_close(clf.predict_features(images, batch_size=3), expected)
    with pytest.raises(TypeError, match="no forward_features/forward_head"):
        Classifier(nn.Linear(1, 3), mean=[0.0], std=[1.0], device="cpu").predict_features(torch.zeros(1, 1, 1, 1))

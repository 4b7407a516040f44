"""The course's Keras listings run as written on the one engine; Keras's losses, optimizers,
schedules, callbacks and functional API behave as Keras documents them."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

import imclass
from imclass.callbacks import Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint, ReduceLROnPlateau
from imclass.layers import (
    Add,
    Concatenate,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    MaxPooling2D,
)
from imclass.losses import BinaryCrossentropy, CategoricalCrossentropy, SparseCategoricalCrossentropy
from imclass.models import Input, Model, Sequential, load_model
from imclass.optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, RMSprop
from imclass.optimizers.schedules import CosineDecay, ExponentialDecay, PiecewiseConstantDecay
from imclass.utils import to_categorical

DATA = Path(os.environ.get("IMCLASS_DATA", "/work/shared/data"))
CIFAR = DATA / "cifar10" / "cifar10.npz"


class LRLog(Callback):
    """Records the learning rate each batch was trained with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_batch_end(self, state) -> None:
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def features(n=60, d=20, classes=3, seed=0):
    """Linearly separable float features (N, d) with integer labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


def mlp(d=20, classes=3, final="softmax"):
    model = Sequential()
    model.add(Dense(16, input_dim=d, activation="relu"))
    model.add(Dense(classes, activation=final))
    return model


# ----------------------------------------------------------------------------- the listings


def test_listing_1_dense_stack_trains_on_features():
    model = Sequential()
    model.add(Dense(100, input_dim=200, activation='relu'))
    model.add(Dense(50, activation='relu'))
    model.add(Dense(5, activation='softmax'))
    assert model.output_shape == (5,) and model.final_activation == "softmax"
    assert sum(p.numel() for p in model.parameters()) == 200 * 100 + 100 + 100 * 50 + 50 + 50 * 5 + 5  # Keras: 25,405
    x, y = features(40, 200, 5)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=Adam(learning_rate=1e-3), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    p = model.predict(x)
    assert p.shape == (40, 5) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_listing_2_conv_shapes():
    model = Sequential()
    model.add(Conv2D(6, (5, 5), activation='relu', input_shape=(32, 32, 3)))
    model.add(Conv2D(10, (5, 5), activation='relu'))
    model.add(MaxPooling2D(pool_size=(2, 2)))
    assert model.output_shape == (10, 12, 12)  # 32 -5+1 = 28, -5+1 = 24, /2 = 12
    assert model.output.keras_shape == (None, 12, 12, 10)
    assert model.input.keras_shape == (None, 32, 32, 3)
    assert sum(p.numel() for p in model.parameters()) == (5 * 5 * 3 * 6 + 6) + (5 * 5 * 6 * 10 + 10)
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10, 12, 12)


@pytest.fixture(scope="module")
def cifar_100px():
    if not CIFAR.is_file():
        pytest.skip(f"CIFAR-10 not found at {CIFAR} (set IMCLASS_DATA)")
    with np.load(CIFAR) as f:
        keys = {k: f[k] for k in f.files}
    x = next(v for k, v in keys.items() if "x" in k.lower() and "train" in k.lower())[:48]
    y = next(v for k, v in keys.items() if "y" in k.lower() and "train" in k.lower())[:48]
    t = torch.from_numpy(x)
    if t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    big = F.interpolate(t.float(), size=(100, 100), mode="bilinear", align_corners=False)
    x_nhwc = big.permute(0, 2, 3, 1).numpy() / 255.0  # channels last, divided by 255: what Keras users hold
    return x_nhwc.astype(np.float32), to_categorical(y.astype(np.int64), 10)


def test_listing_3_course_cnn_on_100px_cifar(cifar_100px, tmp_path):
    x, y_onehot = cifar_100px
    x_train, y_train, x_test, y_test = x[:32], y_onehot[:32], x[32:], y_onehot[32:]
    model = Sequential()
    model.add(Conv2D(32, (3, 3), activation='relu', input_shape=(100, 100, 3)))
    model.add(Conv2D(32, (3, 3), activation='relu'))
    model.add(MaxPooling2D(pool_size=(2, 2)))
    model.add(Dropout(0.25))
    model.add(Conv2D(64, (3, 3), activation='relu'))
    model.add(Conv2D(64, (3, 3), activation='relu'))
    model.add(MaxPooling2D(pool_size=(2, 2)))
    model.add(Dropout(0.25))
    model.add(Flatten())
    model.add(Dense(256, activation='relu'))
    model.add(Dropout(0.5))
    model.add(Dense(10, activation='softmax'))
    model.compile(loss='categorical_crossentropy', optimizer=Adam(lr = 0.001))
    model.fit(x_train, y_train, batch_size=32, epochs=1)
    score = model.evaluate(x_test, y_test, batch_size=32)
    assert isinstance(score, float) and math.isfinite(score)
    # the score is the mean categorical cross-entropy of the predicted probabilities (sklearn's log_loss)
    p = model.predict(x_test)
    assert score == pytest.approx(log_loss(y_test.argmax(1), p, labels=range(10)), rel=1e-4)
    # one engine, one checkpoint format: the model file round trip predicts the same
    saved = model.save(tmp_path / "cnn.safetensors")
    again = load_model(saved)
    np.testing.assert_allclose(again.predict(x_test), p, atol=1e-5)
    assert again.evaluate(x_test, y_test) == pytest.approx(score, rel=1e-5)


def test_keras2_script_with_validation_split_and_checkpoint(tmp_path):
    x, y = features(50, 20, 3)
    y_train = to_categorical(y, 3)
    model = mlp()
    model.compile(loss="categorical_crossentropy", optimizer=SGD(lr=0.05, momentum=0.9, nesterov=True, decay=1e-3),
                  metrics=["accuracy"])
    ckpt = ModelCheckpoint(filepath=str(tmp_path / "weights.{epoch:02d}.safetensors"), monitor="val_loss")
    history = model.fit(x, y_train, batch_size=8, epochs=2, validation_split=0.2, callbacks=[ckpt], verbose=2)
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history.history["val_loss"]) == 2
    # Keras holds out the last 20 % (before shuffling): the logged validation numbers are those of x[40:]
    loss, acc = model.evaluate(x[40:], y_train[40:], verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(loss, rel=1e-5)
    assert history.history["val_accuracy"][-1] == pytest.approx(acc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.01.safetensors", "weights.02.safetensors"]
    last = load_model(tmp_path / "weights.02.safetensors")
    np.testing.assert_allclose(last.predict(x), model.predict(x), atol=1e-6)


def test_one_line_per_epoch_when_stdout_is_not_a_terminal(capsys):
    x, y = features(24, 20, 3)
    model = mlp()
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    model.fit(x, y, epochs=3, batch_size=8)  # verbose="auto": a progress bar on a terminal, lines in logs
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert "\r" not in out and "loss: " in lines[0]


# ----------------------------------------------------------------------------- data the way Keras users hold it


def test_channels_last_first_uint8_and_float_give_the_same_predictions():
    torch.manual_seed(0)
    model = Sequential([Conv2D(4, 3, activation="relu"), Flatten(), Dense(3, activation="softmax")], input_shape=(8, 8, 3))
    x = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    p_uint8 = model.predict(x)
    np.testing.assert_allclose(model.predict(x.astype(np.float64) / 255.0), p_uint8, atol=1e-6)
    np.testing.assert_allclose(model.predict(torch.from_numpy(x).permute(0, 3, 1, 2)), p_uint8, atol=1e-6)
    expected = torch.softmax(model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255), 1).detach().numpy()
    np.testing.assert_allclose(p_uint8, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 8, 8, 3\) \(channels last\) or \(N, 3, 8, 8\)"):
        model.predict(np.zeros((2, 9, 9, 3), np.float32))


def test_binary_crossentropy_with_one_sigmoid_output():
    x, y = features(40, 20, 2, seed=3)
    model = mlp(classes=1, final="sigmoid")
    assert model.final_activation == "sigmoid"
    model.compile(loss="binary_crossentropy", optimizer=Adam(learning_rate=0.01), metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    p = model.predict(x)
    assert p.shape == (40, 1) and ((p >= 0) & (p <= 1)).all()
    loss, acc = model.evaluate(x, y, verbose=0)
    assert loss == pytest.approx(log_loss(y, p[:, 0]), rel=1e-4)
    assert acc == pytest.approx(((p[:, 0] > 0.5) == y).mean())


# ----------------------------------------------------------------------------- losses, optimizers, schedules


def test_losses_match_sklearn_and_torch():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(6, 4)).astype(np.float32))
    probs = logits.softmax(1)
    y = np.array([0, 3, 1, 2, 2, 0])
    expected = log_loss(y, probs.numpy(), labels=range(4))
    assert float(CategoricalCrossentropy()(to_categorical(y, 4), probs)) == pytest.approx(expected, rel=1e-5)
    assert float(CategoricalCrossentropy(from_logits=True)(to_categorical(y, 4), logits)) == pytest.approx(expected, rel=1e-5)
    assert float(SparseCategoricalCrossentropy()(y, probs)) == pytest.approx(expected, rel=1e-5)
    soft = np.full((6, 4), 0.25, np.float32)
    assert float(CategoricalCrossentropy(from_logits=True)(soft, logits)) == pytest.approx(
        float(-(torch.from_numpy(soft) * logits.log_softmax(1)).sum(1).mean()), rel=1e-5)
    p1 = torch.sigmoid(logits[:, :1])
    yb = np.array([0, 1, 1, 0, 1, 0])
    assert float(BinaryCrossentropy()(yb, p1)) == pytest.approx(log_loss(yb, p1[:, 0].numpy()), rel=1e-5)
    smoothed = yb * 0.8 + 0.1  # Keras: y * (1 - s) + s / 2
    assert float(BinaryCrossentropy(from_logits=True, label_smoothing=0.2)(yb, logits[:, :1])) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor(smoothed, dtype=torch.float32))), rel=1e-5)


def test_labels_that_do_not_fit_the_loss_say_what_it_expects():
    x, y = features(12, 20, 3)
    model = mlp()
    model.compile(loss="categorical_crossentropy", optimizer="adam")
    with pytest.raises(ValueError, match=r"categorical_crossentropy expects one-hot .*\(N, 3\).*to_categorical\(y, 3\)"):
        model.fit(x, y, verbose=0)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    with pytest.raises(ValueError, match=r"sparse_categorical_crossentropy expects integer .*use loss='categorical_crossentropy'"):
        model.fit(x, to_categorical(y, 3), verbose=0)
    with pytest.raises(ValueError, match=r"expects labels in 0..2 .*values from 7 to 7"):
        model.fit(x, np.full(12, 7), verbose=0)
    model.compile(loss="binary_crossentropy", optimizer="adam")
    with pytest.raises(ValueError, match=r"binary_crossentropy expects a model with one \(sigmoid\) output, this model has 3"):
        model.fit(x, y % 2, verbose=0)
    with pytest.raises(ValueError, match=r"unknown loss 'hinge_loss'"):
        model.compile(loss="hinge_loss", optimizer="adam")
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamax'"):
        model.compile(loss="categorical_crossentropy", optimizer="adamax")
    with pytest.raises(ValueError, match=r"unknown metric 'f1'"):
        model.compile(loss="categorical_crossentropy", metrics=["f1"])
    with pytest.raises(ValueError, match="compile needs a loss"):
        model.compile(optimizer="adam")
    with pytest.raises(RuntimeError, match=r"call model.compile\(loss=..., optimizer=...\) before model.fit"):
        mlp().fit(x, y)
    with pytest.raises(ValueError, match="give learning_rate or lr"):
        Adam(learning_rate=0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 20\) for a model with input_dim=20"):
        model.predict(x[:, :5])


def test_keras2_decay_is_time_based():
    x, y = features(32, 20, 3)
    model = mlp()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=SGD(lr=0.1, decay=0.5))
    log = LRLog()
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[log], verbose=0)
    assert log.lrs == pytest.approx([0.1 / (1 + 0.5 * t) for t in range(8)])


def test_one_sgd_step_with_decay_matches_the_formula():
    # the second update of plain SGD uses lr / (1 + decay * 1): check the weights numerically
    torch.manual_seed(0)
    model = Sequential([Dense(2, input_dim=3)])
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0])

    class Snap(Callback):
        def __init__(self):
            self.params = []

        def on_batch_end(self, state):
            self.params.append([p.detach().clone() for p in state.model.parameters()])

    snap = Snap()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=SGD(learning_rate=0.5, decay=1.0))
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, callbacks=[snap], verbose=0)
    (w1, b1), (w2, b2) = snap.params
    w, b = w1.clone().requires_grad_(), b1.clone().requires_grad_()
    F.cross_entropy(torch.from_numpy(x[2:]) @ w.T + b, torch.from_numpy(y[2:])).backward()
    lr = 0.5 / (1 + 1.0 * 1)  # Keras 2: lr / (1 + decay * iterations), iterations = 1 before the second update
    torch.testing.assert_close(w2, w1 - lr * w.grad)
    torch.testing.assert_close(b2, b1 - lr * b.grad)


def test_schedules_follow_their_formulas_and_drive_training():
    e = ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert [e(s) for s in (0, 5, 10, 20)] == pytest.approx([0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.025])
    es = ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=True)
    assert [es(s) for s in (0, 9, 10, 19, 20)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    pc = PiecewiseConstantDecay(boundaries=[2, 4], values=[1.0, 0.5, 0.1])
    assert [pc(s) for s in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1]  # Keras: values[i] while step <= boundaries[i]
    c = CosineDecay(1.0, decay_steps=10, alpha=0.1)
    assert [c(s) for s in (0, 5, 10, 15)] == pytest.approx([1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])
    with pytest.raises(ValueError, match="one more value than boundaries"):
        PiecewiseConstantDecay([1, 2], [1.0])
    x, y = features(32, 20, 3)
    model = mlp()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=Adam(learning_rate=pc))
    log = LRLog()
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[log], verbose=0)
    assert log.lrs == pytest.approx([pc(t) for t in range(8)])


def test_optimizer_objects_build_torch_optimizers_with_keras_arguments():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = SGD(learning_rate=0.01, momentum=0.9, nesterov=True).build(params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = AdamW(lr=1e-3).build(params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.004
    rms = RMSprop(rho=0.8).build(params)
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["alpha"] == 0.8 and rms.defaults["lr"] == 0.001
    assert Adagrad().build(params).defaults["initial_accumulator_value"] == 0.1
    assert isinstance(Adadelta(rho=0.9).build(params), torch.optim.Adadelta)
    # the engine takes them too
    clf = imclass.Classifier(mlp()).compile(RMSprop(learning_rate=0.002), loss="sparse_categorical_crossentropy")
    assert isinstance(clf.optimizer, torch.optim.RMSprop) and clf.config.optimizer == "rmsprop" and clf.config.lr == 0.002


def test_reduce_lr_on_plateau_and_learning_rate_scheduler():
    class Fake:  # just what the callbacks read: logs, epoch, optimizer
        def __init__(self, opt):
            self.optimizer, self.logs, self.epoch = opt, {}, 0

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.param_groups[0]["initial_lr"] = 1.0
    state = Fake(opt)
    cb = ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=0.2)
    lrs = []
    for epoch, v in enumerate([1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.94, 0.95]):
        state.epoch, state.logs = epoch, {"val_loss": v}
        cb.on_epoch_end(state)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2]
    x, y = features(16, 20, 3)
    model = mlp()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=SGD(lr=0.1))
    log = LRLog()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5 ** epoch), log])
    assert log.lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    # Keras's EarlyStopping defaults: patience=0 stops at the first epoch without an improvement > min_delta
    history = model.fit(x, y, batch_size=8, epochs=10, verbose=0, callbacks=[EarlyStopping(monitor="loss", min_delta=10.0)])
    assert len(history.history["loss"]) == 2


def test_to_categorical():
    np.testing.assert_array_equal(to_categorical([2, 0, 1]), np.eye(3, dtype=np.float32)[[2, 0, 1]])
    assert to_categorical(np.array([[1], [3]]), 5).shape == (2, 5)
    with pytest.raises(ValueError, match="label 4 does not fit num_classes=3"):
        to_categorical([4], 3)
    with pytest.raises(ValueError, match="integer class labels"):
        to_categorical([0.5])


# ----------------------------------------------------------------------------- functional API


def test_residual_block_with_add_and_concatenate(tmp_path):
    torch.manual_seed(0)
    x = Input(shape=(12, 12, 3))
    y = Conv2D(8, 3, padding="same", activation="relu")(x)
    z = Conv2D(8, 3, padding="same")(y)
    z = Add()([y, z])
    c = Concatenate()([y, z])
    assert z.shape == (8, 12, 12) and c.shape == (16, 12, 12)
    out = Dense(4, activation="softmax")(GlobalAveragePooling2D()(c))
    model = Model(inputs=x, outputs=out)
    assert isinstance(model, torch.nn.Module) and model.final_activation == "softmax"
    assert model.input is x and model.output is out
    t = torch.randn(2, 3, 12, 12)
    # the graph computes exactly conv -> relu -> conv, + skip, concat channels, mean, dense
    y_ = torch.relu(model.conv2d(t))
    z_ = model.conv2d_1(y_) + y_
    expected = model.dense(torch.cat([y_, z_], 1).mean((2, 3)))
    torch.testing.assert_close(model(t), expected)
    # Keras-style training and the model file round trip
    images = np.random.default_rng(0).random((8, 12, 12, 3), dtype=np.float32)
    labels = np.arange(8) % 4
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(images, labels, epochs=1, batch_size=4, verbose=0)
    again = load_model(model.save(tmp_path / "res.safetensors"))
    assert type(again).__name__ == "Model"
    np.testing.assert_allclose(again.predict(images), model.predict(images), atol=1e-6)
    assert imclass.io.read_metadata(tmp_path / "res.safetensors")["architecture"]["functional"]["nodes"][3]["inbound"] == [0, 2]


def test_functional_errors_and_shared_layers():
    x = Input(shape=(4,))
    with pytest.raises(ValueError, match=r"Add expects inputs of one shape, received \(N, 3\), \(N, 5\)"):
        Add()([Dense(3)(x), Dense(5)(x)])
    with pytest.raises(ValueError, match="merges several tensors"):
        Sequential([Add()], input_shape=(4,))
    other = Input(shape=(4,))
    with pytest.raises(ValueError, match="not among the model's inputs"):
        Model(inputs=x, outputs=Add()([Dense(3)(x), Dense(3)(other)]))
    with pytest.raises(TypeError, match="symbolic tensors"):
        Dense(3)(np.zeros((2, 4)))
    shared = Dense(4)
    model = Model(x, shared(shared(x)))  # one layer called twice: one set of weights
    assert sum(p.numel() for p in model.parameters()) == 4 * 4 + 4
    t = torch.randn(3, 4)
    torch.testing.assert_close(model(t), model.dense(model.dense(t)))


def test_head_on_a_sequential_backbone_through_input_and_output():
    base = Sequential([Conv2D(4, 3, activation="relu"), Flatten(), Dense(6, activation="softmax")], input_shape=(8, 8, 3))
    head = Dense(2, activation="softmax")(base.output)
    model = Model(inputs=base.input, outputs=head)
    t = torch.randn(2, 3, 8, 8)
    # inside the bigger model the backbone's softmax is applied (it is no longer the last layer)
    torch.testing.assert_close(model(t), model.dense(torch.softmax(base(t), 1)))
    assert list(model.parameters())[0] is list(base.parameters())[0]  # shared weights, as in Keras


def test_the_engine_takes_one_hot_labels_and_one_output_binary_models():
    x, y = features(24, 20, 3)
    images = torch.from_numpy(x).reshape(24, 1, 1, 20)  # flat features as the engine carries them
    clf = imclass.Classifier(mlp(), mean=[0.0], std=[1.0]).compile("adam", lr=0.01)
    clf.fit((images, to_categorical(y, 3)), epochs=2, batch_size=8, verbose=0)
    assert clf.classes == ["0", "1", "2"]
    one_hot = clf.evaluate((images, to_categorical(y, 3)))
    assert one_hot == pytest.approx(clf.evaluate((images, y)))  # one-hot rows = their integer labels
    with pytest.raises(ValueError, match=r"expected one-hot labels with 3 columns"):
        clf.evaluate((images, to_categorical(y, 4)))
    binary = imclass.Classifier(mlp(classes=1, final="sigmoid"), mean=[0.0], std=[1.0]).compile(
        "adam", loss="binary_crossentropy")
    binary.fit((images, y % 2), epochs=1, batch_size=8, verbose=0)
    proba = binary.predict_proba(images)
    p1 = torch.sigmoid(binary.predict_logits(images))[:, 0]
    torch.testing.assert_close(proba, torch.stack([1 - p1, p1], 1))
    assert torch.equal(binary.predict(images), (p1 > 0.5).long())

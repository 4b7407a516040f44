"""Callbacks: event order, early stopping, CSV / TensorBoard / PNG files, checkpoints, progress bar, LR finder."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from imclass.train import (
    Callback,
    Classifier,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    ProgressBar,
    TensorBoard,
    TrainingCurves,
)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


@pytest.fixture(scope="module")
def data(cifar_small):
    x, y, xt, yt = cifar_small
    return (x[:128], y[:128]), (xt[:64], yt[:64])


class Recorder(Callback):
    def __init__(self, name, log, order=0):
        self.name, self.log, self.order = name, log, order

    def on_train_begin(self, state):
        self.log.append((self.name, "train_begin"))

    def on_epoch_begin(self, state):
        self.log.append((self.name, f"epoch_begin {state.epoch}"))

    def on_batch_begin(self, state):
        self.log.append((self.name, f"batch_begin {state.batch}"))

    def on_batch_end(self, state):
        self.log.append((self.name, f"batch_end {state.batch} step {state.step}"))

    def on_epoch_end(self, state):
        self.log.append((self.name, f"epoch_end {state.epoch} {sorted(state.logs)}"))

    def on_train_end(self, state):
        self.log.append((self.name, "train_end"))


def test_events_fire_in_order_and_callbacks_sort_by_order(data):
    train, val = data
    log = []
    clf = Classifier(tiny()).compile("sgd", lr=0.01)
    clf.fit(train, epochs=2, batch_size=64, validation=val, callbacks=[Recorder("late", log, 5), Recorder("early", log, -1)],
            verbose=False)
    keys = "['accuracy', 'epoch', 'loss', 'lr', 'seconds', 'val_accuracy', 'val_loss']"
    expected_events = ["train_begin"]
    step = 0
    for epoch in range(2):
        expected_events.append(f"epoch_begin {epoch}")
        for b in range(2):
            step += 1
            expected_events += [f"batch_begin {b}", f"batch_end {b} step {step}"]
        expected_events.append(f"epoch_end {epoch} {keys}")
    expected_events.append("train_end")
    assert log == [(name, e) for e in expected_events for name in ("early", "late")]


def test_stop_training_ends_after_the_current_batch(data):
    train, _ = data

    class StopAt(Callback):
        def on_batch_end(self, state):
            if state.step == 3:
                state.stop_training = True

    h = Classifier(tiny()).compile("sgd", lr=0.01).fit(train, epochs=5, batch_size=32, callbacks=[StopAt()],
                                                        verbose=False)
    assert h["epoch"] == [1]


def test_early_stopping_stops_and_restores_the_best_weights(data):
    train, val = data
    values = iter([1.0, 0.5, 0.6, 0.55, 0.7, 0.4, 0.3])
    snapshots = []

    class FakeMetric(Callback):  # runs before EarlyStopping (order 50): injects a known val_loss
        order = 10

        def on_epoch_end(self, state):
            state.logs["val_loss"] = next(values)
            snapshots.append({k: v.clone() for k, v in state.model.state_dict().items()})

    stopper = EarlyStopping("val_loss", patience=2, restore_best=True)
    clf = Classifier(tiny()).compile("sgd", lr=0.05)
    h = clf.fit(train, epochs=7, batch_size=32, callbacks=[FakeMetric(), stopper], verbose=False)
    assert h["epoch"] == [1, 2, 3, 4]  # best at epoch 2, no improvement in epochs 3 and 4 (patience 2) -> stop
    assert stopper.best == 0.5 and stopper.best_epoch == 1 and stopper.stopped_epoch == 3
    assert all(torch.equal(v, snapshots[1][k]) for k, v in clf.model.state_dict().items())
    with pytest.raises(KeyError, match="val_accuracy"):
        Classifier(tiny()).compile().fit(train, epochs=1, callbacks=[EarlyStopping("val_accuracy")], verbose=False)


def test_csv_tensorboard_curves_and_model_checkpoint_files(data, tmp_path):
    train, val = data
    cbs = [
        CSVLogger(tmp_path / "history.csv"),
        TensorBoard(tmp_path / "tb"),
        TrainingCurves(tmp_path / "curves.png"),
        ModelCheckpoint(tmp_path / "best.safetensors", monitor="val_accuracy"),
        ModelCheckpoint(tmp_path / "epoch{epoch}.safetensors", save_best_only=False, every=2),
    ]
    clf = Classifier(tiny()).compile("adam", lr=1e-3)
    h = clf.fit(train, epochs=3, batch_size=32, validation=val, callbacks=cbs, verbose=False)
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(h["val_loss"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "epoch2.safetensors").is_file()
    assert not (tmp_path / "epoch1.safetensors").exists() and not (tmp_path / "epoch3.safetensors").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "epoch/val_accuracy" in scalars
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx(h["loss"])


def test_progress_bar_shows_loss_accuracy_and_throughput(data, capsys):
    train, _ = data
    Classifier(tiny()).compile().fit(train, epochs=1, batch_size=32, callbacks=[ProgressBar(refresh_every=2)])
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "accuracy=" in err and "img/s=" in err


def test_lr_find_returns_a_curve_and_leaves_the_model_untouched(data, tmp_path):
    train, _ = data
    clf = Classifier(tiny()).compile("sgd", lr=0.01)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    result = clf.lr_find(train, start_lr=1e-4, end_lr=100, num_steps=30, batch_size=16, plot=tmp_path / "lr.png")
    assert 5 < len(result.lrs) <= 30 and len(result.losses) == len(result.lrs)
    assert result.lrs[0] == pytest.approx(1e-4) and result.lrs[1] == pytest.approx(1e-4 * (1e6) ** (1 / 29))
    assert 1e-4 <= result.suggestion <= 100
    assert (tmp_path / "lr.png").is_file()
    assert all(torch.equal(v, before[k]) for k, v in clf.model.state_dict().items())
    assert len(clf.history) == 0


def test_model_checkpoint_writes_an_imclass_model_file_for_registry_models(data, tmp_path):
    import imclass
    from imclass.models import create

    train, val = data
    torch.manual_seed(0)
    clf = Classifier(create("mlp", hidden=[32])).compile("adam", lr=1e-3)
    clf.fit(train, epochs=2, batch_size=32, validation=val, verbose=False,
            callbacks=[ModelCheckpoint(tmp_path / "last.safetensors", save_best_only=False)])
    loaded = imclass.load(tmp_path / "last.safetensors")
    assert loaded.mean == pytest.approx(clf.mean) and loaded.classes == clf.classes
    assert torch.allclose(loaded.predict_logits(val[0]), clf.predict_logits(val[0]), atol=1e-6)

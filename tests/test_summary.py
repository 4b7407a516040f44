"""summary(): output shapes and parameter counts against hand computation, for any nn.Module."""
from __future__ import annotations

import pytest
import torch.nn as nn

import imclass
import imclass.models as models
from imclass.layers import Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential
from imclass.summarize import summary, summary_rows


def quiet_summary(model, input_shape=None, **kw):
    lines: list[str] = []
    total = summary(model, input_shape, print_fn=lines.append, **kw)
    return total, "\n".join(lines)


@pytest.mark.parametrize("stride, side", [(1, 5), (2, 3)])
def test_course_conv_arithmetic_7x7_input_3x3_filter(stride, side):
    conv = nn.Conv2d(1, 1, 3, stride=stride)
    rows = summary_rows(conv, (1, 7, 7))
    assert [r.output_shape for r in rows] == [(None, 1, side, side)]
    total, text = quiet_summary(conv, (1, 7, 7), arithmetic=True)
    assert total == 3 * 3 + 1
    assert f"(7 - 3 + 2*0)/{stride} + 1 = {side}" in text
    assert f"(N, 1, {side}, {side})" in text


def test_course_mlp_total_and_rows():
    model = Sequential([Dense(100, input_dim=200, activation="relu"), Dense(50, activation="relu"),
                        Dense(5, activation="softmax")])
    total, text = quiet_summary(model)
    assert total == (200 * 100 + 100) + (100 * 50 + 50) + (50 * 5 + 5) == 25405
    assert "Total params: 25,405" in text and "Final activation: softmax" in text
    rows = summary_rows(model)
    assert [(r.name, r.output_shape, r.params) for r in rows if r.params] == [
        ("dense", (None, 100), 20100), ("dense_1", (None, 50), 5050), ("dense_2", (None, 5), 255)]


def test_keras_cnn_shapes_follow_the_conv_arithmetic():
    model = Sequential([
        Conv2D(32, (3, 3), padding="same", activation="relu", input_shape=(32, 32, 3)),
        Conv2D(32, (3, 3), activation="relu"),
        MaxPooling2D(pool_size=(2, 2)),
        Dropout(0.25),
        Conv2D(64, (3, 3), padding="same", activation="relu"),
        Conv2D(64, (3, 3), activation="relu"),
        MaxPooling2D(pool_size=(2, 2)),
        Dropout(0.25),
        Flatten(),
        Dense(512, activation="relu"),
        Dropout(0.5),
        Dense(10, activation="softmax"),
    ])
    total, text = quiet_summary(model)
    assert total == 1_250_858 and "Total params: 1,250,858" in text
    spatial = [r.output_shape[2] for r in summary_rows(model) if r.kind in ("Conv2d", "MaxPool2d")]
    assert spatial == [32, 30, 15, 15, 13, 6]


def test_any_module_with_frozen_parameters_and_channels_last_shape():
    model = models.create("resnet20")
    for p in model.stem.parameters():
        p.requires_grad_(False)
    model.train()
    total, text = quiet_summary(model, (32, 32, 3))  # channels-last, converted
    stem = 3 * 9 * 16 + 2 * 16  # conv without bias, batch norm weight and bias
    assert total == 269_722
    assert f"Non-trainable params: {stem:,}" in text and f"Trainable params: {269_722 - stem:,}" in text
    assert model.training  # the summary's eval-mode pass leaves the mode as it found it
    rows = summary_rows(model, (3, 32, 32))
    assert sum(r.params for r in rows) == total
    assert rows[-1].name == "fc" and rows[-1].output_shape == (None, 10)


def test_a_module_called_twice_counts_its_parameters_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    rows = summary_rows(Twice(), (4,))
    assert [(r.name, r.params) for r in rows] == [("fc", 20), ("fc", 0)]


def test_top_level_summary_is_callable_more_than_once():
    conv = nn.Conv2d(3, 2, 1)
    assert imclass.summary(conv, (3, 4, 4), print_fn=lambda line: None) == 8
    assert imclass.summary(conv, (3, 4, 4), print_fn=lambda line: None) == 8


def test_missing_input_shape_is_explained():
    with pytest.raises(ValueError, match="expected input_shape"):
        summary(nn.Linear(2, 3), print_fn=lambda line: None)

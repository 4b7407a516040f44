"""Course layers and Sequential: shape inference, argument errors, activations, config round trips."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imclass
from imclass.activations import Maxout, create_activation
from imclass.layers import (
    Activation,
    AveragePooling2D,
    BatchNormalization,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    LeakyReLU,
    MaxPooling2D,
    Sequential,
    conv_output_size,
    to_channels_first,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two fighting


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def keras_cifar_cnn(dense: int = 256) -> Sequential:
    # The definition, line for line as in Keras.
    return Sequential([
        Conv2D(32, (3, 3), padding="same", activation="relu", input_shape=(32, 32, 3)),
        Conv2D(32, (3, 3), activation="relu"),
        MaxPooling2D(pool_size=(2, 2)),
        Dropout(0.25),
        Conv2D(64, (3, 3), padding="same", activation="relu"),
        Conv2D(64, (3, 3), activation="relu"),
        MaxPooling2D(pool_size=(2, 2)),
        Dropout(0.25),
        Flatten(),
        Dense(dense, activation="relu"),
        Dropout(0.5),
        Dense(10, activation="softmax"),
    ])


# ----------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("given, expected", [
    ((32, 32, 3), (3, 32, 32)),
    ((28, 28, 1), (1, 28, 28)),
    ((64, 48, 4), (4, 64, 48)),
    ((3, 32, 32), (3, 32, 32)),
    ((1, 28, 28), (1, 28, 28)),
    ((3, 32, 3), (3, 32, 3)),  # first entry is a channel count: channels-first wins
    ((28, 28), (1, 28, 28)),
    (784, (784,)),
    ((200,), (200,)),
    (torch.Size([3, 8, 8]), (3, 8, 8)),
])
def test_input_shape_rule(given, expected):
    assert to_channels_first(given) == expected


@pytest.mark.parametrize("bad", [(0, 3), (1, 2, 3, 4), "abc", (2.5, 3), True, ()])
def test_bad_input_shape_is_explained(bad):
    with pytest.raises(ValueError, match="input shape"):
        to_channels_first(bad)


def test_channels_last_input_shape_builds_a_channels_first_model():
    model = Sequential([Conv2D(8, 3, input_shape=(32, 32, 3))])
    assert model.input_shape == (3, 32, 32)
    assert model.conv2d.in_channels == 3
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 30, 30)


def test_wrong_input_shape_at_forward_names_both_shapes():
    model = keras_cifar_cnn()
    with pytest.raises(ValueError) as err:
        model(torch.zeros(2, 32, 32, 3))
    message = str(err.value)
    assert "expected input of shape (N, 3, 32, 32), received (N, 32, 32, 3)" in message
    assert "permute(0, 3, 1, 2)" in message
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, 32, 32\), received \(N, 3, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))


def test_flat_model_given_images_suggests_flattening():
    model = Sequential([Dense(10, input_dim=3 * 8 * 8)])
    with pytest.raises(ValueError, match=r"received \(N, 3, 8, 8\); flatten the input"):
        model(torch.zeros(2, 3, 8, 8))


def test_dense_on_images_without_flatten_suggests_flatten():
    with pytest.raises(ValueError, match=r"Dense expects flat input \(N, features\), received \(N, 8, 30, 30\).*Flatten\(\)"):
        Sequential([Conv2D(8, 3, input_shape=(32, 32, 3)), Dense(10)])


def test_conv_on_flat_input_is_explained():
    with pytest.raises(ValueError, match=r"Conv2D expects image input \(N, C, H, W\), received \(N, 200\)"):
        Sequential([Dense(200, input_dim=10), Conv2D(4, 3)])


def test_missing_input_shape_is_explained():
    with pytest.raises(ValueError, match="needs the input shape"):
        Sequential([Dense(10)])


def test_conflicting_input_shapes_are_explained():
    with pytest.raises(ValueError, match=r"input shape \(N, 3, 8, 8\).*model input is \(N, 3, 32, 32\)"):
        Sequential([Conv2D(4, 3, input_shape=(8, 8, 3))], input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="disagree"):
        Dense(4, input_dim=3, input_shape=(5,))


# ----------------------------------------------------------------------------- shape inference


def test_conv_arithmetic_of_the_course():
    assert conv_output_size(7, 3, stride=1) == 5
    assert conv_output_size(7, 3, stride=2) == 3
    assert conv_output_size(32, 5, stride=1, padding=2) == 32
    with pytest.raises(ValueError, match="does not fit"):
        conv_output_size(3, 5)
    model = Sequential([Conv2D(1, 3, strides=2)], input_shape=(7, 7, 1))
    assert model.output_shape == (1, 3, 3)
    assert Sequential([Conv2D(1, 3)], input_shape=(1, 7, 7)).output_shape == (1, 5, 5)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("kernel, stride", [(1, 1), (2, 1), (3, 1), (3, 2), (4, 2), (5, 3), ((3, 1), (1, 2))])
@pytest.mark.parametrize("size", [7, 8])
def test_inferred_conv_shape_matches_forward(padding, kernel, stride, size):
    model = Sequential([Conv2D(4, kernel, strides=stride, padding=padding)], input_shape=(2, size, size))
    out = model(torch.zeros(1, 2, size, size))
    assert tuple(out.shape[1:]) == model.output_shape
    if padding == "same":  # Keras: ceil(size / stride)
        strides = stride if isinstance(stride, tuple) else (stride, stride)
        assert model.output_shape[1:] == tuple(math.ceil(size / s) for s in strides)


def test_same_padding_puts_the_odd_row_at_the_bottom_right_like_keras():
    model = Sequential([Conv2D(1, 2, padding="same", use_bias=False)], input_shape=(1, 5, 5))
    x = torch.randn(1, 1, 5, 5)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), model.conv2d.weight)
    torch.testing.assert_close(model(x), expected)


def test_every_layer_infers_the_shape_it_produces():
    model = Sequential([
        Conv2D(8, 3, padding="same", activation="relu"),
        BatchNormalization(),
        AveragePooling2D(2),
        Conv2D(6, 3, strides=2, activation={"name": "maxout", "k": 2}),
        MaxPooling2D(2, strides=1),
        Activation("tanh"),
        GlobalAveragePooling2D(),
        Dense(12, activation="elu"),
        BatchNormalization(),
        Dropout(0.1),
        Activation("maxout", k=3),
        Dense(5),
    ], input_shape=(3, 17, 17))
    x = torch.randn(2, 3, 17, 17)
    shapes = []
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for name in [mods[-1] for mods in model._modules_of]]
    model(x)
    for h in hooks:
        h.remove()
    assert shapes == model._shapes
    assert model._shapes[3] == (6, 3, 3) and model._shapes[6] == (6,) and model._shapes[10] == (4,)


def test_the_course_mlp_counts_its_parameters():
    model = Sequential([
        Dense(100, input_dim=200, activation="relu"),
        Dense(50, activation="relu"),
        Dense(5, activation="softmax"),
    ])
    assert n_params(model) == (200 * 100 + 100) + (100 * 50 + 50) + (50 * 5 + 5) == 25405
    assert model(torch.randn(2, 200)).shape == (2, 5)


@pytest.mark.parametrize("dense", [256, 512])
def test_the_keras_cifar10_cnn_counts_its_parameters(dense):
    model = keras_cifar_cnn(dense)
    convs = (3 * 9 * 32 + 32) + (32 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 64 + 64)
    flat = 64 * 6 * 6  # 32 -> 32 -> 30 -> 15 -> 15 -> 13 -> 6
    assert n_params(model) == convs + (flat * dense + dense) + (dense * 10 + 10)
    if dense == 512:
        assert n_params(model) == 1_250_858  # Keras's own summary of examples/cifar10_cnn.py
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("make, message", [
    (lambda: Dense(-3), "expected a positive integer for units, received units=-3"),
    (lambda: Dense(2.5), "expected a positive integer for units, received units=2.5"),
    (lambda: Dense(4, input_dim=0), "expected a positive integer for input_dim, received input_dim=0"),
    (lambda: Conv2D(0, 3), "expected a positive integer for filters, received filters=0"),
    (lambda: Conv2D(8, 0), r"expected a positive integer or a pair of them for kernel_size, received kernel_size=0"),
    (lambda: Conv2D(8, 3, strides=(1, 2, 3)), r"for strides, received strides=\(1, 2, 3\)"),
    (lambda: Conv2D(8, 3, padding="full"), "expected padding='valid' or padding='same', received padding='full'"),
    (lambda: MaxPooling2D(0), "for pool_size, received pool_size=0"),
    (lambda: MaxPooling2D(2, padding="same"), "expected padding='valid' for MaxPooling2D"),
    (lambda: Dropout(1.5), r"expected a rate in \[0, 1\), received rate=1.5"),
    (lambda: BatchNormalization(momentum=1.0), "expected a momentum in"),
    (lambda: Dense(4, activation="relux"), "unknown activation 'relux'; expected one of"),
    (lambda: Activation("relu", alpha=0.2), r"activation 'relu' takes parameters none, received \['alpha'\]"),
    (lambda: Activation("maxout", k=0), "expected a positive integer for k"),
    (lambda: Dense(4, name="bad name"), "expected a layer name"),
])
def test_arguments_are_checked_in_init(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_numbers_are_accepted_and_configs_stay_json():
    import numpy as np

    model = Sequential([Dense(np.int64(4), activation={"name": "maxout", "k": np.int64(2)}, input_dim=np.int32(3)),
                        Dropout(np.float32(0.5))])
    assert model.output_shape == (4,)
    json.dumps(model.get_config())


def test_kernel_larger_than_input_is_explained():
    with pytest.raises(ValueError, match=r"kernel \(5, 5\) does not fit the input \(N, 1, 3, 3\)"):
        Sequential([Conv2D(2, 5)], input_shape=(1, 3, 3))


def test_adding_a_torch_module_is_explained():
    with pytest.raises(TypeError, match="expected a layer such as Dense"):
        Sequential([nn.Linear(3, 4)], input_shape=(3,))


def test_duplicate_layer_names_are_refused():
    with pytest.raises(ValueError, match="'fc' is used twice"):
        Sequential([Dense(4, name="fc", input_dim=3), Dense(2, name="fc")])


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("name, oracle", [
    ("sigmoid", torch.sigmoid),
    ("tanh", torch.tanh),
    ("relu", torch.relu),
    ("elu", F.elu),
    ("gelu", F.gelu),
    ("linear", lambda x: x),
    ("softmax", lambda x: torch.softmax(x, dim=1)),
    ("leaky_relu", lambda x: torch.where(x > 0, x, 0.1 * x)),
])
def test_activations_by_name_match_torch(name, oracle):
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(create_activation(name)(x), oracle(x))
    as_layer = Sequential([Dense(6, input_dim=6), Activation(name), Dense(2)]).double()
    torch.testing.assert_close(as_layer.forward_features(x), oracle(as_layer.dense(x)))


def test_leaky_relu_slope():
    x = torch.tensor([[-2.0, -1.0, 0.0, 3.0]])
    assert torch.equal(Sequential([Activation("leaky_relu")], input_shape=(4,))(x), torch.tensor([[-0.2, -0.1, 0.0, 3.0]]))
    assert torch.equal(Sequential([LeakyReLU(0.25)], input_shape=(4,))(x), torch.tensor([[-0.5, -0.25, 0.0, 3.0]]))
    dense = Sequential([Dense(3, activation="leaky_relu", input_dim=4), Dense(2)])
    assert dense.dense_leaky_relu.negative_slope == 0.1
    tuned = Sequential([Dense(3, activation=LeakyReLU(0.3), input_dim=4)])
    assert tuned.dense_leaky_relu.negative_slope == 0.3


def test_maxout_dense_keeps_units_and_takes_the_max_of_k_pieces():
    torch.manual_seed(0)
    model = Sequential([Dense(4, activation={"name": "maxout", "k": 3}, input_dim=5), Dense(2)])
    assert model.dense.out_features == 12 and model.output_shape == (2,)
    x = torch.randn(7, 5)
    out = model.forward_features(x)
    assert out.shape == (7, 4)
    pre = x @ model.dense.weight.T + model.dense.bias  # (7, 12)
    manual = torch.stack([pre[:, 3 * u: 3 * u + 3].max(dim=1).values for u in range(4)], dim=1)
    torch.testing.assert_close(out, manual)
    assert n_params(model) == (5 * 12 + 12) + (4 * 2 + 2)


def test_maxout_conv_and_standalone_maxout():
    model = Sequential([Conv2D(5, 3, activation="maxout")], input_shape=(2, 6, 6))
    assert model.conv2d.out_channels == 10 and model.output_shape == (5, 4, 4)
    assert model(torch.randn(2, 2, 6, 6)).shape == (2, 5, 4, 4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(Maxout(2)(x), torch.maximum(x[:, 0::2], x[:, 1::2]))
    with pytest.raises(ValueError, match="divisible by 4"):
        Sequential([Activation("maxout", k=4)], input_shape=(6,))


def test_final_softmax_is_recorded_not_applied():
    model = Sequential([Dense(3, activation="softmax", input_dim=4)])
    x = torch.randn(5, 4)
    assert model.final_activation == "softmax"
    torch.testing.assert_close(model(x), model.dense(x))  # logits
    separate = Sequential([Dense(3, input_dim=4), Activation("softmax")])
    assert separate.final_activation == "softmax"
    assert Sequential([Dense(3, input_dim=4)]).final_activation is None


def test_final_activation_can_be_restated_not_contradicted():
    model = Sequential([Dense(3, activation="softmax", input_dim=4)])
    model.final_activation = "softmax"  # e.g. a loader copying a model file's header
    with pytest.raises(ValueError, match="final activation is 'softmax' \\(set by its last layer\\), received None"):
        model.final_activation = None


def test_softmax_before_the_end_is_applied():
    model = Sequential([Dense(4, activation="softmax", input_dim=3), Dense(2)])
    features = model.forward_features(torch.randn(6, 3))
    torch.testing.assert_close(features.sum(dim=1), torch.ones(6))
    assert model.final_activation is None


# ----------------------------------------------------------------------------- head, config, state dict


def test_forward_features_and_head_compose_to_forward():
    model = keras_cifar_cnn().eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 256)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True) is features
    assert model.get_classifier() is model.dense_1


def test_reset_classifier_keeps_the_body():
    model = keras_cifar_cnn()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("dense_1")}
    keys = list(model.state_dict())
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    assert model.final_activation == "softmax" and model.get_config()["layers"][-1]["config"]["units"] == 3
    with pytest.raises(ValueError, match="expected a positive integer for num_classes"):
        model.reset_classifier(0)


def test_config_round_trip_gives_the_same_network():
    torch.manual_seed(0)
    model = Sequential([
        Conv2D(6, 3, strides=2, padding="same", activation=LeakyReLU(0.2)),
        BatchNormalization(momentum=0.9),
        MaxPooling2D(2),
        Conv2D(8, (3, 1), activation="maxout"),
        AveragePooling2D(1),
        GlobalAveragePooling2D(),
        Dense(7, activation={"name": "elu", "alpha": 0.5}, use_bias=False, name="hidden"),
        Dropout(0.2),
        LeakyReLU(),
        Dense(4, activation="softmax"),
    ], input_shape=(20, 20, 3))
    config = json.loads(json.dumps(model.get_config()))
    clone = Sequential.from_config(config)
    assert clone.get_config() == config
    clone.load_state_dict(model.state_dict())  # strict: same keys and shapes
    model.eval(), clone.eval()
    x = torch.randn(3, 3, 20, 20)
    assert torch.equal(model(x), clone(x))
    assert clone.final_activation == "softmax" and clone.hidden.bias is None


def test_from_config_rejects_unknown_layers():
    with pytest.raises(ValueError, match="unknown layer class 'Conv3D'"):
        Sequential.from_config({"input_shape": [3, 8, 8], "layers": [{"class_name": "Conv3D", "config": {}}]})
    with pytest.raises(ValueError, match="expected a Sequential config"):
        Sequential.from_config({"layers": []})


def test_batch_normalization_uses_keras_momentum():
    model = Sequential([BatchNormalization(), Flatten(), BatchNormalization(momentum=0.9)], input_shape=(2, 3, 3))
    assert isinstance(model.batch_normalization, nn.BatchNorm2d)
    assert model.batch_normalization.momentum == pytest.approx(0.01) and model.batch_normalization.eps == 1e-3
    assert isinstance(model.batch_normalization_1, nn.BatchNorm1d)
    assert model.batch_normalization_1.momentum == pytest.approx(0.1)


def test_add_and_pop_like_keras():
    model = Sequential(input_shape=(32, 32, 3))
    model.add(Conv2D(4, 3))
    model.add(Flatten())
    model.add(Dense(10))
    assert model.output_shape == (10,) and model.conv2d.in_channels == 3
    assert isinstance(model.pop(), Dense) and model.output_shape == (4 * 30 * 30,)
    assert "dense" not in dict(model.named_children())


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = keras_cifar_cnn()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.eval()  # no dropout noise: the same loss before and after
    before = F.cross_entropy(model(x), y)
    before.backward()
    optimizer.step()
    assert F.cross_entropy(model(x), y) < before


def test_sequential_is_exported_at_top_level():
    assert imclass.Sequential is Sequential

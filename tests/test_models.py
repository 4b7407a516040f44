"""The architecture registry: every model's contract, known parameter counts, timm, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

import imclass.models as models
from imclass.layers import Sequential
from imclass.models.resnet import PadShortcut, _wide

TIMM_SMALL = "timm:resnet10t"
ALL = [*models.names(), TIMM_SMALL]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two fighting


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(name: str, **options) -> torch.nn.Module:
    # 16x16 inputs keep the registry-wide tests fast; image-size-bound models are built for them.
    if name in ("mlp", "keras_cnn", "lenet5", "alexnet"):
        options["img_size"] = 16
    return models.create(name, **options)


@pytest.mark.parametrize("name", ALL)
def test_every_model_gives_logits_gradients_and_a_replaceable_head(name):
    torch.manual_seed(0)
    model = _small(name, num_classes=7)
    assert model.imclass_spec["name"] == name and model.imclass_spec["options"]["num_classes"] == 7
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 6])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # fastnet freezes some on purpose
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"

    # timm's contract: forward = forward_head(forward_features), a classifier that can be replaced
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape[0] == 2
        model.reset_classifier(4)
        assert model(x).shape == (2, 4)
    assert model.get_classifier().out_features == 4


@pytest.mark.parametrize("name", ["mlp", "keras_cnn", "lenet5", "alexnet", "resnet20", "resnet18_cifar", "fastnet"])
def test_models_take_other_channel_counts(name):
    model = _small(name, num_classes=3, in_chans=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("name, expected", [
    # He et al. 2016 CIFAR ResNets with option A shortcuts, 10 classes (e.g. akamaster/pytorch_resnet_cifar10)
    ("resnet20", 269_722),
    ("resnet32", 464_154),
    ("resnet44", 658_586),
    ("resnet56", 853_018),
    ("resnet110", 1_727_962),
    # kuangliu/pytorch-cifar ResNet18
    ("resnet18_cifar", 11_173_962),
    # Zagoruyko & Komodakis: WRN-16-4 "2.7M", WRN-28-10 "36.5M"
    ("wrn16_4", 2_748_890),
    ("wrn28_10", 36_479_194),
    ("keras_cnn", 658_218),
])
def test_known_parameter_counts(name, expected):
    assert n_params(models.create(name)) == expected


def test_lenet5_on_mnist_has_the_paper_count():
    model = models.create("lenet5", in_chans=1, img_size=28)
    by_hand = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n_params(model) == by_hand == 61_706
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="expected pooling='avg' or pooling='max'"):
        models.create("lenet5", pooling="min")


def test_course_mlp_from_the_registry():
    model = models.create("mlp", input_dim=200, num_classes=5)
    assert n_params(model) == 25_405 and model.final_activation == "softmax"
    assert model(torch.randn(2, 200)).shape == (2, 5)
    flat = models.create("mlp", in_chans=1, img_size=28)
    assert n_params(flat) == (784 * 100 + 100) + (100 * 50 + 50) + (50 * 10 + 10)


def test_keras_cnn_variant_with_512_units():
    assert n_params(models.create("keras_cnn", dense_units=512)) == 1_250_858


def test_option_b_shortcuts_add_projections():
    a, b = models.create("resnet20"), models.create("resnet20", shortcut="B")
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1x1 convs with their batch norms
    assert n_params(b) - n_params(a) == projections
    with pytest.raises(ValueError, match="expected shortcut='A' or shortcut='B'"):
        models.create("resnet20", shortcut="C")


def test_wrn16_4_count_by_hand():
    def block(cin, cout):  # BN(cin), conv3x3, BN(cout), conv3x3, 1x1 projection when the width changes
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)

    body = block(16, 64) + block(64, 64) + block(64, 128) + block(128, 128) + block(128, 256) + block(256, 256)
    total = 3 * 9 * 16 + body + 2 * 256 + (256 * 10 + 10)
    assert n_params(models.create("wrn16_4")) == total
    with pytest.raises(ValueError, match="expected a depth of 6n \\+ 4"):
        _wide(15, 2, 10, 3, 0.0, 0.0)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


@pytest.mark.parametrize("name", ["mlp", "keras_cnn", "lenet5", "alexnet"])
def test_sequential_models_round_trip_through_their_config(name):
    model = models.create(name).eval()
    assert isinstance(model, Sequential)
    clone = Sequential.from_config(json.loads(json.dumps(model.get_config()))).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), clone(x))


def test_unknown_names_are_explained():
    with pytest.raises(ValueError, match=r"unknown model 'ResNet'\. Did you mean \[.*'resnet20'"):
        models.create("ResNet")
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet10tt'\. Did you mean.*resnet10t"):
        models.create("timm:resnet10tt")


def test_timm_pretrained_download_is_refused_with_a_way_out():
    with pytest.raises(ValueError, match="cannot be downloaded here.*pretrained_file=.*checkpoint_path="):
        models.create(TIMM_SMALL, pretrained=True)
    with pytest.raises(FileNotFoundError, match="pretrained_file: no such weights file"):
        models.create(TIMM_SMALL, pretrained_file="/nonexistent/weights.safetensors")


def test_timm_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = models.create(TIMM_SMALL, num_classes=10)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    torch.save(source.state_dict(), tmp_path / "model.pth")

    # pretrained_file: backbone loaded, classifier fresh for the new number of classes
    tuned = models.create(TIMM_SMALL, num_classes=3, pretrained_file=str(tmp_path / "weights.safetensors"))
    assert torch.equal(tuned.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert tuned.get_classifier().out_features == 3

    # checkpoint_path: the complete state dict of the same architecture
    same = models.create(TIMM_SMALL, num_classes=10, checkpoint_path=tmp_path / "model.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(same(x), source.eval()(x))


# ----------------------------------------------------------------------------- command line


def _run(*args: str):
    from imclass.cli import app

    result = CliRunner().invoke(app, list(args))
    return result


def test_cli_lists_models_with_parameter_counts_as_json():
    result = _run("models", "--json", "--pattern", "resnet[25]*")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["models"]
    assert {r["name"]: r["params"] for r in rows} == {"resnet20": 269_722, "resnet56": 853_018}


def test_cli_lists_models_as_a_table_with_the_timm_note():
    result = _run("models", "list", "--pattern", "keras*")
    assert result.exit_code == 0, result.output
    assert "keras_cnn" in result.stdout and "658,218" in result.stdout
    assert "timm:<name>" in result.stdout
    timm_rows = _run("models", "--pattern", "timm:resnet10*")
    assert "timm:resnet10t" in timm_rows.stdout


def test_cli_summary_and_its_errors():
    result = _run("models", "summary", "lenet5", "-o", "in_chans=1", "-o", "img_size=28", "--arithmetic")
    assert result.exit_code == 0, result.output
    assert "Total params: 61,706" in result.stdout and "(28 - 5 + 2*2)/1 + 1 = 28" in result.stdout
    bad = _run("models", "summary", "nope")
    assert bad.exit_code == 2 and "unknown model 'nope'" in bad.output

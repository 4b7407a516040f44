"""Pretrained weights: the known ImageNet files give the right class on a real photo, every file
format loads strictly, the old head is dropped, and every error names the problem."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imclass.models import create
from imclass.models.weights import (
    KNOWN_WEIGHTS, LoadReport, Preprocessing, WeightsError, apply_weights, backbone_name, create_backbone,
    find_known_weights, imagenet_classes, preprocessing_for, read_state_dict, resolve_weights_root,
)

DAISY = 985  # ImageNet's "daisy"


@pytest.fixture(scope="module")
def weights_root(shared_weights) -> Path:
    root = shared_weights
    if not (root / "imagenet_classes.txt").is_file():
        pytest.skip(f"no shared ImageNet weights under {root} (set IMCLASS_WEIGHTS to the shared weights folder)")
    return root


@pytest.fixture(scope="module")
def daisies(flowers_dir) -> list[Path]:
    folder = flowers_dir / "daisy"
    if not folder.is_dir():
        pytest.skip(f"no flowers photos under {folder} (set IMCLASS_DATA to the shared data folder)")
    return sorted(folder.glob("*.jpg"))[:2]


def _tiny(num_classes: int = 10) -> torch.nn.Module:
    return create("timm:resnet10t", num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# real ImageNet weights


@pytest.mark.parametrize("arch", ["mobilenetv2_100", "squeezenet1_1"])
def test_known_weights_classify_a_daisy_photo(arch, weights_root, daisies):
    from imclass.transfer.features import prepare_batch, read_for

    model, report = create_backbone(arch, num_classes=1000, weights_dir=weights_root)
    assert report.ok and not report.dropped_head and report.source.startswith(str(weights_root))
    assert report.sha256 and len(report.sha256) == 64
    model.eval()
    x = prepare_batch(read_for(daisies, report.preprocessing), report.preprocessing)
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert top5[:, 0].tolist() == [DAISY, DAISY]
    names = imagenet_classes(weights_root)
    assert names[DAISY] == "daisy" and len(set(top5.flatten().tolist())) >= 5  # five distinct guesses
    # the wrong preprocessing (ImageNet mean/std for the TF-converted MobileNetV2) changes the logits
    if arch == "mobilenetv2_100":
        wrong = prepare_batch(read_for(daisies, Preprocessing()), Preprocessing())
        with torch.no_grad():
            assert not torch.allclose(model(wrong), logits, atol=1e-2)


def test_preprocessing_travels_with_the_weights(weights_root):
    mnv2 = preprocessing_for("mobilenetv2_100", "imagenet", weights_dir=weights_root)
    assert mnv2.mean == (0.5, 0.5, 0.5) and mnv2.std == (0.5, 0.5, 0.5)
    assert (mnv2.resize, mnv2.crop, mnv2.input_size) == (256, 224, (3, 224, 224))
    sq = preprocessing_for("squeezenet1_1", weights_root / KNOWN_WEIGHTS["squeezenet1_1"].path, weights_dir=weights_root)
    assert sq.mean == (0.485, 0.456, 0.406) and sq.std == (0.229, 0.224, 0.225)
    assert Preprocessing.from_dict(mnv2.to_dict()) == mnv2
    small = mnv2.with_size(160)
    assert (small.crop, small.resize, small.input_size) == (160, 183, (3, 160, 160))
    assert KNOWN_WEIGHTS["mobilenetv2_100"].options == {"pad_type": "same"}


def test_weights_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("IMCLASS_WEIGHTS", str(tmp_path / "env"))
    assert resolve_weights_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_weights_root() == tmp_path / "env"
    monkeypatch.delenv("IMCLASS_WEIGHTS")
    assert resolve_weights_root() == Path("~/.cache/imclass/weights").expanduser()
    assert find_known_weights("mobilenetv2_100", tmp_path) is None


def test_offline_imagenet_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create("timm:resnet10t", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        apply_weights(model, "resnet10t", "imagenet", weights_dir=tmp_path)
    message = str(err.value)
    assert "offline" in message and "resnet10t" in message and "weights=PATH" in message and str(tmp_path) in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_network_absent_imagenet_error_names_the_known_file(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE: the probe of the hub itself fails (nothing listens at the endpoint), in seconds."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: closed here, as on any CI machine
    monkeypatch.setenv("IMCLASS_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"mobilenetv2_100-imagenet/model\.safetensors"):
        create_backbone("mobilenetv2_100", weights="imagenet", weights_dir=tmp_path)
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------------------------
# formats


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pt", "bin", "state_dict", "model", "module.", "float16",
                                 "bfloat16", "float64"])
def test_every_weights_format_loads_exactly(fmt, tmp_path):
    torch.manual_seed(0)
    source = _tiny()
    state = source.state_dict()
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}.get(fmt)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if fmt == "state_dict":
        payload, suffix = {"state_dict": state, "epoch": 3}, ".pth"
    elif fmt == "model":
        payload, suffix = {"model": state, "optimizer": {}}, ".pt"
    elif fmt == "module.":
        payload, suffix = {f"module.{k}": v for k, v in state.items()}, ".pth"
    else:
        payload, suffix = state, "." + fmt if fmt in ("safetensors", "pth", "pt", "bin") else ".safetensors"
    path = _save(payload, tmp_path / f"w{suffix}")
    torch.manual_seed(1)
    target = _tiny()
    report = apply_weights(target, "resnet10t", path)
    assert isinstance(report, LoadReport) and report.ok and not report.dropped_head
    assert len(report.loaded) == len(state)
    for k, v in target.state_dict().items():
        expected = state[k].to(v.dtype)
        assert torch.equal(v, expected), k
        assert v.dtype == source.state_dict()[k].dtype  # stored in the model's own dtype


def test_different_class_count_drops_the_old_head(tmp_path):
    torch.manual_seed(0)
    path = _save(_tiny(1000).state_dict(), tmp_path / "in1k.safetensors")
    torch.manual_seed(1)
    target = _tiny(5)
    fresh_head = target.get_classifier().weight.clone()
    report = apply_weights(target, "resnet10t", path)
    assert sorted(report.dropped_head) == ["fc.bias", "fc.weight"]
    assert report.ok and "classifier dropped" in str(report)
    assert torch.equal(target.get_classifier().weight, fresh_head)
    source = read_state_dict(path)
    assert torch.equal(target.state_dict()["conv1.0.weight"], source["conv1.0.weight"])


def test_strict_mismatch_lists_keys_and_loads_nothing(tmp_path):
    torch.manual_seed(0)
    state = _tiny().state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(3)
    state["conv1.0.weight"] = torch.zeros(8, 3, 5, 5)
    path = _save(state, tmp_path / "bad.pth")
    target = _tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        apply_weights(target, "resnet10t", path)
    message = str(err.value)
    assert "missing from the file: layer1.0.conv1.weight" in message
    assert "not in the model: extra.weight" in message
    assert "shape mismatch: conv1.0.weight: model (24, 3, 3, 3) vs file (8, 3, 5, 5)" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    report = apply_weights(target, "resnet10t", path, strict=False)
    assert report.missing == ["layer1.0.conv1.weight"] and report.unexpected == ["extra.weight"]
    assert len(report.mismatched) == 1 and not report.ok
    assert torch.equal(target.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_unreadable_files_raise_clear_errors(tmp_path):
    model = _tiny()
    with pytest.raises(WeightsError, match="no such weights file"):
        apply_weights(model, "resnet10t", tmp_path / "absent.safetensors")
    pickled = tmp_path / "model_object.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(WeightsError, match="weights-only"):
        apply_weights(model, "resnet10t", pickled)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(WeightsError, match="corrupted or truncated"):
        apply_weights(model, "resnet10t", broken)
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"expected a \.safetensors, \.pth, \.pt or \.bin"):
        apply_weights(model, "resnet10t", odd)
    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_state)
    with pytest.raises(WeightsError, match="expected a state dict"):
        apply_weights(model, "resnet10t", not_state)


def test_none_keeps_the_initialisation():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_weights(model, "resnet10t", None)
    assert report.source is None and "initialisation kept" in str(report)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_backbone_names_resolve_to_a_family():
    assert backbone_name("mobilenetv2_100") == "timm:mobilenetv2_100"
    assert backbone_name("squeezenet1_1") == "torchvision:squeezenet1_1"
    assert backbone_name("resnet50") == "timm:resnet50"
    assert backbone_name("torchvision:resnet18") == "torchvision:resnet18"
    with pytest.raises(ValueError, match="unknown backbone 'mobilenet_v9'"):
        backbone_name("mobilenet_v9")


def test_torchvision_classic_follows_timms_contract(tmp_path):
    import torchvision

    reference = torchvision.models.squeezenet1_1(weights=None, num_classes=1000)
    path = _save(reference.state_dict(), tmp_path / "squeezenet.pth")
    model = create("torchvision:squeezenet1_1", num_classes=3)
    report = apply_weights(model, "squeezenet1_1", path)
    assert sorted(report.dropped_head) == ["classifier.1.bias", "classifier.1.weight"] and report.ok
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    reference.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, 512) and model(x).shape == (2, 3)
        assert torch.allclose(model.forward_features(x), reference.features(x))

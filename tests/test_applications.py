"""Keras's applications on timm: the course's fourth listing, Keras's arguments, weights from files,
ImageNet weights offline (a fast, clear error) and from the shared weights folder."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imclass.applications import APPLICATIONS, EfficientNetB0, InceptionV3, MobileNetV2, NASNetMobile
from imclass.layers import Dense, Flatten, GlobalAveragePooling2D
from imclass.models import Model, Sequential, load_model
from imclass.models.weights import WeightsError


# Keras's feature widths (the channels of include_top=False): timm builds the same architectures
KERAS_FEATURES = {"InceptionV3": 2048, "ResNet50": 2048, "ResNet101": 2048, "ResNet152": 2048, "NASNetLarge": 4032,
                  "NASNetMobile": 1056, "VGG16": 512, "MobileNetV2": 1280, "EfficientNetB0": 1280, "Xception": 2048,
                  "DenseNet121": 1024}


def test_every_keras_application_names_a_timm_architecture_with_keras_feature_width():
    import timm

    assert set(APPLICATIONS) == set(KERAS_FEATURES)
    for name, spec in APPLICATIONS.items():
        if spec.arch == "nasnetamobile":  # timm has NASNet-A Large only; Mobile is built from its cells
            continue
        assert timm.is_model(spec.arch), name
        cfg = timm.get_pretrained_cfg(spec.arch)
        assert cfg is not None and cfg.input_size[-1] == spec.size, name
        num_features = timm.create_model(spec.arch, pretrained=False, num_classes=0).num_features \
            if name in ("MobileNetV2", "DenseNet121") else None
        if num_features is not None:
            assert num_features == KERAS_FEATURES[name], name


def test_fourth_listing_with_a_random_inception_v3():
    torch.manual_seed(0)
    inception = InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3))  # 75: InceptionV3's minimum
    y = inception.output
    assert y.shape == (2048, 1, 1)
    y = GlobalAveragePooling2D()(y)
    y = Dense(1024, activation='relu')(y)
    y = Dense(200, activation='relu')(y)
    output = Dense(10, activation='softmax')(y)
    model = Model(inputs=inception.input, outputs=output)
    assert isinstance(model, torch.nn.Module) and model.final_activation == "softmax"
    assert list(model.parameters())[0] is list(inception.parameters())[0]  # the head sits on the same backbone
    x = np.random.default_rng(0).integers(0, 256, (2, 75, 75, 3), dtype=np.uint8)
    p = model.predict(x)
    assert p.shape == (2, 10)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    model.eval()
    with torch.no_grad():  # the head computes on the backbone's pooled features
        feats = inception.inception_v3.model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
        expected = model.dense_2(model.dense_1_relu(model.dense_1(model.dense_relu(model.dense(feats.mean((2, 3)))))))
    np.testing.assert_allclose(p, expected.softmax(1).numpy(), atol=1e-5)


def test_keras_arguments_include_top_pooling_classes_input_shape(tmp_path):
    torch.manual_seed(0)
    top = MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=7)
    assert top.output_shape == (7,) and top.final_activation == "softmax" and top.name == "mobilenetv2_1_00_224"
    avg = NASNetMobile(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    assert avg.output_shape == (KERAS_FEATURES["NASNetMobile"],)
    feats = EfficientNetB0(weights=None, include_top=False, input_shape=(3, 64, 64))  # channels-first works too
    assert feats.output_shape == (1280, 2, 2)
    t = torch.randn(2, 3, 64, 64)
    feats.eval()
    timm_model = feats.efficientnetb0.model
    torch.testing.assert_close(feats(t), timm_model.forward_features(t))
    # an application nests in a Sequential as one layer, sharing its weights; it trains and round-trips
    model = Sequential([feats, Flatten(), Dense(3, activation="softmax")])
    assert model.output_shape == (3,) and list(model.parameters())[0] is list(feats.parameters())[0]
    x = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    model.fit(x, np.array([0, 1, 2, 0]), epochs=1, batch_size=4, verbose=0)
    again = load_model(model.save(tmp_path / "effnet_head.safetensors"))
    np.testing.assert_allclose(again.predict(x), model.predict(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"expects input_shape \(H, W, C\) with H and W >= 75"):
        InceptionV3(weights=None, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="expected pooling None, 'avg' or 'max'"):
        MobileNetV2(weights=None, include_top=False, pooling="sum", input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="should be None .*'imagenet' or the path to a weights file; no such file"):
        MobileNetV2(weights="/nonexistent/w.pth", input_shape=(32, 32, 3))


def test_weights_from_a_file_saved_from_a_random_model(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    state = source.mobilenetv2_1_00_224.model.state_dict()  # the timm network inside the application
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "mine.safetensors"))
    torch.manual_seed(2)
    loaded = MobileNetV2(weights=tmp_path / "mine.safetensors", include_top=False, input_shape=(32, 32, 3))
    assert loaded.load_report is not None and loaded.load_report.ok
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_imagenet_weights_offline_fail_fast_with_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("IMCLASS_WEIGHTS", str(tmp_path))  # an empty weights root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"no ImageNet weights for 'efficientnet_b0'.*offline.*weights=PATH"):
        EfficientNetB0(weights="imagenet", include_top=False, input_shape=(32, 32, 3))
    assert time.perf_counter() - start < 60  # seconds, never a hang (the model is built first on a busy CPU)


def test_imagenet_mobilenetv2_recognises_daisies(monkeypatch, shared_weights, flowers_dir):
    from PIL import Image

    from imclass.models.weights import imagenet_classes

    if not (shared_weights / "mobilenetv2_100-imagenet").is_dir() or not (flowers_dir / "daisy").is_dir():
        pytest.skip(f"needs the shared ImageNet MobileNetV2 weights ({shared_weights}) "
                    f"and the flowers photos ({flowers_dir})")

    monkeypatch.setenv("IMCLASS_WEIGHTS", str(shared_weights))
    model = MobileNetV2(weights="imagenet", input_shape=(224, 224, 3))
    assert model.load_report.ok and model.preprocessing.mean == (0.5, 0.5, 0.5)

    def centre_crop(path: Path) -> np.ndarray:
        im = Image.open(path).convert("RGB")
        scale = 256 / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
        left, top = (im.width - 224) // 2, (im.height - 224) // 2
        return np.asarray(im.crop((left, top, left + 224, top + 224)))

    photos = sorted((flowers_dir / "daisy").glob("*.jpg"))[:4]
    probs = model.predict(np.stack([centre_crop(p) for p in photos]))  # uint8 channels-last, no preprocess_input
    names = imagenet_classes(shared_weights)
    top5 = [[names[i] for i in row.argsort()[::-1][:5]] for row in probs]
    assert sum("daisy" in t for t in top5) >= 3, top5

"""The challenge transforms (imclass.data.challenges), robustness training and the challenge report."""
from __future__ import annotations

import json

import pytest
import torch

from imclass.data import challenges as ch


@pytest.fixture(scope="module")
def images(cifar_small):
    return cifar_small[2][:64]  # 64 real CIFAR-10 test images, uint8 (N, C, H, W)


@pytest.mark.parametrize("name", ch.CHALLENGES)
def test_severity_zero_is_the_image_itself_and_draws_repeat_with_the_seed(name, images, one_thread):
    assert ch.apply_challenge(images, name, 0, seed=3) is images
    a = ch.apply_challenge(images, name, 3, seed=3)
    b = ch.apply_challenge(images, name, 3, seed=3)
    c = ch.apply_challenge(images, name, 3, seed=4)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, images)


@pytest.mark.parametrize("name", ch.CHALLENGES)
def test_images_move_further_from_the_clean_ones_as_severity_grows(name, images, one_thread):
    dist = [(ch.apply_challenge(images, name, s, seed=0).float() - images.float()).abs().mean().item()
            for s in range(ch.MAX_SEVERITY + 1)]
    assert dist[0] == 0 and all(b > a for a, b in zip(dist, dist[1:])), dist


def test_brightness_gamma_and_contrast_are_monotone_where_measurable(images):
    dark = [ch.brightness(images, s).float().mean().item() for s in range(6)]
    bright = [ch.brightness(images, s, brighter=True).float().mean().item() for s in range(6)]
    gam = [ch.gamma(images, s).float().mean().item() for s in range(6)]
    spread = [ch.contrast(images, s).float().std().item() for s in range(6)]
    assert all(b < a for a, b in zip(dark, dark[1:]))
    assert all(b > a for a, b in zip(bright, bright[1:]))
    assert all(b < a for a, b in zip(gam, gam[1:]))
    assert all(b < a for a, b in zip(spread, spread[1:]))
    # brightness x(1 - 0.15 s) as torchvision computes it
    assert dark[4] == pytest.approx(images.float().mean().item() * 0.4, abs=0.6)


def test_occluded_fraction_grows_as_documented(images):
    grey = torch.zeros_like(images)  # a black image: every grey pixel is occluder
    h, w = images.shape[-2:]
    fracs = []
    for s in range(6):
        out = ch.occlusion(grey, s, torch.rand(len(grey), 2, generator=torch.Generator().manual_seed(0)))
        covered = (out == 128).all(1).float().mean((1, 2))  # (N,) fraction of pixels of each image
        assert torch.all(covered == covered[0])  # the square always lies fully inside the image
        fracs.append(covered[0].item())
        assert fracs[-1] == ch.occluder_side((h, w), s) ** 2 / (h * w)
    assert all(b > a for a, b in zip(fracs, fracs[1:]))
    assert fracs[5] == pytest.approx(0.35, abs=0.03)


def test_viewpoint_geometry_matches_torchvision(images):
    rot = ch.rotation(images, 2, sign=1)
    from torchvision.transforms.v2 import functional as TF

    expected = TF.rotate(images, 16.0, interpolation=TF.InterpolationMode.BILINEAR, fill=[128.0] * 3)
    assert (rot.int() - expected.int()).abs().max() <= 1
    zoomed = ch.scale(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), 5)  # zoom out: grey border appears
    assert zoomed[0, :, 0, 0].tolist() == [128, 128, 128] and zoomed[0, :, 16, 16].tolist() == [200, 200, 200]


def test_clutter_blends_with_the_documented_weight(images):
    bg = torch.zeros_like(images)
    out = ch.clutter(images, 4, bg)  # weight 0.4 of black: 0.6 of the image
    assert (out.float() - images.float() * 0.6).abs().max() <= 0.5 + 1e-4


def test_float_images_stay_float_and_agree_with_uint8(images):
    f = images.float() / 255
    for name in ch.CHALLENGES:
        out = ch.apply_challenge(f, name, 2, seed=1)
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
        ref = ch.apply_challenge(images, name, 2, seed=1).float() / 255
        assert (out - ref).abs().mean() < 0.01, name


def test_bad_input_names_the_problem(images):
    with pytest.raises(ValueError, match="expected a challenge in .*received 'fog'"):
        ch.apply_challenge(images, "fog", 1)
    with pytest.raises(ValueError, match="expected 0 <= severity <= 5, received severity=7"):
        ch.apply_challenge(images, "occlusion", 7)
    with pytest.raises(ValueError, match=r"expected a batch of images \(N, C, H, W\)"):
        ch.apply_challenge(images[0], "occlusion", 1)
    assert ch.parse_challenges("challenge") == ch.CHALLENGES
    assert ch.parse_challenges("illumination, occlusion") == ("illumination", "occlusion")
    with pytest.raises(ValueError, match="received 'blur'"):
        ch.parse_challenges("illumination,blur")

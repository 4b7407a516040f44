"""The sample outputs in the docs are what the commands print (tests/docs_samples.py: the pages mark them
with ``<!-- sample -->``; ``python tests/docs_samples.py --write`` regenerates them on the flowers photos).
Here every sample's command runs on a tiny folder of the same five classes, and its stdout must match the
page line by line, numbers, paths and the k-NN backend masked."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from docs_samples import find_samples, mismatch, run

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]  # the flowers photos' classes


@pytest.fixture(scope="module")
def tiny_flowers(tmp_path_factory):
    """photos/<class>/*.jpg: 5 classes x 10 RGB JPEGs of 4 sizes (a miniature of the flowers folder)."""
    root = tmp_path_factory.mktemp("tiny") / "photos"
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (40, 52), (36, 36), (48, 40)]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(10):
            h, w = sizes[(i + c) % len(sizes) if i % 3 else 0]
            pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            pixels[..., c % 3] += 40 * (1 + c // 3)  # each class its colour
            Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg", quality=90)
    return root


def test_the_pages_hold_the_samples():
    commands = [s.command.split()[1] for s in find_samples()]
    assert {"train", "evaluate", "knn", "data"} <= set(commands), commands
    assert commands.index("train") < commands.index("evaluate")  # evaluate reads the run train wrote


def test_every_sample_output_is_what_the_command_prints(tiny_flowers, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # runs/... written by one sample, read by the next
    problems = []
    for sample in find_samples():
        printed = run(sample.command, tiny_flowers)
        why = mismatch(sample.output, printed)
        if why:
            problems.append(f"{sample.page.name}: $ {sample.command}: {why}")
    assert problems == []


def test_a_changed_word_or_a_missing_line_is_a_mismatch():
    shown = ["held-out accuracy 42.60% on 500 held-out images; saved runs/x/model.safetensors", "  ...", "time 1.0 s"]
    assert mismatch(shown, ["held-out accuracy 9.00% on 7 held-out images; saved /tmp/a/model.safetensors",
                            "a", "b", "time 3.5 s"]) is None
    assert "line 1" in mismatch(shown, ["test accuracy 9.00% on 7 test images; saved /tmp/a/model.safetensors",
                                        "time 3.5 s"])
    assert mismatch(shown, ["held-out accuracy 9.00% on 7 held-out images; saved /tmp/a/model.safetensors"])
    assert mismatch(["1-NN on x: 3.1 s (numba backend)"], ["1-NN on x: 0.2 s (torch backend)"]) is None

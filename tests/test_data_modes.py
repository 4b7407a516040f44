"""``--data-mode memory|cache|stream`` through every consumer of a folder (issue 26): each command reads
the same images in every tier it takes and gives the same figures; a tier a command cannot use is refused
in one line; ``data info`` says the tier each split would be read in."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imclass.cli import app

MODES = ("memory", "cache", "stream")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-class folder of 30 photo-like JPEGs, its own image cache folder, and a keras_cnn run trained on it."""
    root = tmp_path_factory.mktemp("modes")
    folder = root / "photos"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:30, 0:40] / 40
    for c in range(3):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(10):
            base = np.array([80 + 60 * c, 200 - 50 * c, 120], dtype=float)
            img = base + 100 * (xx if c % 2 else yy)[..., None] + rng.normal(0, 20, (30, 40, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"c{c}" / f"{i:02d}.jpg", quality=90)
    old = os.environ.get("IMCLASS_CACHE")
    os.environ["IMCLASS_CACHE"] = str(root / "state")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = root / "run"
    done = CliRunner().invoke(app, ["train", str(folder), "--model", "keras_cnn", "--image-size", "16",
                                    "--epochs", "1", "--out", str(run), "--json", "--data-mode", "memory"])
    assert done.exit_code == 0, done.output
    yield folder, run, root
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("IMCLASS_CACHE", None)
    else:
        os.environ["IMCLASS_CACHE"] = old


def _json(args: list) -> dict:
    """The command's JSON (last line of stdout), after checking that it said the tier it was asked for."""
    args = [str(a) for a in args]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    if "--data-mode" in args:
        mode = args[args.index("--data-mode") + 1]
        assert f"-> {mode} tier (asked for (--data-mode))" in done.stderr, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_explain_neighbours_and_tsne_read_every_tier_alike(setup):
    folder, run, root = setup
    query = folder / "c1" / "03.jpg"
    found = {m: _json(["explain", run, query, "--method", "neighbours", "--in", folder, "--k", "3", "--json",
                       "--out", root / f"nb-{m}.png", "--data-mode", m]) for m in MODES}
    strip = {m: {k: v for k, v in r.items() if k != "out"} for m, r in found.items()}
    assert strip["memory"] == strip["cache"] == strip["stream"]
    maps = {m: (root / f"nb-{m}.png").read_bytes() for m in MODES}
    assert maps["memory"] == maps["cache"] == maps["stream"]  # the same neighbours drawn


def test_explain_searches_the_training_images_where_they_are(setup):
    """The pixel search of explain's neighbours and same_l2 takes the memory tier's tensor and the cache tier's
    memory map themselves (no copy of every training image into the process); the stream tier reads them."""
    from imclass import data as imdata
    from imclass.cli.explain import _pixels

    folder, _, _ = setup
    sets = {m: imdata.load(folder, split="train", image_size=16, mode=m, verbose=False) for m in MODES}
    for m in ("memory", "cache"):
        assert _pixels(sets[m]).data_ptr() == sets[m].images.data_ptr(), m
    streamed = _pixels(sets["stream"])
    assert streamed.shape == (24, 3, 16, 16) and torch.equal(streamed, sets["memory"].images)


def test_challenge_gives_the_same_accuracies_in_every_tier(setup):
    folder, run, root = setup
    results = {m: _json(["challenge", run, folder, "--report", root / f"ch-{m}", "--challenges", "occlusion,illumination",
                         "--json", "--data-mode", m]) for m in MODES}
    assert results["memory"]["summary"] == results["cache"]["summary"] == results["stream"]["summary"]
    assert results["memory"]["images"] == 6  # the 20 % test split of 30 photos


def test_similar_finds_the_same_neighbours_in_every_tier(setup):
    folder, run, _ = setup
    query = folder / "c2" / "04.jpg"
    found = {m: _json(["similar", query, "--in", folder, "--backbone", run, "-k", "4", "--cache", "none", "--amp", "none",
                       "--no-compare", "--json", "--data-mode", m]) for m in MODES}
    neighbours = {m: r["queries"][0]["neighbours"] for m, r in found.items()}
    assert neighbours["memory"][0]["path"] == "c2/04.jpg"
    assert neighbours["memory"] == neighbours["cache"] == neighbours["stream"]


def test_compare_and_tune_read_memory_and_cache_alike_and_refuse_stream(setup):
    folder, _, root = setup
    boards = {m: _json(["compare", folder, "--models", "knn-l2,knn-l1", "--budget", "1m", "--image-size", "16",
                        "--out", root / f"cmp-{m}", "--json", "--data-mode", m]) for m in ("memory", "cache")}
    acc = {m: {e["name"]: e["accuracy"] for e in b["entries"]} for m, b in boards.items()}
    assert acc["memory"] == acc["cache"] and len(acc["memory"]) == 2
    refused = CliRunner().invoke(app, ["compare", str(folder), "--models", "knn-l2", "--budget", "1m", "--out",
                                       str(root / "cmp-stream"), "--data-mode", "stream"])
    assert refused.exit_code != 0 and "memory or cache tier" in refused.output
    tuned = {m: _json(["tune", folder, "--model", "knn", "--trials", "3", "--epochs", "1", "--seed", "0",
                       "--out", root / f"tune-{m}", "--no-final", "--json", "--data-mode", m]) for m in ("memory", "cache")}
    assert tuned["memory"]["best_params"] == tuned["cache"]["best_params"]
    assert tuned["memory"]["val_accuracy"] == tuned["cache"]["val_accuracy"]
    refused = CliRunner().invoke(app, ["tune", str(folder), "--model", "knn", "--out", str(root / "t-s"),
                                       "--data-mode", "stream"])
    assert refused.exit_code != 0 and "memory or cache tier" in refused.output


def test_data_info_says_the_tier_of_each_split(setup):
    folder, _, _ = setup
    info = _json(["data", "info", folder, "--image-size", "16", "--json"])
    for split, n in (("train", 24), ("test", 6)):
        tier = info["splits"][split]["tier"]
        assert tier["mode"] == "memory" and tier["stored_bytes"] == n * 3 * 16 * 16
        assert f"{n:,} images of 3x16x16" in tier["line"] and "kept for the model" in tier["line"]
    table = CliRunner().invoke(app, ["data", "info", str(folder), "--image-size", "16"])
    assert table.exit_code == 0 and "-> memory tier" in table.stdout

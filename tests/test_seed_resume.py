"""`imclass train --seed` seeds everything (model initialisation included: identical commands give
byte-identical model files) and `--resume` without a checkpoint is a one-line error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imclass.cli import app


def train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


TINY = ["--model", "lenet5", "--dataset", "mnist", "--limit", "100", "--epochs", "1", "--device", "cpu", "--json"]


def test_two_identical_commands_write_byte_identical_model_files(tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)
    files = []
    for noise in (1234, 99):
        torch.manual_seed(noise)  # whatever ran before in this process must not matter
        result = train(*TINY, "--data", data_root, "--seed", "0", "--out", "run")
        assert result.exit_code == 0, result.output
        files.append(json.loads(result.stdout)["model_file"])
    assert files == ["run/model.safetensors", "run-2/model.safetensors"]  # the second run did not overwrite the first
    first, second = (open(f, "rb").read() for f in files)
    assert first == second
    other = train(*TINY, "--data", data_root, "--seed", "1", "--out", "run-seed1")
    assert other.exit_code == 0, other.output
    assert (tmp_path / "run-seed1" / "model.safetensors").read_bytes() != first


@pytest.mark.parametrize("prepare", ["missing", "config only", "a folder to transfer from"])
def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path, prepare):
    out = tmp_path / "typo"
    extra = []
    if prepare == "config only":  # a run killed before its first checkpoint
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model": "lenet5", "dataset": "mnist", "epochs": 1}))
    elif prepare == "a folder to transfer from":  # `train --dataset FOLDER` transfers: no checkpoint either
        for cls in ("a", "b"):
            (tmp_path / "photos" / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / cls / "0.png")
        extra = ["--dataset", tmp_path / "photos"]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    result = train(*extra, "--out", out, "--resume")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: --resume: no checkpoint in {out} (expected {out / 'checkpoint.pt'}; the run folder is missing or "
        "mistyped, or the run stopped before its first checkpoint): drop --resume to start a new run")
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before  # nothing created


def test_out_naming_an_existing_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    result = train("--model", "lenet5", "--dataset", "mnist", "--out", blocker)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --out {blocker}: a file is in the way; expected a run folder (new or existing)"
    assert blocker.read_text() == "keep me"

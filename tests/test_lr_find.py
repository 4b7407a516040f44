"""`Classifier.lr_find` / `imclass train --lr-find`: stop at divergence, smooth, suggest the steepest descent
(fastai's rule), a readable plot; checked on a problem whose good learning rate is known."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from imclass.train.lr_range import LRFindResult, clean_curve, suggest_lr


def _curve(with_tail: bool = True):
    """A smoothed range-test curve: flat, a sigmoid descent steepest at lr = 1e-3, a minimum near 1e-2,
    then a diverged tail up to 420,000 (what the old plot drew)."""
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    losses = []
    for lr in lrs:
        x = math.log10(lr)
        loss = 2.3 - 1.8 / (1 + math.exp(-5 * (x + 3)))
        if x > -1.6:  # past the minimum: climbs, then explodes
            loss += 40 * (x + 1.6) ** 2 + (4.2e5 if x > -0.6 else 0)
        losses.append(loss)
    return lrs, losses


def test_the_suggestion_is_the_steepest_descent_before_the_diverged_tail(tmp_path):
    lrs, losses = _curve()
    kept_lr, kept = clean_curve(lrs, losses)
    assert len(kept) < len(losses) and max(kept) <= 2.3 + 1e-9  # the tail above the starting level is cut
    suggestion = suggest_lr(lrs, losses)
    assert 10 ** -3.2 < suggestion < 10 ** -2.8  # the steepest point of the descent, 1e-3
    result = LRFindResult(lrs, losses, start_lr=1e-7, end_lr=10.0)
    assert result.suggestion == suggestion and 1e-4 < result.minimum < 1e-2
    assert 1e-7 < result.suggestion < 10.0  # never its own start value
    path = result.plot(tmp_path / "lr.png")
    assert path.stat().st_size > 10_000
    # a curve that only rises (the range starts too high): minimum / 10, still inside the range
    assert suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [1.0, 1.1, 1.3, 1.6]) == pytest.approx(1e-4)
    assert math.isnan(suggest_lr([1e-3, 1e-2], [1.0, 0.9]))


def _blobs(n: int = 2048, d: int = 16, seed: int = 0):
    """Two Gaussian classes as uint8 'images' (N, 1, 1, d)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centre = torch.where(y[:, None] == 1, 150.0, 105.0)
    x = (centre + 30 * torch.randn(n, d, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return x.reshape(n, 1, 1, d), y


def _top_hessian_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int = 50) -> float:
    """The largest eigenvalue L of the Hessian of the mean cross-entropy at the model's weights (power iteration
    on autograd Hessian-vector products, float64): gradient descent is stable below lr = 2 / L."""
    model = model.double()
    params = [p for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x.double()), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    value = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        value = sum(float((a * b).sum()) for a, b in zip(hv, v))
        v = [t.detach() for t in hv]
    model.float()
    return value


def test_lr_find_suggests_a_stable_fast_rate_on_a_problem_whose_good_rate_is_known(one_thread):
    """Logistic regression with plain SGD: stable below 2 / L (L: the top Hessian eigenvalue), fastest near 1 / L.
    The suggestion must be a rate that trains (not 1e-7) and that does not diverge."""
    from imclass.train import Classifier

    torch.manual_seed(0)
    images, labels = _blobs()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    mean, std = images.float().mean().item() / 255, images.float().std().item() / 255
    clf = Classifier(model, classes=["a", "b"], mean=[mean], std=[std], device="cpu").compile("sgd", lr=0.1, momentum=0.0)
    x = (images.float() / 255 - mean) / std
    big_l = _top_hessian_eigenvalue(model, x, labels)
    result = clf.lr_find((images, labels), start_lr=1e-5, end_lr=100.0, num_steps=100, batch_size=64)
    suggestion = LRFindResult(result.lrs, result.losses, start_lr=1e-5, end_lr=100.0).suggestion
    assert 1 / (100 * big_l) < suggestion < 2 / big_l, (suggestion, 1 / big_l)
    # and the suggestion trains: one epoch from scratch at the suggestion beats one epoch at 1 / (100 L)
    def one_epoch(lr: float) -> float:
        torch.manual_seed(1)
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        c = Classifier(m, classes=["a", "b"], mean=[mean], std=[std], device="cpu").compile("sgd", lr=lr, momentum=0.0)
        c.fit((images, labels), epochs=1, batch_size=64, seed=0, verbose=False)
        return c.evaluate((images, labels))["loss"]

    assert one_epoch(suggestion) < one_epoch(1 / (100 * big_l))


def test_cli_train_lr_find_prints_a_suggestion_inside_the_range(tmp_path, data_root, one_thread):
    from typer.testing import CliRunner

    from imclass.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--lr-find", "--model", "mlp", "--dataset", "mnist", "--data",
                                   str(data_root), "--limit", "1000", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["start_lr"] < found["suggestion"] < found["end_lr"]
    assert (tmp_path / "run-lr_find.png").is_file() and not out.exists()  # no run folder: nothing was trained
    text = CliRunner().invoke(app, ["train", "--lr-find", "--model", "mlp", "--dataset", "mnist", "--data",
                                    str(data_root), "--limit", "500", "--out", str(out)])
    assert text.exit_code == 0 and "suggested learning rate" in text.stdout and "train with: --lr" in text.stdout

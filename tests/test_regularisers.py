"""``l2=`` and ``grad_clip=`` change one training step by exactly the amount they promise (autograd is the oracle)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from imclass.train.classifier import Classifier

LR = 0.5


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 2, 2), dtype=torch.uint8, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return x, y


def _one_step(**options) -> tuple[dict, dict, float]:
    """Weights before and after one full-batch SGD step (no momentum), and the loss the history records."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    clf = Classifier(model, classes=["a", "b", "c"], mean=[0.0] * 3, std=[1.0] * 3, device="cpu")
    clf.compile("sgd", lr=LR, momentum=0.0, **options)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = _data()
    history = clf.fit((x, y), epochs=1, batch_size=len(x), seed=0, verbose=False)
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return before, after, float(history.history["loss"][0])


def _oracle(before: dict, l2: float = 0.0) -> tuple[dict, torch.Tensor]:
    """The gradient of cross-entropy (+ l2 * sum of the squared weight matrix) at ``before``, by autograd."""
    x, y = _data()
    w = before["1.weight"].clone().requires_grad_()
    b = before["1.bias"].clone().requires_grad_()
    logits = (x.float() / 255).flatten(1) @ w.T + b
    loss = nn.functional.cross_entropy(logits, y) + l2 * w.square().sum()
    loss.backward()
    return {"1.weight": w.grad, "1.bias": b.grad}, loss.detach()


def test_l2_adds_its_penalty_to_the_loss_and_2_l2_w_to_the_weight_gradient_only():
    lam = 0.05
    before, plain, plain_loss = _one_step()
    before_l2, with_l2, l2_loss = _one_step(l2=lam)
    assert all(torch.equal(before[k], before_l2[k]) for k in before)
    penalty = lam * float(before["1.weight"].square().sum())
    assert penalty > 1e-3  # large enough to see
    assert l2_loss - plain_loss == pytest.approx(penalty, rel=1e-5)
    # the step differs by exactly lr * 2 * l2 * W on the weight matrix, and not at all on the bias
    torch.testing.assert_close(plain["1.weight"] - with_l2["1.weight"], LR * 2 * lam * before["1.weight"],
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain["1.bias"], with_l2["1.bias"], atol=0, rtol=0)
    grads, oracle_loss = _oracle(before, l2=lam)
    assert l2_loss == pytest.approx(float(oracle_loss), rel=1e-5)
    for k in before:
        torch.testing.assert_close(with_l2[k], before[k] - LR * grads[k], atol=1e-6, rtol=1e-5)


def test_grad_clip_rescales_the_whole_gradient_to_the_given_norm():
    before, plain, _ = _one_step()
    grads, _ = _oracle(before)
    norm = float(torch.cat([g.flatten() for g in grads.values()]).norm())
    clip = norm / 4  # the gradient is four times too long: it is scaled by 1/4, direction kept
    _, clipped, _ = _one_step(grad_clip=clip)
    for k in before:
        torch.testing.assert_close(before[k] - clipped[k], LR * grads[k] * clip / (norm + 1e-6), atol=1e-7, rtol=1e-5)
    step = torch.cat([(before[k] - clipped[k]).flatten() for k in before]).norm()
    assert float(step) == pytest.approx(LR * clip, rel=1e-4)
    # a limit above the gradient's norm changes nothing
    _, loose, _ = _one_step(grad_clip=norm * 2)
    assert all(torch.equal(loose[k], plain[k]) for k in before)

"""Out-of-sample probabilities: an image is never scored by a model that trained on it.

* :func:`stratified_folds` deals each class's images into ``k`` folds (seeded);
* :func:`cross_val_features` fits a multinomial logistic regression on the other folds' features
  (frozen-backbone embeddings, cached) and predicts each held-out fold: seconds per fold;
* :func:`cross_val_images` trains a network per fold with the fast recipe (``imclass.workflows.recipes``)
  on the other folds' pixels: for data sets without a pretrained backbone (CIFAR-10, MNIST, ...).
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from imclass.workflows.recipes import fast_config, fast_recipe

# Deferred imports (inside functions), for start-up time: sklearn.exceptions, sklearn.linear_model
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["cross_val_features", "cross_val_images", "fit_logistic", "stratified_folds"]


def stratified_folds(labels: np.ndarray | torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each image: every class's images shuffled (seeded) and dealt in turn,
    so each fold holds about 1/k of every class."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if k < 2:
        raise ValueError(f"expected at least 2 folds, received folds={k}")
    if len(labels) < k:
        raise ValueError(f"expected at least {k} images for {k} folds, received {len(labels)}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        fold[members] = (np.arange(len(members)) + offset) % k  # continue the deal: small classes spread too
        offset += len(members)
    return fold


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, C: float = 0.05,
                 max_iter: int = 500) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression (scikit-learn's L-BFGS, L2 penalty of strength ``1/C``) on
    standardised features; returns ``predict_proba(x) -> (n, num_classes)`` with a column for every
    class (zero for a class the training part lacks)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = x.double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-6
    y = np.asarray(y)
    model = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the probabilities are fine well before the tolerance
        model.fit((x - mean) / std, y)
    columns = model.classes_.astype(np.int64)

    def predict_proba(x_new: torch.Tensor) -> torch.Tensor:
        out = np.zeros((len(x_new), num_classes))
        out[:, columns] = model.predict_proba((x_new.double().numpy() - mean) / std)
        return torch.from_numpy(out)

    return predict_proba


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def cross_val_features(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, folds: int = 5,
                       seed: int = 0, C: float = 0.05, verbose: bool = False) -> np.ndarray:
    """Out-of-fold probabilities (n, num_classes) of a logistic regression on ``features``."""
    labels = torch.as_tensor(labels).long()
    fold = stratified_folds(labels.numpy(), folds, seed)
    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    for f in range(folds):
        start = time.perf_counter()
        held = torch.from_numpy(np.flatnonzero(fold == f))
        train = torch.from_numpy(np.flatnonzero(fold != f))
        model = fit_logistic(features[train], labels[train], num_classes, C=C)
        probs[held.numpy()] = model(features[held]).double().numpy()
        _say(verbose, f"fold {f + 1}/{folds}: logistic regression on {len(train):,} feature vectors, "
                      f"{len(held):,} held out ({time.perf_counter() - start:.1f} s)")
    return probs


def cross_val_images(data: Any, *, folds: int = 5, seed: int = 0, target: int = 90, device: str = "auto",
                     verbose: bool = False, on_fold: Callable[[Any, np.ndarray, np.ndarray], None] | None = None,
                     **overrides: Any) -> np.ndarray:
    """Out-of-fold probabilities (n, classes) of the fast recipe (``fast_config(target, **overrides)``)
    trained on the other folds of ``data`` (an ``ImageDataset``), with the recipe's test-time augmentation.

    ``on_fold(classifier, held_rows, train_rows)`` is called after each fold with that fold's trained
    ``Classifier`` (e.g. to read its penultimate features: the outliers of a review)."""
    cfg = fast_config(target, **overrides)
    labels = data.labels
    fold = stratified_folds(labels.numpy(), folds, seed)
    probs = np.zeros((len(labels), data.num_classes), dtype=np.float64)
    for f in range(folds):
        start = time.perf_counter()
        held = torch.from_numpy(np.flatnonzero(fold == f))
        train = data.subset(torch.from_numpy(np.flatnonzero(fold != f)))
        clf = fast_recipe(train, cfg, seed=seed + f, device=device, verbose=False)
        probs[held.numpy()] = clf.predict_proba(data.images[held], tta=clf.tta).double().numpy()
        if on_fold is not None:
            on_fold(clf, held.numpy(), np.flatnonzero(fold != f))
        _say(verbose, f"fold {f + 1}/{folds}: fast recipe trained on {len(train):,} images, {len(held):,} held out "
                      f"({time.perf_counter() - start:.1f} s)")
    return probs

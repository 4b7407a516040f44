"""Nearest neighbour and k-nearest-neighbour classifiers on raw pixels (the course's first classifier).

``KNN`` follows scikit-learn's estimator contract (``fit`` returns ``self``, learned state ends in ``_``,
``predict_proba`` columns follow ``classes_``) and reproduces ``KNeighborsClassifier(algorithm="brute")``
exactly, ties included:

- neighbours are ordered by distance, then by training index (the earlier training image wins a tie);
- the vote takes the class with the most votes (or the largest summed weight), and among tied classes
  the smallest label.

(scikit-learn follows the same rule on float input; on uint8 arrays it falls back to ``np.argpartition``,
whose choice among neighbours tied at the k-th place is arbitrary.)

uint8 pixels make the distances integers, and imclass computes them EXACTLY, so no rounding can reorder
two neighbours: L1 as sums of absolute byte differences (a compiled AVX2 kernel when numba is installed,
else ``torch.cdist`` in float32, exact because every partial sum is an integer below 2^24), squared L2 as
``|a|^2 + |b|^2 - 2 a.b`` with the dot products from one of three exact kernels: oneDNN's int8 GEMM on
pixels shifted by -128 (``torch._int_mm``, int32 sums), the numba ``vpmaddwd`` kernel, or a float64
matrix product (every partial sum an integer below 2^53). ``backend="auto"`` takes the one measured
fastest on this host (``imclass.knn._select``); for images with enough training images it searches with
pooled lower bounds first and computes only the distances they cannot exclude (``_knn_pruned``). Float inputs (or features) take a float64 path.

The search runs over chunks of queries and of training rows, so memory stays bounded (about
``batch_size x train chunk`` distances at a time) whatever the data set size.

Example
-------
>>> import torch, imclass
>>> x = torch.tensor([[0, 0], [0, 1], [5, 5], [6, 5]], dtype=torch.uint8)
>>> knn = imclass.KNN(k=3, metric="l1").fit(x, [0, 0, 1, 1])
>>> knn.predict(torch.tensor([[1, 1], [5, 6]], dtype=torch.uint8)).tolist()
[0, 1]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from imclass.data.arrays import as_images, as_labels
from imclass.data.progress import Progress
from imclass.knn import _knn_int8, _knn_kernels, _knn_pruned, _select
from imclass.knn._knn_torch import TRAIN_CHUNK as _TRAIN_CHUNK
from imclass.knn._knn_torch import chunk_rows as _chunk_rows
from imclass.knn._knn_torch import cosine_block as _cosine_block
from imclass.knn._knn_torch import l1_block as _l1_block_torch
from imclass.knn._knn_torch import l2_block as _l2_block_torch
from imclass.knn._knn_torch import norms as _norms
from imclass.knn._knn_torch import smallest_k as _smallest_k
from imclass.visualize import save_image_grid, save_line_plot
from imclass.visualize.grids import save_captioned_grid

# Deferred imports (inside functions), for start-up time: faiss, tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["KNN", "NearestNeighbor", "KSelection", "choose_k", "neighbour_grid"]

METRICS = ("l1", "l2", "cosine")
WEIGHTS = ("uniform", "distance")
BACKENDS = ("auto", "torch", "numba", "int8", "pruned", "faiss")
_METRIC_ALIASES = {"manhattan": "l1", "cityblock": "l1", "euclidean": "l2"}
_MAX_BLOCK = 2**23  # query chunk x training chunk distances at once (64 MB of float64), when batch_size is None


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"expected {name} to be one of {options}, received {value!r}")


def _rows(x: Any, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Images (any layout ``as_images`` accepts) or feature vectors (N, D) -> rows (N, D) and the sample shape."""
    if isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 2:
        t = torch.as_tensor(x)
    else:
        t = as_images(x, name=name)
    if len(t) == 0:
        raise ValueError(f"expected at least one sample in {name}, received 0")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"expected {name} as uint8 pixels or real numbers, received dtype {t.dtype}")
    shape = tuple(t.shape[1:])
    return t.reshape(len(t), -1).contiguous(), shape


# ----------------------------------------------------------------------------- distance blocks
# A block function maps (query rows (m, D), training rows (n, D)) to "ranking distances" (m, n):
# squared L2, L1, or cosine distance, as float64 (exact integers on the uint8 path) or int64.


# (the torch block functions live in imclass.knn._knn_torch, shared with the kernel choice in _select)
# ----------------------------------------------------------------------------- k smallest, ties by index


def _merge(best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor], k: int):
    """Merge two (value, index) lists sorted by (value, index); ``new`` holds the later training rows."""
    if best is None:
        return new
    vals = torch.cat([best[0], new[0].to(best[0].dtype)], dim=1)
    idx = torch.cat([best[1], new[1]], dim=1)
    vals, order = vals.sort(dim=1, stable=True)  # stable: earlier (lower-index) rows first on ties
    return vals[:, :k], idx.gather(1, order)[:, :k]


# ----------------------------------------------------------------------------- voting


def _vote(neigh: torch.Tensor, dist: torch.Tensor, n_classes: int, weights: str) -> torch.Tensor:
    """Summed votes (m, n_classes) float64 from neighbour class indices and distances (m, k).

    ``distance`` weights are 1/d as in scikit-learn; a query with neighbours at distance 0 gives its whole
    vote to those neighbours.
    """
    if weights == "uniform":
        w = torch.ones(dist.shape, dtype=torch.float64)
    else:
        dist = dist.double()
        zero = dist == 0
        w = torch.where(zero, torch.zeros_like(dist), 1.0 / torch.where(zero, torch.ones_like(dist), dist))
        has_zero = zero.any(1, keepdim=True)
        w = torch.where(has_zero, zero.double(), w)
    votes = torch.zeros(len(neigh), n_classes, dtype=torch.float64)
    return votes.scatter_add_(1, neigh, w)


# ----------------------------------------------------------------------------- the estimator


class KNN:
    """k-nearest-neighbour classifier on raw pixels (or any feature vectors), exact and chunked.

    Parameters
    ----------
    k:
        number of neighbours that vote (``k=1``: the nearest neighbour classifier).
    metric:
        ``"l1"`` (sum of absolute differences), ``"l2"`` (Euclidean) or ``"cosine"`` (1 - cosine similarity).
    weights:
        ``"uniform"`` (one vote per neighbour) or ``"distance"`` (votes weighted by 1/distance).
    backend:
        ``"auto"`` (for uint8 pixels: L1 the numba kernel when available; L2 of images (C, H, W) with at
        least ``_select.PRUNE_MIN_TRAIN`` training images ``"pruned"``, else the exact kernel measured fastest
        on this host; else torch), ``"torch"``, ``"numba"`` (exact integer kernels, uint8 input only),
        ``"int8"`` (L2 of uint8 pixels by oneDNN's int8 GEMM, exact), ``"pruned"`` (L2 of uint8 images: pooled
        lower bounds skip most distances, exact; needs numba) or ``"faiss"`` (float32, needs faiss; ties and
        near-ties may then be ordered differently).
    batch_size:
        queries compared at once (None: chosen to keep about 64 MB of distances in memory).
    verbose:
        show a progress bar over query chunks.

    Attributes (after ``fit``)
    --------------------------
    ``classes_`` (sorted distinct labels, int64), ``n_samples_fit_``, ``n_features_in_``, ``sample_shape_``;
    ``backend_`` (the backend the last search used). ``training_metrics``: the numbers a model file
    recorded (set by ``imclass.load``; None otherwise).
    """

    training_metrics: dict | None = None

    def __init__(
        self,
        k: int = 1,
        metric: str = "l2",
        weights: str = "uniform",
        backend: str = "auto",
        batch_size: int | None = None,
        verbose: bool = False,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"expected k to be a positive integer, received k={k!r}")
        _check_choice("metric", _METRIC_ALIASES.get(metric, metric), METRICS)
        _check_choice("weights", weights, WEIGHTS)
        _check_choice("backend", backend, BACKENDS)
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"expected batch_size to be a positive integer or None, received {batch_size!r}")
        self.k = int(k)
        self.metric = metric
        self.weights = weights
        self.backend = backend
        self.batch_size = batch_size
        self.verbose = verbose

    def __repr__(self) -> str:
        return (f"KNN(k={self.k}, metric={self.metric!r}, weights={self.weights!r}, backend={self.backend!r}, "
                f"batch_size={self.batch_size!r})")

    @property
    def metric_(self) -> str:
        """The canonical metric name (``"l1"``, ``"l2"`` or ``"cosine"``)."""
        return _METRIC_ALIASES.get(self.metric, self.metric)

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, images: Any, labels: Any) -> "KNN":
        """Memorise the training images and labels (k-NN has no other training). Returns ``self``."""
        rows, shape = _rows(images, "images")
        y = as_labels(labels, len(rows))
        self._fit_X = rows
        self.classes_, self._fit_y = torch.unique(y, sorted=True, return_inverse=True)
        self.n_samples_fit_ = len(rows)
        self.n_features_in_ = rows.shape[1]
        self.sample_shape_ = shape
        self._cache: dict[str, Any] = {}
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "_fit_X"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(images, labels) first")

    def _queries(self, images: Any) -> torch.Tensor:
        self._check_fitted()
        rows, shape = _rows(images, "images")
        if rows.shape[1] != self.n_features_in_:
            raise ValueError(
                f"expected samples with {self.n_features_in_} values each (shape {self.sample_shape_}, like the "
                f"training data), received {rows.shape[1]} (shape {shape})"
            )
        return rows

    # -- search ----------------------------------------------------------------------------------
    def _resolve_backend(self, exact: bool, n_queries: int) -> str:
        backend = self.backend
        if backend == "int8":
            if not exact or self.metric_ != "l2":
                raise ValueError(f"backend='int8' computes exact squared L2 distances of uint8 pixels: expected "
                                 f"metric 'l2' and uint8 images, received metric {self.metric_!r} and "
                                 f"{'uint8' if exact else 'float'} data")
            if not _knn_int8.exact_here(self.n_features_in_):
                raise RuntimeError("backend='int8' needs torch._int_mm (oneDNN int8 GEMM) exact on this CPU, which "
                                   "it is not here: use backend='numba' or 'torch'")
        if backend == "numba":
            if not _knn_kernels.available():
                raise RuntimeError("backend='numba' needs numba and an x86-64 CPU with AVX2: pip install numba")
            if not exact:
                raise ValueError("backend='numba' computes exact integer distances: expected uint8 images for "
                                 "both training and queries, received floats (use backend='torch')")
            if self.metric_ == "cosine":
                raise ValueError("backend='numba' supports metric 'l1' and 'l2', received 'cosine'")
        if backend == "pruned" and not (exact and self.metric_ == "l2" and _knn_pruned.usable(self.sample_shape_)):
            raise ValueError("backend='pruned' computes exact L2 distances of uint8 images (C, H, W) with numba: "
                             f"expected metric 'l2', uint8 images and numba, received metric {self.metric_!r}, "
                             f"{'uint8' if exact else 'float'} samples of shape {self.sample_shape_}"
                             f"{'' if _knn_kernels.available() else ' (numba not available)'}")
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError as err:
                raise RuntimeError("backend='faiss' needs faiss: pip install faiss-cpu") from err
        if backend == "auto":
            if exact and self.metric_ == "l2" and _knn_pruned.usable(self.sample_shape_) and \
                    _select.prune_pays(n_queries, self.n_samples_fit_):
                backend = "pruned"  # images, a problem large enough: a pooled lower bound skips most distances
            elif exact and self.metric_ == "l2":  # exact kernels: the one measured fastest here for this shape
                backend = _select.fastest_l2_kernel(self.n_features_in_, n_queries, self.n_samples_fit_)
            else:
                fast = exact and self.metric_ == "l1" and _knn_kernels.available()
                backend = "numba" if fast else "torch"
        return backend

    def _block_fn(self, backend: str, exact: bool) -> tuple[Callable[[torch.Tensor, slice], torch.Tensor],
                                                             Callable[[torch.Tensor], torch.Tensor] | None]:
        """(block, row constant): ``block(query rows, training slice)`` -> ranking distances (train-side values
        cached); ``row constant(query rows)`` -> (m, 1) to add after the selection, or None."""
        metric, X = self.metric_, self._fit_X
        if backend == "int8":
            train = self._cached("int8_rows", lambda: _knn_int8.shift(X))
            tsq = self._cached("int8_sqnorm", lambda: _knn_int8.squared_norms(train))
            # ranking |s_t|^2 - 2 s_q.s_t of the shifted pixels s = u - 128; |s_q|^2 is added after the selection
            return (lambda q, s: _knn_int8.l2_ranking(_knn_int8.shift(q), train[s], tsq[s]),
                    lambda q: _knn_int8.squared_norms(_knn_int8.shift(q)).unsqueeze(1))
        if backend == "numba":
            train = self._cached("numba_rows", lambda: _knn_kernels.prepare(X.numpy()))
            if metric == "l1":
                return lambda q, s: torch.from_numpy(_knn_kernels.l1_distances(q.numpy(), train[s])), None
            tsq = self._cached("sqnorm_int", lambda: _knn_kernels.squared_norms(X.numpy()))
            # ranking distances |t|^2 - 2 q.t: the row constant |q|^2 is added back after the selection
            return (lambda q, s: torch.from_numpy(_knn_kernels.l2_ranking(q.numpy(), train[s], tsq[s])),
                    lambda q: (q.long() ** 2).sum(1, keepdim=True))
        if metric == "l1":
            return (lambda q, s: _l1_block_torch(q, X[s], exact)), None
        tn = self._cached(f"norms_{metric}", lambda: _norms(X, metric))
        block = _l2_block_torch if metric == "l2" else _cosine_block
        return (lambda q, s: block(q, X[s], _norms(q, metric), tn[s])), None

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranking distances (m, k), training indices (m, k)) of the k nearest training rows of each query."""
        exact = queries.dtype == torch.uint8 and self._fit_X.dtype == torch.uint8
        backend = self._resolve_backend(exact, len(queries))
        self.backend_ = backend
        if backend == "faiss":
            return self._search_faiss(queries, k)
        if backend == "pruned":
            return self._search_pruned(queries, k)
        return self._search_blocks(queries, k, backend, exact)

    def _search_blocks(self, queries: torch.Tensor, k: int, backend: str, exact: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_search`` with a block kernel: every distance computed, chunk by chunk."""
        n = self.n_samples_fit_
        chunk = _chunk_rows(self.n_features_in_) if backend == "torch" else 4 * _TRAIN_CHUNK
        batch = self.batch_size or max(64, _MAX_BLOCK // min(n, chunk))
        if backend == "torch" and self.batch_size is None:  # its blocks copy the query rows to float64 too
            batch = min(batch, chunk)
        block, row_constant = self._block_fn(backend, exact)  # integer L2 rankings leave out |q|^2
        bar = Progress(len(queries), f"{k}-NN {self.metric_}", unit="queries", verbose=self.verbose)
        out_d, out_i = [], []
        for q0 in range(0, len(queries), batch):
            q = queries[q0:q0 + batch]
            best = None
            for t0 in range(0, n, chunk):
                vals, idx = _smallest_k(block(q, slice(t0, t0 + chunk)), k)
                best = _merge(best, (vals, idx + t0), k)
            vals, idx = best
            if row_constant is not None:
                vals = vals.long() + row_constant(q)
            out_d.append(vals)
            out_i.append(idx)
            bar.update(len(q))
        bar.close()
        return torch.cat(out_d), torch.cat(out_i)

    def _search_pruned(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_search`` with pooled lower bounds (``_knn_pruned``): exact squared L2, most distances skipped.
        Where the bounds prune too little (images of noise), the rest of the queries take the plain kernel."""
        n = self.n_samples_fit_
        pooled_features = _knn_pruned.pooled_features(self.sample_shape_, _knn_pruned.coarse_pool(self.sample_shape_))
        index = self._cached("pruned", lambda: _knn_pruned.PrunedIndex.build(
            self._fit_X, self.sample_shape_, _select.fastest_l2_kernel(pooled_features, len(queries), n)))
        batch = self.batch_size or max(64, _MAX_BLOCK // n)
        bar = Progress(len(queries), f"{k}-NN l2", unit="queries", verbose=self.verbose)
        out_d, out_i = [], []
        for q0 in range(0, len(queries), batch):
            dist, idx, work = index.search(queries[q0:q0 + batch], k)
            out_d.append(dist)
            out_i.append(idx)
            bar.update(len(idx))
            if work > _knn_pruned.MAX_WORK_FRACTION and q0 + batch < len(queries):
                plain = _select.fastest_l2_kernel(self.n_features_in_, len(queries), n)
                dist, idx = self._search_blocks(queries[q0 + batch:], k, plain, True)
                out_d.append(dist.long())  # exact integers (float64 from the torch kernel)
                out_i.append(idx)
                break
        bar.close()
        return torch.cat(out_d), torch.cat(out_i)

    def _search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss

        metric = self.metric_

        def prep(rows: torch.Tensor) -> np.ndarray:
            x = rows.float().numpy()
            if metric == "cosine":
                x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
            return np.ascontiguousarray(x, dtype=np.float32)

        def build():
            X = prep(self._fit_X)
            index = {"l2": faiss.IndexFlatL2, "l1": lambda d: faiss.IndexFlat(d, faiss.METRIC_L1),
                     "cosine": faiss.IndexFlatIP}[metric](X.shape[1])
            index.add(X)
            return index

        index = self._cached("faiss", build)
        d, i = index.search(prep(queries), k)
        d = torch.from_numpy(d).double()
        if metric == "cosine":
            d = (1 - d).clamp(0, 2)
        return d, torch.from_numpy(i).long()

    def _distances(self, ranking: torch.Tensor) -> torch.Tensor:
        """Ranking distances -> reported distances (L2: the square root), float64."""
        d = ranking.double()
        if self.metric_ != "l2":
            return d
        # numpy's sqrt is correctly rounded (IEEE), torch's vectorised one can be 1 ulp off
        return torch.from_numpy(np.sqrt(d.clamp(min=0).numpy()))

    # -- public queries -------------------------------------------------------------------------
    def kneighbors(self, images: Any, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (float64) and training indices (int64) of the ``k`` nearest training samples, nearest first."""
        queries = self._queries(images)
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"expected k to be a positive integer, received k={k!r}")
        if k > self.n_samples_fit_:
            raise ValueError(f"expected k <= the number of training samples ({self.n_samples_fit_}), received k={k}")
        ranking, idx = self._search(queries, int(k))
        return self._distances(ranking), idx

    def _votes(self, images: Any) -> torch.Tensor:
        dist, idx = self.kneighbors(images)
        return _vote(self._fit_y[idx], dist, len(self.classes_), self.weights)

    def predict(self, images: Any) -> torch.Tensor:
        """Predicted labels (int64): the majority (or weighted) vote, smallest label among tied classes."""
        votes = self._votes(images)
        return self.classes_[votes.argmax(1)]

    def predict_proba(self, images: Any) -> torch.Tensor:
        """Vote shares (float64, (N, len(classes_))), columns in the order of ``classes_``."""
        votes = self._votes(images)
        return votes / votes.sum(1, keepdim=True)

    def score(self, images: Any, labels: Any) -> float:
        """Accuracy of ``predict(images)`` against ``labels`` (a float in [0, 1])."""
        pred = self.predict(images)
        y = as_labels(labels, len(pred))
        return float((pred == y).double().mean())

    def score_each_k(self, images: Any, labels: Any, ks: Sequence[int]) -> list[float]:
        """Accuracy for each k in ``ks`` (sorted, all <= ``self.k``) from ONE search for the ``self.k`` nearest.

        Every smaller k reads the first k entries of the neighbour lists, exactly what a separate search
        would return (ties included), so trying many k costs about as much as one.
        """
        ks = _check_ks(ks)
        if ks[-1] > self.k:
            raise ValueError(f"expected every k <= the model's k ({self.k}), received k={ks[-1]}")
        dist, idx = self.kneighbors(images)
        truth = as_labels(labels, len(idx))
        neigh = self._fit_y[idx]
        n_classes = len(self.classes_)
        return [
            float((self.classes_[_vote(neigh[:, :k], dist[:, :k], n_classes, self.weights).argmax(1)] == truth)
                  .double().mean())
            for k in ks
        ]

    # -- serialisation hooks (imclass.io) -----------------------------------------------------
    def get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, config) that rebuild this fitted model with ``KNN.from_state``: data, labels, settings."""
        self._check_fitted()
        tensors = {
            "train_images": self._fit_X.reshape(self.n_samples_fit_, *self.sample_shape_).contiguous(),
            "train_labels": self.classes_[self._fit_y].contiguous(),
            "classes": self.classes_.clone(),
        }
        config = {"kind": "knn", "k": self.k, "metric": self.metric, "weights": self.weights,
                  "backend": self.backend, "batch_size": self.batch_size, "sample_shape": list(self.sample_shape_),
                  "classes": self.classes_.tolist()}
        return tensors, config

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "KNN":
        """Rebuild a fitted KNN from ``get_state()`` output (checks the pieces fit together)."""
        missing = [key for key in ("train_images", "train_labels") if key not in tensors]
        if missing:
            raise ValueError(f"expected tensors 'train_images' and 'train_labels' in a k-NN state, missing {missing}")
        settings = {key: config[key] for key in ("k", "metric", "weights", "backend", "batch_size") if key in config}
        model = cls(**settings).fit(tensors["train_images"], tensors["train_labels"])
        if "classes" in tensors and not torch.equal(tensors["classes"].long(), model.classes_):
            raise ValueError(f"k-NN state is inconsistent: classes {tensors['classes'].tolist()} do not match the "
                             f"training labels {model.classes_.tolist()}")
        return model


NearestNeighbor = KNN
"""The nearest neighbour classifier of the lecture: ``NearestNeighbor(metric="l1")`` is ``KNN(k=1, ...)``."""


# ----------------------------------------------------------------------------- choosing k


@dataclass
class KSelection:
    """Accuracy for each k on held-out data: ``mean``/``std`` over folds (std 0 for one validation split)."""

    ks: list[int]
    mean: list[float]
    std: list[float]
    scores: list[list[float]]  # scores[f][j]: accuracy of ks[j] on fold f
    method: str  # "validation" or "cross-validation"
    metric: str
    plot: str | None = None
    best_k: int = field(init=False)

    def __post_init__(self) -> None:
        best = max(range(len(self.ks)), key=lambda j: (round(self.mean[j], 12), -self.ks[j]))
        self.best_k = self.ks[best]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self) | {"best_k": self.best_k}


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"expected a non-empty list of positive k values, received {ks}")
    return sorted(set(ks))


def choose_k(
    images: Any,
    labels: Any,
    ks: Sequence[int] = (1, 3, 5, 7, 10, 20),
    *,
    metric: str = "l2",
    weights: str = "uniform",
    folds: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    plot: str | Path | None = None,
    backend: str = "auto",
    batch_size: int | None = None,
    verbose: bool = False,
) -> KSelection:
    """Accuracy of k-NN for each k on held-out training data: a validation split or k-fold cross-validation.

    The course's recipe: never tune k on the test set. With ``val_fraction`` one random split is held out;
    with ``folds`` (the default, 5) each fold is held out in turn and the mean and std over folds reported.
    The neighbour lists are searched ONCE per held-out part, for the largest k, and every smaller k reads
    its first k entries (exactly what a separate search would return, ties included), so trying many k
    costs about as much as one. ``plot`` writes the accuracy-vs-k PNG (error bars = std over folds).
    """
    ks = _check_ks(ks)
    if folds is not None and val_fraction is not None:
        raise ValueError("expected either folds or val_fraction, received both")
    if val_fraction is None and folds is None:
        folds = 5
    rows, _ = _rows(images, "images")
    y = as_labels(labels, len(rows))
    n = len(rows)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if val_fraction is not None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"expected 0 < val_fraction < 1, received {val_fraction}")
        n_val = max(1, round(n * val_fraction))
        parts = [perm[:n_val]]
        method = "validation"
    else:
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2 or folds > n:
            raise ValueError(f"expected 2 <= folds <= number of samples ({n}), received folds={folds!r}")
        parts = list(perm.tensor_split(folds))
        method = "cross-validation"
    k_max = max(ks)
    scores = []
    for held in parts:
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        train_idx = keep.nonzero().squeeze(1)
        if k_max > len(train_idx):
            raise ValueError(f"expected every k <= the training part's size ({len(train_idx)}), received k={k_max}")
        model = KNN(k=k_max, metric=metric, weights=weights, backend=backend, batch_size=batch_size,
                    verbose=verbose).fit(rows[train_idx], y[train_idx])
        scores.append(model.score_each_k(rows[held], y[held], ks))
    s = torch.tensor(scores, dtype=torch.float64)
    std = s.std(0, correction=0) if len(parts) > 1 else torch.zeros(len(ks), dtype=torch.float64)
    result = KSelection(ks, s.mean(0).tolist(), std.tolist(), scores, method, _METRIC_ALIASES.get(metric, metric))
    if plot is not None:
        label = f"{result.metric} ({method})"
        errors = {label: result.std} if len(parts) > 1 else None
        title = f"k-NN accuracy vs k ({len(parts)}-fold CV)" if len(parts) > 1 else "k-NN accuracy vs k (validation)"
        save_line_plot(ks, {label: result.mean}, plot, xlabel="k", ylabel="accuracy", title=title, errors=errors)
        result.plot = str(plot)
    return result


# ----------------------------------------------------------------------------- the lecture's picture


def neighbour_grid(
    model: KNN,
    images: Any,
    path: str | Path,
    *,
    n_neighbours: int = 10,
    row_labels: Sequence[str] | None = None,
    query_labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the lecture's figure: each row a query image followed by its ``n_neighbours`` nearest training images.

    ``model`` must have been fitted on images (not feature vectors); its training images are shown.
    With ``query_labels`` (the queries' true classes) every picture is captioned with its class (names from
    ``class_names``): the query in blue ("query: cat"), each neighbour green when of the query's class, else red.
    """
    model._check_fitted()
    if len(model.sample_shape_) != 3:
        raise ValueError(f"expected a model fitted on images (C, H, W), received samples of shape "
                         f"{model.sample_shape_}")
    queries = as_images(images)
    _, idx = model.kneighbors(queries, k=min(n_neighbours, model.n_samples_fit_))
    train = model._fit_X.reshape(-1, *model.sample_shape_)
    rows = [[q] + [train[j] for j in row.tolist()] for q, row in zip(queries, idx)]
    if query_labels is None:
        return save_image_grid(rows, path, row_labels=row_labels)
    name = (lambda c: str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c))
    fit_labels = model.classes_[model._fit_y]  # each training image's label value
    images, captions, colors = [], [], []
    for q, row, truth in zip(queries, idx.tolist(), query_labels):
        images.append(q)
        captions.append(f"query: {name(int(truth))}")
        colors.append("tab:blue")
        for j in row:
            label = int(fit_labels[j])
            images += [train[j]]
            captions.append(name(label))
            colors.append("tab:green" if label == int(truth) else "tab:red")
    return save_captioned_grid(images, captions, path, cols=len(rows[0]), caption_colors=colors, tile_inches=1.1,
                               title=f"each row: a query (first, blue) and its {len(rows[0]) - 1} nearest training "
                                     "images (green: same class, red: another)")

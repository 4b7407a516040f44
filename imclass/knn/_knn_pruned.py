"""Exact L2 k-NN of uint8 images that skips most exact distances: a pooled lower bound prunes them.

Average-pooling an image over 2 x 2 blocks (per channel) loses little of its L2 distance to another
image, and never overstates it. For one block of 4 pixel differences ``d_i`` with sum ``S``,
Cauchy-Schwarz gives ``sum d_i^2 >= S^2 / 4``, so with ``P(x)`` the block means

    |x - y|^2 >= 4 |P(x) - P(y)|^2                                    (1)

(an odd last row or column is left out: it only adds to the left side). The block means are rounded to
bytes ``p(x) = floor((S + 2) / 4)`` so that the pooled distances come from the fast exact integer kernels
(``imclass.knn._select`` picks one for the pooled row length); the rounding error ``e(x) = |P(x) - p(x)|``
is computed per image and the triangle inequality keeps the bound safe:

    |x - y| >= 2 max(0, |p(x) - p(y)| - e(x) - e(y))                  (2)

The search, per chunk of queries (``search``):

1. the exact integer ``|p(q) - p(t)|^2`` of every query against every training image (a quarter of the
   full distance work);
2. the ``k + EXTRA`` training images with the smallest pooled distances get their exact distance; the
   k-th smallest of those, ``D_k``, is at least the true k-th nearest distance;
3. every training image whose bound (2) is <= ``D_k`` gets its exact distance (on CIFAR-10, about 30 of
   50,000 for k = 1); every other one is farther than ``D_k`` and so cannot be among the k nearest, nor
   tie with the k-th; ``e(t)`` is replaced by its maximum over the training set and the threshold is
   rounded up with a relative margin of 1e-12 (far above float64's rounding), so the bound only errs low;
4. the k nearest among those candidates, ordered by (distance, training index): the same neighbours,
   distances and tie-breaking as the full search.

Images whose pooled distances say little (noise) leave many candidates; ``search`` then returns None and
the caller computes that chunk (and the rest) with the plain kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from imclass.knn import _knn_int8, _knn_kernels
from imclass.knn._knn_torch import l2_block, norms

POOL = 2  # block side
EXTRA = 4  # training images beyond k whose exact distance sets the first threshold
MAX_CANDIDATE_FRACTION = 1 / 16  # more exact distances than this: pruning does not pay (the caller stops)
MARGIN = 1e-12  # relative safety margin on the float64 threshold


def usable(sample_shape: tuple[int, ...]) -> bool:
    """True when samples of this shape are images (C, H, W) that can be pooled (H, W >= POOL) and the pair
    kernel (numba) runs here."""
    return (len(sample_shape) == 3 and sample_shape[1] >= POOL and sample_shape[2] >= POOL
            and _knn_kernels.available())


def pooled_features(sample_shape: tuple[int, int, int]) -> int:
    """Values per pooled row of images of shape (C, H, W)."""
    c, h, w = sample_shape
    return c * (h // POOL) * (w // POOL)


def pooled(rows: torch.Tensor, sample_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image rows (N, C*H*W) -> (rounded block means (N, C*(H//2)*(W//2)) uint8, rounding errors
    ``e = |P - p|`` (N,) float64)."""
    c, h, w = sample_shape
    h2, w2 = h // POOL, w // POOL
    means, errors = [], []
    for chunk in rows.split(4096):
        img = chunk.view(len(chunk), c, h, w)[:, :, :h2 * POOL, :w2 * POOL].float()
        # (n, C, H, W) -> block means (n, C*H/2*W/2): float32 holds them exactly (quarter integers <= 255)
        mean = torch.nn.functional.avg_pool2d(img, POOL).reshape(len(chunk), -1)
        p = (mean + 0.5).floor_()  # round half up: 0..255
        r = mean.sub_(p)  # P - p, exact: a multiple of 1/4 in [-1/2, 1/4]
        means.append(p.to(torch.uint8))
        errors.append((r * r).sum(1, dtype=torch.float64).sqrt())
    return torch.cat(means), torch.cat(errors)


def _ranking(kernel: str, train: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                       Callable[[torch.Tensor], torch.Tensor]]:
    """(ranking(query rows) -> (m, N), row constant(query rows) -> (m,)): their sum is the exact squared L2
    distance of uint8 rows to every row of ``train``, computed with exact kernel ``kernel``."""
    if kernel == "int8":
        ts = _knn_int8.shift(train)
        tsq = _knn_int8.squared_norms(ts)
        return (lambda q: _knn_int8.l2_ranking(_knn_int8.shift(q), ts, tsq),
                lambda q: _knn_int8.squared_norms(_knn_int8.shift(q)))
    if kernel == "numba":
        tn, tsq = _knn_kernels.prepare(train.numpy()), _knn_kernels.squared_norms(train.numpy())
        return (lambda q: torch.from_numpy(_knn_kernels.l2_ranking(q.numpy(), tn, tsq)),
                lambda q: (q.long() ** 2).sum(1))
    tn = norms(train, "l2")
    return lambda q: l2_block(q, train, norms(q, "l2"), tn), lambda q: torch.zeros(len(q), dtype=torch.int64)


@dataclass
class PrunedIndex:
    """The training side of the pruned search, prepared once: the rows, their pooled rows and the largest
    rounding error. Build it with ``PrunedIndex.build``."""

    rows: np.ndarray  # (N, D) uint8, the exact distances' training rows
    sample_shape: tuple[int, int, int]
    kernel: str  # the exact kernel of the pooled distances
    rank: Callable[[torch.Tensor], torch.Tensor]
    row_constant: Callable[[torch.Tensor], torch.Tensor]
    error_max: float

    @classmethod
    def build(cls, rows: torch.Tensor, sample_shape: tuple[int, int, int], kernel: str) -> "PrunedIndex":
        """Prepare uint8 training image rows (N, C*H*W) for ``search``; ``kernel``: the exact L2 kernel
        (``int8``, ``numba`` or ``torch``) for the pooled rows."""
        p, e = pooled(rows, sample_shape)
        rank, row_constant = _ranking(kernel, p)
        return cls(rows.numpy(), tuple(sample_shape), kernel, rank, row_constant, float(e.max()))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(exact squared L2 distances (m, k) int64, training indices (m, k), the fraction of exact distances
        computed) of the k nearest training rows of each uint8 query row, ordered by (distance, index)."""
        n = len(self.rows)
        qp, qe = pooled(queries, self.sample_shape)
        ranking = self.rank(qp)  # (m, N): pooled squared distance less the row constant
        row_const = self.row_constant(qp).double()
        d, i, computed = _knn_kernels.pruned_nearest(ranking.numpy(), row_const.numpy(), (qe + self.error_max).numpy(),
                                                    queries.numpy(), self.rows, k, min(n, k + EXTRA))
        return torch.from_numpy(d), torch.from_numpy(i), float(computed.sum()) / (len(queries) * n)

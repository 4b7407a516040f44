"""Exact L2 k-NN of uint8 images that skips most exact distances: pooled lower bounds prune them.

Average-pooling an image over b x b blocks (per channel) loses little of its L2 distance to another
image, and never overstates it. For one block of b^2 pixel differences ``d_i`` with sum ``S``,
Cauchy-Schwarz gives ``sum d_i^2 >= S^2 / b^2``, so with ``P(x)`` the block means

    |x - y|^2 >= b^2 |P(x) - P(y)|^2                                  (1)

(the last rows or columns that do not fill a block are left out: they only add to the left side). The
block means are rounded to bytes ``p(x) = floor(P(x) + 1/2)`` so that pooled distances are exact
integers from the fast integer kernels; the rounding error ``e(x) = |P(x) - p(x)|`` is computed per image
(exactly: block means are multiples of 1/b^2) and the triangle inequality keeps the bound safe:

    |x - y| >= b max(0, |p(x) - p(y)| - e(x) - e(y))                  (2)

The search, per chunk of queries (``PrunedIndex.search``), with a coarse (``COARSE``) and a fine
(``FINE``) pooling, both 2 x 2 today (see ``COARSE``):

1. the exact integer coarse distances ``|p(q) - p(t)|^2`` of every query to every training image
   (1/4 of the full distance work; ``imclass.knn._select`` picks the kernel for the pooled row length);
2. the ``k + EXTRA`` training images with the smallest coarse distances get their exact distance; the
   k-th smallest of those, ``D_k``, is at least the true k-th nearest distance;
3. every training image whose coarse bound (2) is <= ``D_k`` is checked with the fine bound (2) (its
   own rounding error); where that is <= ``D_k`` too it gets its exact distance (on CIFAR-10 about
   40 of 50,000 for k = 1), and ``D_k`` tightens as nearer images are found. Every image skipped is
   farther than ``D_k``, so it can be neither among the k nearest nor tie with the k-th. In the coarse
   test ``e(t)`` is replaced by its maximum over the training set; the float64 thresholds carry a
   relative margin of 1e-12 (far above float64's rounding), so a bound only ever errs low;
4. the k nearest, ordered by (distance, training index): the same neighbours, distances and
   tie-breaking as the full search.

Steps 2-4 are one numba kernel (``imclass.knn._knn_kernels.pruned_nearest``). Images whose pooled
distances say little (noise) leave much work: ``search`` reports the fraction done, and the caller
computes the remaining queries with the plain kernel when pruning does not pay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from imclass.knn import _knn_int8, _knn_kernels
from imclass.knn._knn_torch import l2_block, norms

# block sides of the two poolings. A coarse 4 x 4 pooling (1/16 of the work in the GEMM) was measured
# slower on CIFAR-10: its bound lets ~700 images per query through to the fine test, against ~40 for 2 x 2.
# With both at 2 the fine test still pays its way: it uses each image's own rounding error, not the largest.
COARSE, FINE = 2, 2
EXTRA = 4  # training images beyond k whose exact distance sets the first threshold
MAX_WORK_FRACTION = 1 / 16  # more work than this share of the full search: pruning does not pay


def usable(sample_shape: tuple[int, ...]) -> bool:
    """True when samples of this shape are images (C, H, W) that can be pooled (H, W >= FINE) and the
    search's numba kernel runs here."""
    return (len(sample_shape) == 3 and sample_shape[1] >= FINE and sample_shape[2] >= FINE
            and int(np.prod(sample_shape)) <= _knn_kernels.MAX_L2_FEATURES and _knn_kernels.available())


def coarse_pool(sample_shape: tuple[int, int, int]) -> int:
    """The coarse block side for images of this shape: ``COARSE``, or ``FINE`` for smaller images."""
    return COARSE if min(sample_shape[1:]) >= COARSE else FINE


def pooled_features(sample_shape: tuple[int, int, int], pool: int) -> int:
    """Values per row of images of shape (C, H, W) pooled over ``pool`` x ``pool`` blocks."""
    c, h, w = sample_shape
    return c * (h // pool) * (w // pool)


def pooled(rows: torch.Tensor, sample_shape: tuple[int, int, int], pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image rows (N, C*H*W) -> (block means over ``pool`` x ``pool`` rounded to bytes
    (N, C*(H//pool)*(W//pool)) uint8, rounding errors ``e = |P - p|`` (N,) float64)."""
    c, h, w = sample_shape
    h2, w2 = h // pool, w // pool
    means, errors = [], []
    for chunk in rows.split(4096):
        img = chunk.view(len(chunk), c, h, w)[:, :, :h2 * pool, :w2 * pool].float()
        # (n, C, H, W) -> block means (n, C*H/b*W/b): float32 holds them exactly (multiples of 1/b^2, <= 255)
        mean = torch.nn.functional.avg_pool2d(img, pool).reshape(len(chunk), -1)
        p = (mean + 0.5).floor_()  # round half up: 0..255
        r = mean.sub_(p)  # P - p, exact: a multiple of 1/b^2 in [-1/2, 1/2)
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
    """The training side of the pruned search, prepared once: the rows, their coarse and fine pooled rows
    and rounding errors. Build it with ``PrunedIndex.build``."""

    rows: np.ndarray  # (N, D) uint8, the exact distances' training rows
    sample_shape: tuple[int, int, int]
    pool: int  # the coarse block side
    kernel: str  # the exact kernel of the coarse pooled distances
    rank: Callable[[torch.Tensor], torch.Tensor]
    row_constant: Callable[[torch.Tensor], torch.Tensor]
    error_max: float  # the largest coarse rounding error of a training image
    fine_rows: np.ndarray  # (N, C*(H//FINE)*(W//FINE)) uint8
    fine_errors: np.ndarray  # (N,) float64

    @classmethod
    def build(cls, rows: torch.Tensor, sample_shape: tuple[int, int, int], kernel: str) -> "PrunedIndex":
        """Prepare uint8 training image rows (N, C*H*W) for ``search``; ``kernel``: the exact L2 kernel
        (``int8``, ``numba`` or ``torch``) of the coarse pooled rows (``pooled_features(shape, coarse_pool(shape))``
        values each)."""
        pool = coarse_pool(sample_shape)
        p, e = pooled(rows, sample_shape, pool)
        rank, row_constant = _ranking(kernel, p)
        fine, fine_e = (p, e) if pool == FINE else pooled(rows, sample_shape, FINE)
        return cls(rows.numpy(), tuple(sample_shape), pool, kernel, rank, row_constant, float(e.max()),
                   fine.numpy(), fine_e.numpy())

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(exact squared L2 distances (m, k) int64, training indices (m, k), the work done as a fraction of
        the full search's) of the k nearest training rows of each uint8 query row, ordered by (distance, index)."""
        n = len(self.rows)
        qp, qe = pooled(queries, self.sample_shape, self.pool)
        ranking = self.rank(qp)  # (m, N): coarse pooled squared distance less the row constant
        row_const = self.row_constant(qp).double()
        fq, fqe = (qp, qe) if self.pool == FINE else pooled(queries, self.sample_shape, FINE)
        fine = (fq.numpy(), self.fine_rows, fqe.numpy(), self.fine_errors, FINE)
        d, i, work = _knn_kernels.pruned_nearest(ranking.numpy(), row_const.numpy(), (qe + self.error_max).numpy(),
                                                 self.pool, fine, queries.numpy(), self.rows, k, min(n, k + EXTRA))
        return torch.from_numpy(d), torch.from_numpy(i), float(work.sum()) / (FINE * FINE * len(queries) * n)

"""Exact integer distance kernels for uint8 pixels, compiled with numba (optional).

Pixels are bytes, so L1 and squared-L2 distances between images are integers that can be computed
exactly. BLAS has no integer GEMM and ``torch.cdist(p=1)`` is slow, so these kernels use the two x86
AVX2 instructions made for the job, reached through numba's LLVM:

- ``vpsadbw``: sum of absolute differences of 32 byte pairs in one instruction (L1).
- ``vpmaddwd``: 16 products of 16-bit integers summed in pairs into 32-bit lanes (dot products,
  hence squared L2 = |a|^2 + |b|^2 - 2 a.b). Every sum fits in int32 while the image has fewer than
  2^31 / 255^2 = 33 025 pixels x channels, which the caller checks.

Each call of a micro-kernel compares 4 query rows with 2 training rows, holding 8 vector accumulators in
registers; the driver tiles the training rows so that a tile stays in the L2 cache while every query
block streams past it, and runs groups of query blocks in parallel (numba ``prange``); see ``_knn_numba``.
Measured on one core of a Zen 3 EPYC: 120 G byte-pairs/s for L1 and 59 G multiply-adds/s for dot
products, against 42 G/s for MKL's float32 GEMM (inexact here) and 20 G/s for its float64 GEMM (exact).

The drivers need C-contiguous uint8 rows whose length is a multiple of 32, a query count that is a
multiple of 4 and a training count that is a multiple of 2; ``l1_distances`` and ``l2_ranking`` pad with
zeros (zero bytes add nothing to either distance) and drop the padding from the result, and
``prepare`` pads the training rows once. ``available()`` says whether the kernels can run here (numba
installed, x86-64 CPU with AVX2).
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

# Deferred imports (inside functions), for start-up time: llvmlite.binding, numba, torch
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

ROW_ALIGN = 32  # bytes per row must be a multiple of this
QUERY_BLOCK = 4
TRAIN_BLOCK = 2
MAX_L2_FEATURES = (2**31 - 1) // (255 * 255)  # int32 accumulators stay exact below this
FAST_METRICS = ("l1", "l2")  # metrics for which backend="auto" picks these kernels


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when numba is installed and the CPU has AVX2 (the kernels use its instructions)."""
    try:
        import llvmlite.binding as llvm
        import numba  # noqa: F401
    except ImportError:
        return False
    try:
        return "+avx2" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:  # pragma: no cover - unusual llvmlite builds
        return False


@functools.lru_cache(maxsize=1)
def _compiled():
    """(L1, L2 and pruned k-NN drivers), compiled by numba on first use and cached on disk."""
    from imclass.knn import _knn_numba  # deferred: importing numba takes seconds (start-up time)

    return _knn_numba.l1_driver, _knn_numba.l2_driver, _knn_numba.pruned_driver


@contextlib.contextmanager
def _match_torch_threads():
    """Use as many numba threads as torch does (``torch.set_num_threads`` governs both), and keep torch's
    count: numba's OpenMP layer, started by the first parallel call, resets the process's OpenMP thread
    count (a user's ``torch.set_num_threads(1)`` would silently become the core count)."""
    import numba
    import torch

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _pad(x: np.ndarray, row_multiple: int) -> np.ndarray:
    n, d = x.shape
    n_pad, d_pad = -n % row_multiple, -d % ROW_ALIGN
    if n_pad == 0 and d_pad == 0 and x.flags.c_contiguous:
        return x
    out = np.zeros((n + n_pad, d + d_pad), dtype=np.uint8)
    out[:n, :d] = x
    return out


def prepare(rows: np.ndarray) -> np.ndarray:
    """Training rows padded with zero columns to a multiple of 32 bytes (done once, reused by every query)."""
    return _pad(np.ascontiguousarray(rows, dtype=np.uint8), 1)


def l1_distances(queries: np.ndarray, train: np.ndarray, tile: int = 64) -> np.ndarray:
    """Exact L1 distances (int64, (M, N)) between uint8 rows of ``queries`` (M, D) and ``train`` (N, D)."""
    nq, nt = len(queries), len(train)
    q, t = _pad(queries, QUERY_BLOCK), _pad(train, TRAIN_BLOCK)
    out = np.empty((len(q), len(t)), dtype=np.int64)
    with _match_torch_threads():
        _compiled()[0](q, t, out, tile + tile % 2)
    return out[:nq, :nt]


def squared_norms(rows: np.ndarray) -> np.ndarray:
    """Exact squared L2 norms (int64) of uint8 rows."""
    return np.einsum("ij,ij->i", rows, rows, dtype=np.int64)


def l2_ranking(queries: np.ndarray, train: np.ndarray, train_sq: np.ndarray | None = None,
               tile: int = 64) -> np.ndarray:
    """Exact ``|t|^2 - 2 q.t`` (int64, (M, N)): squared L2 distances less ``|q|^2`` (constant along a row).

    ``train_sq`` are the training rows' squared norms (``squared_norms(train)``, computed once by the caller).
    Needs fewer than ``MAX_L2_FEATURES`` values per row (the int32 accumulators stay exact).
    """
    if queries.shape[1] > MAX_L2_FEATURES:
        raise ValueError(f"expected at most {MAX_L2_FEATURES} values per row for exact int32 dot products, "
                         f"received {queries.shape[1]}")
    nq, nt = len(queries), len(train)
    q, t = _pad(queries, QUERY_BLOCK), _pad(train, TRAIN_BLOCK)
    sq = squared_norms(train) if train_sq is None else train_sq
    if len(sq) != len(t):
        sq = np.concatenate([sq, np.zeros(len(t) - len(sq), dtype=np.int64)])
    out = np.empty((len(q), len(t)), dtype=np.int64)
    with _match_torch_threads():
        _compiled()[1](q, t, np.ascontiguousarray(sq, dtype=np.int64), out, tile + tile % 2)
    return out[:nq, :nt]


def pruned_nearest(ranking: np.ndarray, row_const: np.ndarray, radius_extra: np.ndarray, pool: int,
                   fine: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], queries: np.ndarray,
                   train: np.ndarray, k: int, seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact squared L2 distances (M, k) int64, training indices (M, k), work per query (M,)) of the k
    nearest training rows of each uint8 query row, skipping rows that pooled lower bounds exclude.

    ``ranking`` (M, N) plus ``row_const`` (M,) are the squared distances of rows pooled over ``pool`` x
    ``pool`` blocks, ``radius_extra`` (M,) their rounding allowance (``imclass.knn._knn_pruned``); ``fine``
    = (query rows, training rows, query errors, training errors, block side) of a finer pooling, checked
    before an exact distance; ``seeds`` >= k rows nearest by the coarse distance are computed first. The
    work is counted in fine-bound units (an exact distance: block side^2). Neighbours are ordered by
    (distance, index), as the full search orders them.
    """
    nq, nt = ranking.shape
    if not 1 <= k <= seeds <= nt:
        raise ValueError(f"expected 1 <= k <= seeds <= training rows, received k={k}, seeds={seeds}, rows={nt}")
    fq, ft, fqe, fte, fine_pool = fine
    c = np.ascontiguousarray
    out_d = np.empty((nq, k), dtype=np.int64)
    out_i = np.empty((nq, k), dtype=np.int64)
    out_n = np.empty(nq, dtype=np.int64)
    with _match_torch_threads():
        _compiled()[2](c(ranking), c(row_const, dtype=np.float64), c(radius_extra, dtype=np.float64), pool,
                       c(fq), c(ft), c(fqe, dtype=np.float64), c(fte, dtype=np.float64), fine_pool,
                       c(queries), c(train), k, seeds, out_d, out_i, out_n)
    return out_d, out_i, out_n

"""Which exact L2 kernel is fastest on this host for a problem's shape: measured once, then remembered.

Three kernels compute exact squared-L2 rankings for uint8 pixels, and which one wins depends on the
CPU *and* on the shape of the blocks the search computes: ``int8`` (oneDNN's int8 GEMM through
``torch._int_mm``; VNNI's ``vpdpbusd`` does 4x the work of ``vpmaddwd`` but pays a per-call setup that
small blocks do not amortise), ``numba`` (``vpmaddwd`` on AVX2) and ``torch`` (float64 GEMM, always
there, the fallback). ``l2_choice(n_features, queries, train)`` decides:

- the search computes blocks of at most ``block_shape(queries, train)`` (query rows x training rows);
  blocks fall into a few shape classes (``shape_class``: queries <= 16, 64, 256 or more; training rows
  <= 1,024, 4,096 or more);
- every available exact integer kernel (int8, numba; torch only when neither runs) is timed on a block
  of that class's size, selection of the nearest included, after one warm-up call, interleaved, best of
  3 rounds, so a busy machine slows them alike;
- the choice is remembered in ``$IMCLASS_CACHE/knn_kernels.json`` keyed by CPU model and flags, torch
  version, thread count, row length and shape class, and in memory, so it is measured once per host and
  shape class: a user's second search of the same class pays no measurement and no warm-up.

Images (C, H, W) with at least ``PRUNE_MIN_TRAIN`` training images take the pruned search instead
(``prune_pays``): pooled lower bounds, computed with the kernel chosen here for the pooled row length.
"""
from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import numpy as np
import torch

from imclass.data.download import recall, remember
from imclass.knn import _knn_int8, _knn_kernels
from imclass.knn._knn_torch import l2_block, norms, smallest_k

L2_KERNELS = ("int8", "numba", "torch")
RECORD_FILE = "knn_kernels.json"
_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu() -> tuple[str, tuple[str, ...]]:
    """(model name, the vector flags of ``_FLAGS`` it has) from /proc/cpuinfo (Linux; else the machine type)."""
    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, tuple(f for f in _FLAGS if f in flags)


def vnni_here() -> bool:
    """True when the CPU has an int8 dot-product instruction (VNNI or AMX)."""
    return any(f in cpu()[1] for f in VNNI_FLAGS)


def host_key(n_features: int) -> str:
    """What the kernel speeds depend on: CPU model and vector flags, torch version and threads, row length."""
    model, flags = cpu()
    return f"{model}|{'+'.join(flags) or '-'}|torch {torch.__version__}|threads {torch.get_num_threads()}|D {n_features}"


def available_l2_kernels(n_features: int) -> list[str]:
    """The exact L2 kernels that can run here for rows of ``n_features`` uint8 values."""
    names = []
    if _knn_int8.exact_here(n_features):
        names.append("int8")
    if _knn_kernels.available() and n_features <= _knn_kernels.MAX_L2_FEATURES:
        names.append("numba")
    return names + ["torch"]


def _runner(name: str, q: torch.Tensor, t: torch.Tensor):
    """A no-argument function computing one block of rankings with kernel ``name`` (train side prepared)."""
    if name == "int8":
        qs, ts = _knn_int8.shift(q), _knn_int8.shift(t)
        tsq = _knn_int8.squared_norms(ts)
        return lambda: _knn_int8.l2_ranking(qs, ts, tsq)
    if name == "numba":
        qn, tn = q.numpy(), _knn_kernels.prepare(t.numpy())
        tsq = _knn_kernels.squared_norms(t.numpy())
        return lambda: torch.from_numpy(_knn_kernels.l2_ranking(qn, tn, tsq))
    tn = norms(t, "l2")
    return lambda: l2_block(q, t, norms(q, "l2"), tn)


# query rows, training rows of one block of the exact integer kernels (see estimator._search)
TRAIN_BLOCK = 4 * 4096
MAX_BLOCK = 2**23
QUERY_CLASSES = (16, 64, 256, 512)  # upper bounds; the last one is the size measured for every larger block
TRAIN_CLASSES = (1024, 4096)  # upper bounds; larger blocks are measured at 4,096 rows (the per-row cost is flat)


def block_shape(queries: int, train: int) -> tuple[int, int]:
    """(query rows, training rows) of the largest block the search computes for this problem."""
    t = min(train, TRAIN_BLOCK)
    return min(queries, max(64, MAX_BLOCK // max(t, 1))), t


def shape_class(queries: int, train: int) -> tuple[int, int]:
    """The shape class of a problem: its block's query and training rows rounded up to a class bound."""
    q, t = block_shape(queries, train)
    qc = next((c for c in QUERY_CLASSES if q <= c), QUERY_CLASSES[-1])
    tc = next((c for c in TRAIN_CLASSES if t <= c), 4 * TRAIN_CLASSES[-1])
    return qc, tc


def measure_l2_kernels(n_features: int, queries: int = 128, train: int = 2048, rounds: int = 3,
                       kernels: list[str] | None = None) -> dict[str, float]:
    """Seconds per block (``queries`` x ``train`` rows of ``n_features`` bytes, nearest selected) of each
    kernel in ``kernels`` (default: every available exact integer kernel), interleaved, best of ``rounds``."""
    gen = np.random.default_rng(0)
    q = torch.from_numpy(gen.integers(0, 256, (queries, n_features), dtype=np.uint8))
    t = torch.from_numpy(gen.integers(0, 256, (train, n_features), dtype=np.uint8))
    names = kernels if kernels is not None else _candidates(n_features)
    runners = {name: _runner(name, q, t) for name in names}
    for run in runners.values():
        smallest_k(run(), 1)  # warm up: numba loads its compiled code, oneDNN builds its kernel
    best = {name: float("inf") for name in runners}
    for r in range(rounds):
        for name, run in (runners.items() if r % 2 == 0 else reversed(runners.items())):
            start = time.perf_counter()
            smallest_k(run(), 1)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _candidates(n_features: int) -> list[str]:
    """The kernels worth timing: the exact integer ones, or torch alone when neither runs here."""
    available = available_l2_kernels(n_features)
    return [k for k in available if k != "torch"] or ["torch"]


@functools.lru_cache(maxsize=64)
def _fastest(n_features: int, shape: tuple[int, int]) -> str:
    return _choose(n_features, shape)["kernel"]


def fastest_l2_kernel(n_features: int, queries: int = 512, train: int = TRAIN_BLOCK) -> str:
    """The fastest exact L2 kernel here for ``queries`` x ``train`` rows of ``n_features`` values (remembered)."""
    return _fastest(n_features, shape_class(queries, train))


def forget() -> None:
    """Drop the choices remembered in memory (the record file stays): the next search reads or measures."""
    _fastest.cache_clear()


def record_key(n_features: int, shape: tuple[int, int]) -> str:
    """The key of a shape class's choice in the record file."""
    return f"{host_key(n_features)}|block {shape[0]}x{shape[1]}"


def l2_choice(n_features: int, queries: int = 512, train: int = TRAIN_BLOCK) -> dict:
    """``{"kernel", "reason", "seconds", "shape"}``: the L2 kernel for this host and problem shape, and why
    (``"only kernel"``, ``"measured"``, or the remembered record)."""
    return _choose(n_features, shape_class(queries, train))


def _choose(n_features: int, shape: tuple[int, int]) -> dict:
    key = record_key(n_features, shape)
    entry = recall(RECORD_FILE, key)
    available = available_l2_kernels(n_features)
    if isinstance(entry, dict) and entry.get("kernel") in available:
        return entry
    names = _candidates(n_features)
    if len(names) == 1:
        choice = {"kernel": names[0], "reason": "only kernel", "seconds": {}, "shape": list(shape)}
    else:
        seconds = measure_l2_kernels(n_features, queries=shape[0], train=min(shape[1], TRAIN_CLASSES[-1]),
                                     kernels=names)
        choice = {"kernel": min(seconds, key=seconds.get), "reason": "measured", "seconds": seconds,
                  "shape": list(shape)}
    remember(RECORD_FILE, key, choice)
    return choice


# Training images from which the pruned search (imclass.knn._knn_pruned) pays: on CIFAR-10 (one thread,
# interleaved, a busy host: rough) it took 0.4-0.6x the int8 kernel's time from 100 x 1,000 to 2,000 x
# 50,000; below this size both take milliseconds and the plain kernel has fewer steps.
# A rule, not a measurement like the kernel choice: how much pruning saves depends on the images, so
# random blocks cannot time it; the search itself switches to the plain kernel when pruning does not pay.
PRUNE_MIN_TRAIN = 2048


def prune_pays(queries: int, train: int) -> bool:
    """True when the pruned L2 search of images is expected to beat the plain kernels for this shape
    (``queries`` x ``train`` images)."""
    return train >= PRUNE_MIN_TRAIN

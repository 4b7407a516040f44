"""Which exact L2 kernel is fastest on this host: known from the CPU's features, else measured once.

Three kernels compute exact squared-L2 rankings for uint8 pixels, and which one wins depends on the
CPU: ``int8`` (oneDNN's int8 GEMM through ``torch._int_mm``), ``numba`` (``vpmaddwd`` on AVX2) and
``torch`` (float64 GEMM, always there). ``fastest_l2_kernel`` decides:

- a CPU with VNNI (``avx512_vnni``, ``avx_vnni`` or ``amx_int8``) multiplies and adds 4 byte pairs per
  32-bit lane in one instruction (``vpdpbusd``), 4x the work of ``vpmaddwd``: ``int8`` wins there (when
  ``_knn_int8.exact_here()``) and no timing is needed; timings on a shared, busy machine are noisy;
- on other CPUs every available exact kernel is timed on a small problem of the real row length
  (128 x 2048 rows, best of 5 rounds, kernels interleaved so that a busy machine slows them alike).

The choice is remembered in ``$IMCLASS_CACHE/knn_kernels.json`` keyed by CPU model and flags, torch
version, thread count and row length, so the check happens once per host.
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
from imclass.knn._knn_torch import l2_block, norms

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
        return lambda: _knn_kernels.l2_ranking(qn, tn, tsq)
    tn = norms(t, "l2")
    return lambda: l2_block(q, t, norms(q, "l2"), tn)


def measure_l2_kernels(n_features: int, queries: int = 128, train: int = 2048, rounds: int = 5) -> dict[str, float]:
    """Seconds per block (``queries`` x ``train`` rows of ``n_features`` bytes) of each available exact kernel."""
    gen = np.random.default_rng(0)
    q = torch.from_numpy(gen.integers(0, 256, (queries, n_features), dtype=np.uint8))
    t = torch.from_numpy(gen.integers(0, 256, (train, n_features), dtype=np.uint8))
    runners = {name: _runner(name, q, t) for name in available_l2_kernels(n_features)}
    for run in runners.values():
        run()  # warm up: numba loads its compiled code, oneDNN builds its kernel
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=16)
def fastest_l2_kernel(n_features: int) -> str:
    """The fastest exact L2 kernel here for rows of ``n_features`` values: remembered, else decided once."""
    return l2_choice(n_features)["kernel"]


def l2_choice(n_features: int) -> dict:
    """``{"kernel", "reason", "seconds"}``: the L2 kernel for this host and why (``"VNNI"`` or ``"measured"``)."""
    key = host_key(n_features)
    entry = recall(RECORD_FILE, key)
    available = available_l2_kernels(n_features)
    if isinstance(entry, dict) and entry.get("kernel") in available:
        return entry
    if "int8" in available and vnni_here():
        choice = {"kernel": "int8", "reason": "VNNI", "seconds": {}}
    else:
        seconds = measure_l2_kernels(n_features)
        choice = {"kernel": min(seconds, key=seconds.get), "reason": "measured", "seconds": seconds}
    remember(RECORD_FILE, key, choice)
    return choice

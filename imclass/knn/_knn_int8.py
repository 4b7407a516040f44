"""Exact squared-L2 ranking for uint8 pixels from an int8 matrix product (``torch._int_mm``, oneDNN).

Squared L2 distances do not change when both images are shifted by the same amount, so the pixels
``u`` in 0..255 are shifted to ``s = u - 128`` in -128..127 and fit int8 (one XOR with 0x80). Then

    |q - t|^2 = |s_q|^2 + |s_t|^2 - 2 s_q . s_t

with the dot products from oneDNN's int8 GEMM (VNNI ``vpdpbusd`` on AVX-512/AVX-VNNI hosts), which
accumulates in int32. Exactness bounds (D = values per image):

- ``|s_q . s_t| <= D * 128^2``: fits int32 (and every partial sum too) while D <= 131 071
  (``INT32_DOT_MAX_FEATURES``); longer rows are cut into pieces of at most that many columns whose
  products are summed in int64.
- the ranking ``|s_t|^2 - 2 s_q . s_t`` lies within +-3 * D * 128^2: kept in int32 while D <= 43 690
  (``INT32_RANKING_MAX_FEATURES``; CIFAR-10 has 3 072), else int64.

``|s_q|^2`` is the same for a whole row of the ranking, so it is added back after the k smallest are
chosen. oneDNN's int8 kernels on hosts without VNNI may combine products in saturating int16
(``vpmaddubsw``); ``exact_here()`` checks this host with the extreme values before the kernel is used.
"""
from __future__ import annotations

import functools

import torch

SHIFT = 128
INT32_DOT_MAX_FEATURES = (2**31 - 1) // (SHIFT * SHIFT)  # 131071
INT32_RANKING_MAX_FEATURES = (2**31 - 1) // (3 * SHIFT * SHIFT)  # 43690


def shift(rows: torch.Tensor) -> torch.Tensor:
    """uint8 rows (N, D) -> int8 rows holding ``u - 128`` (the same bits with the top one flipped)."""
    if rows.dtype != torch.uint8:
        raise TypeError(f"expected uint8 rows, received {rows.dtype}")
    return rows.contiguous().view(torch.int8).bitwise_xor(-128)


def squared_norms(shifted: torch.Tensor) -> torch.Tensor:
    """Exact ``|s|^2`` (int64, (N,)) of int8 rows."""
    return torch.cat([(c.to(torch.int32) ** 2).sum(1, dtype=torch.int64) for c in shifted.split(4096)])


def _dots(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``q @ t.T`` for int8 rows: int32 when one GEMM is exact, else int64 from column pieces."""
    d = q.shape[1]
    if d <= INT32_DOT_MAX_FEATURES:
        return torch._int_mm(q, t.T)
    out = torch.zeros((len(q), len(t)), dtype=torch.int64)
    for c in range(0, d, INT32_DOT_MAX_FEATURES):
        out += torch._int_mm(q[:, c:c + INT32_DOT_MAX_FEATURES].contiguous(),
                             t[:, c:c + INT32_DOT_MAX_FEATURES].contiguous().T)
    return out


def l2_ranking(q: torch.Tensor, t: torch.Tensor, t_sq: torch.Tensor) -> torch.Tensor:
    """Exact ``|s_t|^2 - 2 s_q . s_t`` ((M, N), int32 or int64) for shifted int8 rows ``q`` (M, D), ``t`` (N, D).

    ``t_sq``: ``squared_norms(t)``. Adding ``|s_q|^2`` to a row gives the squared L2 distances.
    """
    dots = _dots(q, t)
    if q.shape[1] <= INT32_RANKING_MAX_FEATURES:
        return dots.mul_(-2).add_(t_sq.to(torch.int32))
    return dots.to(torch.int64).mul_(-2).add_(t_sq)


@functools.lru_cache(maxsize=8)
def exact_here(n_features: int = 3072) -> bool:
    """True when ``torch._int_mm`` runs here and is exact at the extremes (no int16 saturation) for rows of
    ``n_features`` values, on the shapes the search uses (one query, a few, and full blocks)."""
    try:
        d = min(int(n_features), INT32_DOT_MAX_FEATURES)
        gen = torch.Generator().manual_seed(0)
        for m, n in ((1, 3), (7, 33), (64, 130), (256, 512)):
            q = torch.randint(-128, 128, (m, d), dtype=torch.int8, generator=gen)
            t = torch.randint(-128, 128, (n, d), dtype=torch.int8, generator=gen)
            # the worst cases: every product +128*128 (-128 . -128) or -128*127, and 127 against -128
            q[0], t[0], t[1] = -128, -128, 127
            if m > 1:
                q[1] = 127
            got = torch._int_mm(q, t.T)
            if not torch.equal(got.double(), q.double() @ t.double().T):  # float64 holds these integers exactly
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):  # no _int_mm on this build / device
        return False

"""All pairs of 64-bit hashes within a Hamming distance, without comparing every pair.

Multi-index hashing (Norouzi, Punjani & Fleet, 2012): split each 64-bit hash into ``m`` blocks.
Two hashes at most ``d`` bits apart differ in at most ``d // m`` bits in at least one block
(pigeonhole), so every such pair shares, in some block, a key within ``r = d // m`` bits. The
index sorts each block's keys once; a query looks up its block keys with up to ``r`` bits flipped,
and each candidate is verified on all 64 bits. A pair found in block ``k`` is kept only when no
earlier block would have found it (its distance there exceeds ``r``), so each pair comes out once
without a set of seen pairs.

Memory is O(N) for the index plus at most ``budget`` candidates at a time (no N x chunk matrix);
time is about ``N * probes * (1 + N / 2**block_bits)``, ``m`` chosen to make that small (blocks of
about log2 N bits), instead of N^2 / 2 comparisons.

    i, j, dist = near_pairs(hashes, 6)               # uint64 (N,) -> pairs i < j, distance <= 6
    i, j, dist = near_pairs(queries, 2, hashes)      # every (query, hash) pair within 2 bits
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np

__all__ = ["near_pairs"]

_BITS = 64
_BUDGET = 1 << 22  # candidates verified at once (about 100 MB of temporaries at most)
_TABLE_BITS = 22  # blocks this wide or narrower are looked up in a table of 2**bits offsets (32 MB at most)


def _blocks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of ``m`` blocks covering the 64 bits, widths differing by at most one."""
    base, extra = divmod(_BITS, m)
    out, shift = [], 0
    for k in range(m):
        width = base + (1 if k < extra else 0)
        out.append((shift, width))
        shift += width
    return out


def _masks(width: int, r: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``r`` bits set (the probes of one block), uint64."""
    masks = [0]
    for t in range(1, r + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(width), t)]
    return np.array(masks, dtype=np.uint64)


def _choose_blocks(n_query: int, n_index: int, d: int) -> int:
    """The block count with the smallest estimated cost (lookups plus candidates to verify), or 0 when
    comparing every pair costs less (tiny sets, or distances so large that most pairs are candidates)."""
    best, best_cost = 0, 2.0 * n_query * n_index
    for m in range(1, min(d + 1, 16) + 1):  # blocks of 4 bits at least
        r = d // m
        width = _BITS // m
        probes = sum(math.comb(width, t) for t in range(r + 1))
        lookup = 1.0 if width <= _TABLE_BITS else math.log2(n_index + 2)  # a gather, or a binary search
        cost = m * probes * n_query * (lookup + 3.0 * n_index / 2.0 ** width)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _key(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    return (h >> np.uint64(shift)) & np.uint64((1 << width) - 1) if width < _BITS else h.copy()


def _all_pairs(q: np.ndarray, x: np.ndarray, d: int, within: bool, budget: int):
    """Every pair compared, ``budget // len(x)`` query rows at a time (bounded memory, O(N*M) time)."""
    rows = max(1, budget // len(x))
    found_i, found_j = [], []
    for start in range(0, len(q), rows):
        dist = np.bitwise_count(q[start : start + rows, None] ^ x[None, :])  # (rows, M)
        hit = dist <= d
        if within:
            hit &= np.arange(len(x))[None, :] > np.arange(start, start + len(hit))[:, None]
        i, j = np.nonzero(hit)
        found_i.append(i + start)
        found_j.append(j)
    i, j = np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64)
    return i, j, np.bitwise_count(q[i] ^ x[j]).astype(np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int, other: np.ndarray | None = None, *,
               budget: int = _BUDGET, blocks: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of uint64 hashes at most ``max_distance`` bits apart, as arrays ``(i, j, distance)``.

    Within ``hashes`` (each pair once, ``i < j``), or between ``hashes`` (``i``) and ``other``
    (``j``) when given. Sorted by ``i`` then ``j`` (the order of a row-by-row brute force).
    ``budget`` bounds the candidates held at once; ``blocks`` fixes the number of blocks (default:
    the cheapest plan by an estimate, which may be comparing every pair for tiny sets or large distances).
    """
    if not 0 <= max_distance <= _BITS:
        raise ValueError(f"expected 0 <= max_distance <= 64, received max_distance={max_distance}")
    q = np.ascontiguousarray(hashes, dtype=np.uint64).ravel()
    x = q if other is None else np.ascontiguousarray(other, dtype=np.uint64).ravel()
    empty = np.zeros(0, np.int64)
    if len(q) == 0 or len(x) == 0:
        return empty, empty.copy(), empty.copy()
    if blocks is not None and not 1 <= blocks <= _BITS:
        raise ValueError(f"expected 1 <= blocks <= 64, received blocks={blocks}")
    m = blocks or _choose_blocks(len(q), len(x), max_distance)
    if m == 0:
        return _all_pairs(q, x, max_distance, other is None, budget)
    r = max_distance // m
    layout = _blocks(m)
    qkeys = [_key(q, s, w) for s, w in layout]
    xkeys = [_key(x, s, w) for s, w in layout]
    found_i, found_j = [], []
    for k, (shift, width) in enumerate(layout):
        order = np.argsort(xkeys[k], kind="stable")
        sorted_keys = xkeys[k][order]
        table = None
        if width <= _TABLE_BITS:  # where each key's run starts in sorted_keys: a lookup is one gather
            table = np.zeros((1 << width) + 1, np.int64)
            np.cumsum(np.bincount(sorted_keys.astype(np.int64), minlength=1 << width), out=table[1:])
        for mask in _masks(width, r):
            probe = qkeys[k] ^ mask
            if table is not None:
                lo, hi = table[probe.astype(np.int64)], table[probe.astype(np.int64) + 1]
            else:
                lo = np.searchsorted(sorted_keys, probe, side="left")
                hi = np.searchsorted(sorted_keys, probe, side="right")
            counts = hi - lo
            hit = np.flatnonzero(counts)
            if len(hit) == 0:
                continue
            ends = np.cumsum(counts[hit])
            start = 0
            while start < len(hit):  # queries whose candidates fit in the budget (at least one query)
                stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + budget, "right")))
                rows = hit[start:stop]
                n = counts[rows]
                i = np.repeat(rows, n)
                offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
                j = order[np.repeat(lo[rows], n) + offsets]
                keep = np.bitwise_count(q[i] ^ x[j]) <= max_distance
                if other is None:
                    keep &= j > i
                for e in range(k):  # an earlier block found it already: drop it here
                    keep &= np.bitwise_count(qkeys[e][i] ^ xkeys[e][j]) > r
                found_i.append(i[keep])
                found_j.append(j[keep])
                start = stop
    if not found_i:
        return empty, empty.copy(), empty.copy()
    i = np.concatenate(found_i).astype(np.int64)
    j = np.concatenate(found_j).astype(np.int64)
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    return i, j, np.bitwise_count(q[i] ^ x[j]).astype(np.int64)

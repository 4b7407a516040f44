"""The torch distance blocks of the k-NN estimator (the kernels any host has): a block function maps
(query rows (m, D), training rows (n, D)) to ranking distances (m, n) as float64."""
from __future__ import annotations

import torch

__all__ = ["TRAIN_CHUNK", "chunk_rows", "cosine_block", "l1_block", "l2_block", "norms", "smallest_k"]

TRAIN_CHUNK = 4096  # training rows compared with a query chunk at once
CHUNK_BYTES = 1 << 27  # the float64 copy a block makes of a chunk of rows stays under 128 MB


def chunk_rows(width: int) -> int:
    """Rows per chunk for rows of ``width`` values: ``TRAIN_CHUNK``, fewer for wide rows (images at 224 px:
    111), so that a chunk's float64 copy stays under ``CHUNK_BYTES`` whatever the image size."""
    return max(1, min(TRAIN_CHUNK, CHUNK_BYTES // (8 * max(1, width))))


def l2_block(q: torch.Tensor, t: torch.Tensor, qn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (m, n) of query rows to training rows, given their squared norms."""
    # |q|^2 + |t|^2 - 2 q.t in float64: exact for uint8 pixels (integers below 2^53)
    d = torch.addmm(tn.unsqueeze(0), q.double(), t.double().T, beta=1, alpha=-2)
    return d.add_(qn.unsqueeze(1)).clamp_(min=0)


def l1_block(q: torch.Tensor, t: torch.Tensor, exact: bool) -> torch.Tensor:
    """L1 distances (m, n) of query rows to training rows (float32 when exact for uint8)."""
    # float32 is exact for uint8 while D * 255 < 2^24 (every partial sum is a small integer)
    dtype = torch.float32 if exact and q.shape[1] * 255 < 2**24 else torch.float64
    return torch.cdist(q.to(dtype), t.to(dtype), p=1).double()


def cosine_block(q: torch.Tensor, t: torch.Tensor, qn: torch.Tensor, tn: torch.Tensor) -> torch.Tensor:
    """Cosine distances (m, n) of query rows to training rows, given their norms."""
    # 1 - cos(q, t); a zero vector has similarity 0 with everything (as scikit-learn's normalize)
    sim = (q.double() @ t.double().T).div_(qn.unsqueeze(1)).div_(tn.unsqueeze(0))
    return sim.neg_().add_(1).clamp_(0, 2)


def norms(rows: torch.Tensor, metric: str) -> torch.Tensor | None:
    """Per-row quantity the block function needs: squared norms (L2), norms with 0 -> 1 (cosine)."""
    if metric == "l1":
        return None
    sq = torch.cat([(c.double() ** 2).sum(1) for c in rows.split(chunk_rows(rows.shape[1]))])
    if metric == "l2":
        return sq
    n = sq.sqrt()
    return torch.where(n == 0, torch.ones_like(n), n)


def smallest_k(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of ``d`` (m, n), ordered by (value, column): a stable top-k.

    ``torch.topk`` picks an arbitrary member of a tie. It is asked for k + 1 entries: where the (k+1)-th
    smallest value equals the k-th, a tie straddles the cut and the row is redone with a stable sort, so
    the lower column always wins (scikit-learn's rule).
    """
    if k == 1:  # torch.min returns the first (lowest-column) minimum of a row: documented
        vals, idx = d.min(dim=1, keepdim=True)
        return vals, idx
    k = min(k, d.shape[1])
    extra = int(k < d.shape[1])
    vals, idx = torch.topk(d, k + extra, dim=1, largest=False, sorted=True)
    tied = vals[:, k - 1] == vals[:, k] if extra else torch.zeros(len(d), dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    # order the selected entries by (value, column): sort by column, then stable sort by value
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, stable=True)
    idx = idx.gather(1, order)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        v, i = d[rows].sort(dim=1, stable=True)
        vals[rows], idx[rows] = v[:, :k], i[:, :k]
    return vals, idx

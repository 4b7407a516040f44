"""The numba half of ``imclass.knn._knn_kernels`` (imported only when numba is installed and the CPU has AVX2).

Two LLVM intrinsics compute a 4 x 2 block of distances (4 query rows against 2 training rows) with
``vpsadbw`` (L1) or ``vpmaddwd`` (dot products) and 8 vector accumulators kept in registers; the drivers
run groups of 32 queries in parallel, each walking the training rows in tiles that stay in the L2 cache.
Compiled code is cached on disk (``cache=True``), so only the first run pays the compilation.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

QUERY_BLOCK = 4
TRAIN_BLOCK = 2

i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
v32i8, v16i8, v16i16 = ir.VectorType(i8, 32), ir.VectorType(i8, 16), ir.VectorType(i16, 16)
v4i64, v8i32 = ir.VectorType(i64, 4), ir.VectorType(i32, 8)


def _row_pointers(context, builder, aryty, ary, first, count):
    # pointers (i8*) to rows first .. first+count-1 of a C-contiguous 2-D uint8 array
    arr = context.make_array(aryty)(context, builder, ary)
    stride = builder.extract_value(arr.strides, 0)
    base = builder.bitcast(arr.data, i8.as_pointer())
    return [builder.gep(base, [builder.mul(builder.add(first, ir.Constant(i64, r)), stride)]) for r in range(count)]


def _load(builder, ptr, offset, vty):
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vty.as_pointer()), align=1)


def _hsum(builder, vec, n):
    total = builder.extract_element(vec, ir.Constant(i32, 0))
    total = builder.sext(total, i64) if total.type != i64 else total
    for lane in range(1, n):
        x = builder.extract_element(vec, ir.Constant(i32, lane))
        total = builder.add(total, builder.sext(x, i64) if x.type != i64 else x)
    return total


def _make_block_intrinsic(kind):
    """An intrinsic ``block(q, t, i, j)`` -> 8 int64 sums: rows i..i+3 of q against rows j, j+1 of t.

    ``kind="sad"``: sums of absolute differences (``vpsadbw`` on 32 bytes, 64-bit lanes).
    ``kind="dot"``: dot products (bytes widened to 16 bits, ``vpmaddwd`` on 16 of them, 32-bit lanes).
    The loop runs over the row length / 32 (sad) or / 16 (dot); rows are padded to 32 bytes.
    """

    @intrinsic
    def block(typingctx, q, t, i, j):
        sig = types.UniTuple(types.int64, QUERY_BLOCK * TRAIN_BLOCK)(q, t, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            qty, tty = signature.args[0], signature.args[1]
            qary, tary, qi, tj = args
            qrows = _row_pointers(context, builder, qty, qary, qi, QUERY_BLOCK)
            trows = _row_pointers(context, builder, tty, tary, tj, TRAIN_BLOCK)
            ncols = builder.extract_value(context.make_array(qty)(context, builder, qary).shape, 1)
            if kind == "sad":
                acc_ty, step, in_ty = v4i64, 32, v32i8
                fnty = ir.FunctionType(v4i64, [v32i8, v32i8])
                op = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.psad.bw")
            else:
                acc_ty, step, in_ty = v8i32, 16, v16i8
                fnty = ir.FunctionType(v8i32, [v16i16, v16i16])
                op = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.wd")
            accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_ty, None)) for _ in range(8)]
            nsteps = builder.udiv(ncols, ir.Constant(i64, step))
            with cgutils.for_range(builder, nsteps) as loop:
                off = builder.mul(loop.index, ir.Constant(i64, step))
                qv = [_load(builder, p, off, in_ty) for p in qrows]
                tv = [_load(builder, p, off, in_ty) for p in trows]
                if kind == "dot":
                    qv = [builder.zext(v, v16i16) for v in qv]
                    tv = [builder.zext(v, v16i16) for v in tv]
                for a in range(QUERY_BLOCK):
                    for b in range(TRAIN_BLOCK):
                        slot = accs[a * TRAIN_BLOCK + b]
                        builder.store(builder.add(builder.load(slot), builder.call(op, [qv[a], tv[b]])), slot)
            lanes = 4 if kind == "sad" else 8
            sums = [_hsum(builder, builder.load(s), lanes) for s in accs]
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return block


sad_block = _make_block_intrinsic("sad")
dot_block = _make_block_intrinsic("dot")

# The drivers. One parallel loop over groups of GROUP queries (numba ``prange``; a single launch, since
# every launch synchronises the threads, which costs dearly on a busy machine); each group walks the
# training rows tile by tile (a tile of ``tile`` rows stays in the L2 cache while the group's blocks of 4
# queries pass over it). Two functions rather than one factory so that numba can cache them on disk.
GROUP = 8 * QUERY_BLOCK


@njit(parallel=True, cache=True, nogil=True)
def l1_driver(queries, train, out, tile):
    """out[i, j] = sum |queries[i] - train[j]| for uint8 rows (counts: queries % 4 == 0, train % 2 == 0)."""
    nq, nt = queries.shape[0], train.shape[0]
    for g in prange((nq + GROUP - 1) // GROUP):
        q0, q1 = g * GROUP, min(g * GROUP + GROUP, nq)
        for t0 in range(0, nt, tile):
            t1 = min(t0 + tile, nt)
            for i in range(q0, q1, QUERY_BLOCK):
                for j in range(t0, t1, TRAIN_BLOCK):
                    r = sad_block(queries, train, i, j)
                    out[i, j], out[i, j + 1], out[i + 1, j], out[i + 1, j + 1] = r[0], r[1], r[2], r[3]
                    out[i + 2, j], out[i + 2, j + 1], out[i + 3, j], out[i + 3, j + 1] = r[4], r[5], r[6], r[7]


@njit(parallel=True, cache=True, nogil=True)
def l2_driver(queries, train, train_sq, out, tile):
    """out[i, j] = |train[j]|^2 - 2 queries[i] . train[j]: the squared L2 distance less |queries[i]|^2,
    which is the same for the whole row and so does not change the ranking (layout rules of ``l1_driver``)."""
    nq, nt = queries.shape[0], train.shape[0]
    for g in prange((nq + GROUP - 1) // GROUP):
        q0, q1 = g * GROUP, min(g * GROUP + GROUP, nq)
        for t0 in range(0, nt, tile):
            t1 = min(t0 + tile, nt)
            for i in range(q0, q1, QUERY_BLOCK):
                for j in range(t0, t1, TRAIN_BLOCK):
                    r = dot_block(queries, train, i, j)
                    a, b = train_sq[j], train_sq[j + 1]
                    out[i, j], out[i, j + 1] = a - 2 * r[0], b - 2 * r[1]
                    out[i + 1, j], out[i + 1, j + 1] = a - 2 * r[2], b - 2 * r[3]
                    out[i + 2, j], out[i + 2, j + 1] = a - 2 * r[4], b - 2 * r[5]
                    out[i + 3, j], out[i + 3, j + 1] = a - 2 * r[6], b - 2 * r[7]



@njit(cache=True, nogil=True, inline="always")
def _sq_distance(a, b):
    # int32 sums (exact below MAX_L2_FEATURES values), written so that LLVM vectorises them in int32 lanes
    acc = np.int32(0)
    for c in range(a.shape[0]):
        x = np.int32(a[c]) - np.int32(b[c])
        acc = np.int32(acc + np.int32(x * x))
    return np.int64(acc)


@njit(cache=True, nogil=True, inline="always")
def _insert(dist, index, d, j):
    """Insert (d, j) into the lists sorted by (distance, index), dropping the last entry."""
    n = dist.shape[0]
    if d > dist[n - 1] or (d == dist[n - 1] and j >= index[n - 1]):
        return
    s = n - 1
    while s > 0 and (dist[s - 1] > d or (dist[s - 1] == d and index[s - 1] > j)):
        dist[s], index[s] = dist[s - 1], index[s - 1]
        s -= 1
    dist[s], index[s] = d, j


@njit(cache=True, nogil=True, inline="always")
def _limit(d_k, pool, radius_extra, row_const):
    # coarse ranking entries above this cannot be within d_k (see imclass.knn._knn_pruned): rounded up
    radius = np.sqrt(np.float64(d_k)) / pool + radius_extra
    return np.floor(radius * radius * (1 + 1e-12) + 1) - row_const


@njit(cache=True, nogil=True, inline="always")
def _beyond(d_k, pool, fine_q, fine_t, error):
    # True when the fine pooled bound proves the distance larger than d_k (the float errs only towards False)
    r = np.sqrt(np.float64(_sq_distance(fine_q, fine_t))) - error
    return r > 0 and pool * pool * r * r > (np.float64(d_k) + 1) * (1 + 1e-12)


@njit(parallel=True, cache=True, nogil=True)
def pruned_driver(ranking, row_const, radius_extra, pool, fine_q, fine_t, fine_qe, fine_te, fine_pool,
                  queries, train, k, m, out_d, out_i, out_n):
    """The k nearest training rows of each query by exact squared L2, using pooled lower bounds.

    ``ranking[i, j] + row_const[i]``: the coarse pooled squared distance (blocks of ``pool`` x ``pool``);
    ``radius_extra[i]``: its rounding errors' allowance ``e(q) + max e(t)``. ``fine_q``/``fine_t``: rows
    pooled over ``fine_pool`` x ``fine_pool`` blocks, ``fine_qe``/``fine_te`` their rounding errors. Per
    query: the ``m`` smallest coarse distances get an exact distance, their k-th sets a limit; every
    other training row within the limit whose fine bound does not exclude it gets one too, and the limit
    tightens as nearer rows are found. ``out_d``/``out_i`` (nq, k): distances and indices ordered by
    (distance, index); ``out_n[i]``: work done, in fine-bound units (an exact distance counts
    ``fine_pool``^2)."""
    nq, nt = ranking.shape
    exact_cost = fine_pool * fine_pool
    for i in prange(nq):
        row = ranking[i]
        seed_i = np.argsort(row[:m], kind="mergesort")  # the m smallest entries, ordered by (value, index)
        seed_v = row[:m][seed_i]
        for j in range(m, nt):
            _insert(seed_v, seed_i, row[j], j)
        best_d = np.full(k, np.iinfo(np.int64).max, dtype=np.int64)
        best_i = np.full(k, nt, dtype=np.int64)
        for s in range(m):
            j = seed_i[s]
            _insert(best_d, best_i, _sq_distance(queries[i], train[j]), j)
        d_k = best_d[k - 1]
        limit = _limit(d_k, pool, radius_extra[i], row_const[i])
        work = m * exact_cost
        for j in range(nt):
            if row[j] <= limit:
                seen = False
                for s in range(m):
                    if seed_i[s] == j:
                        seen = True
                if seen:
                    continue
                work += 1
                if _beyond(d_k, fine_pool, fine_q[i], fine_t[j], fine_qe[i] + fine_te[j]):
                    continue
                d = _sq_distance(queries[i], train[j])
                work += exact_cost
                if d < d_k or (d == d_k and j < best_i[k - 1]):
                    _insert(best_d, best_i, d, j)
                    d_k = best_d[k - 1]
                    limit = _limit(d_k, pool, radius_extra[i], row_const[i])
        out_d[i, :] = best_d
        out_i[i, :] = best_i
        out_n[i] = work

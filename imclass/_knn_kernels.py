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
block streams past it, and runs the query blocks in parallel (numba ``prange``).

Rows must be C-contiguous uint8 with a length that is a multiple of 32 (pad with zeros: zero bytes add
nothing to either distance); the query count must be a multiple of 4 and the training count a multiple
of 2 (pad with zero rows and drop the padding from the result). ``available()`` says whether the
kernels can run here (numba installed, x86-64 CPU with AVX2).
"""
from __future__ import annotations

import functools

import numpy as np

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
    """Build the numba functions on first use (a second or two, then cached on disk)."""
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

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
                    if kind != "sad":
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

    def _make_driver(block):
        @njit(parallel=True, cache=False, nogil=True)
        def driver(queries, train, out, tile):
            nq, nt = queries.shape[0], train.shape[0]
            for t0 in range(0, nt, tile):
                t1 = min(t0 + tile, nt)
                for qb in prange(nq // 4):
                    i = qb * 4
                    for j in range(t0, t1, 2):
                        r = block(queries, train, i, j)
                        out[i, j] = r[0]
                        out[i, j + 1] = r[1]
                        out[i + 1, j] = r[2]
                        out[i + 1, j + 1] = r[3]
                        out[i + 2, j] = r[4]
                        out[i + 2, j + 1] = r[5]
                        out[i + 3, j] = r[6]
                        out[i + 3, j + 1] = r[7]

        return driver

    return _make_driver(sad_block), _make_driver(dot_block)


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


def _run(which: int, queries: np.ndarray, train: np.ndarray, tile: int) -> np.ndarray:
    nq, nt = len(queries), len(train)
    q = _pad(queries, QUERY_BLOCK)
    t = _pad(train, TRAIN_BLOCK)
    out = np.empty((len(q), len(t)), dtype=np.int64)
    _compiled()[which](q, t, out, tile + tile % 2)
    return out[:nq, :nt]


def l1_distances(queries: np.ndarray, train: np.ndarray, tile: int = 128) -> np.ndarray:
    """Exact L1 distances (int64, (M, N)) between uint8 rows of ``queries`` (M, D) and ``train`` (N, D)."""
    return _run(0, queries, train, tile)


def dot_products(queries: np.ndarray, train: np.ndarray, tile: int = 128) -> np.ndarray:
    """Exact dot products (int64, (M, N)) between uint8 rows; D must be below ``MAX_L2_FEATURES``."""
    if queries.shape[1] > MAX_L2_FEATURES:
        raise ValueError(f"expected at most {MAX_L2_FEATURES} features for exact int32 dot products, "
                         f"received {queries.shape[1]}")
    return _run(1, queries, train, tile)

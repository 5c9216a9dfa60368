"""The MS4B estimate tile in int8 arithmetic: AVX-512 VNNI on the CPUs that have it.

``hh = hi(q8) . hi(k8)`` is a product of small integers (nibbles in [-8, 7]). BLAS takes
it as a float32 product (16 multiply-adds per AVX-512 instruction); ``vpdpbusd`` does 64
byte multiply-adds into int32 per instruction, so on a VNNI CPU the estimate costs about
a quarter. ``vpdpbusd`` multiplies *unsigned* bytes by signed bytes, so the query side
is biased to ``hi(q8) + 8`` (in [0, 15]) and ``8 sum_c hi(k8)_c`` is subtracted per key:
the result is the same integer, exactly (int32 holds ``|hh| <= 64 d``).

Layouts (all int32 words of four bytes along the head dim, ``d4 = ceil(d / 4)``):

* ``qw [rows, d4]``: the biased query nibbles of a block of query rows;
* ``kw [d4, nk_pad]``: the key nibbles, word ``c`` of key ``j`` at ``kw[c, j]``, so that
  16 consecutive keys are one 64-byte load (``nk_pad`` a multiple of :data:`NR`);
* ``corr [nk_pad]``: ``8 sum_c hi(k8)_c`` per key.

The same tile gives the int8 scores ``q8 . k8`` exactly (queries biased to ``q8 + 128``,
``corr = 128 sum_c k8_c``; ``|q8 . k8| <= 127^2 d < 2^24`` for ``d <= 1024``, exact in
float32): the kernel takes the kept scores from that dense tile instead of one dot
product per kept key (a kept key costs a load, not ``d`` multiply-adds).

:func:`estimate_tile` writes ``est[i, j] = hh`` (as float32: the same values the BLAS
product gives) for ``MR`` query rows and ``NR`` keys; with no VNNI on the host it is a
plain loop (the kernel that calls it then uses BLAS instead: see :data:`AVAILABLE`).
"""

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._jit import njit

__all__ = ["AVAILABLE", "MR", "NR", "estimate_tile", "estimate_tile_at", "pack_keys", "pack_queries",
           "max_groups", "compress_groups"]

#: Query rows and keys of one register tile: 6 x 4 accumulators of 16 int32 lanes (24 of
#: the 32 zmm registers; 4 more hold the key words).
MR = 6
NR = 64


def _host_has_vnni():
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # pragma: no cover - llvmlite without feature detection
        return False
    return all(features.get(name, False) for name in ("avx512f", "avx512bw", "avx512vnni"))


#: Whether this CPU runs ``vpdpbusd`` (AVX-512 VNNI); decided once, at import.
AVAILABLE = _host_has_vnni()

_V16 = ir.VectorType(ir.IntType(32), 16)
_I64 = ir.IntType(64)


@intrinsic
def _vnni_tile(typingctx, est, qw, kw, corr, i0, j0, e0):
    """``est[i0:i0+MR, e0:e0+NR] = qw[i0:i0+MR] . kw[:, j0:j0+NR] - corr[j0:j0+NR]`` (float32)."""
    sig = types.void(est, qw, kw, corr, i0, j0, e0)

    def codegen(context, builder, signature, args):
        est_a, qw_a, kw_a, corr_a = (context.make_array(t)(context, builder, a)
                                     for t, a in zip(signature.args[:4], args[:4]))
        i0v, j0v, e0v = args[4], args[5], args[6]
        d4 = cgutils.unpack_tuple(builder, qw_a.shape, 2)[1]
        ldk = cgutils.unpack_tuple(builder, kw_a.shape, 2)[1]
        lde = cgutils.unpack_tuple(builder, est_a.shape, 2)[1]
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        pv = ir.PointerType(_V16)
        nvec = NR // 16
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V16, None)) for _ in range(nvec)]
                for _ in range(MR)]
        with cgutils.for_range(builder, d4) as loop:
            c = loop.index
            krow = builder.add(builder.mul(c, ldk), j0v)
            kv = [builder.load(builder.bitcast(
                builder.gep(kw_a.data, [builder.add(krow, ir.Constant(_I64, 16 * n))]), pv), align=4)
                for n in range(nvec)]
            for m in range(MR):
                qi = builder.add(builder.mul(builder.add(i0v, ir.Constant(_I64, m)), d4), c)
                word = builder.load(builder.gep(qw_a.data, [qi]))
                splat = builder.insert_element(ir.Constant(_V16, None), word,
                                               ir.Constant(ir.IntType(32), 0))
                splat = builder.shuffle_vector(splat, ir.Constant(_V16, None),
                                               ir.Constant(_V16, [0] * 16))
                for n in range(nvec):
                    builder.store(builder.call(dp, [builder.load(accs[m][n]), splat, kv[n]]), accs[m][n])
        f16 = ir.VectorType(ir.FloatType(), 16)
        for n in range(nvec):
            off = builder.add(j0v, ir.Constant(_I64, 16 * n))
            cv = builder.load(builder.bitcast(builder.gep(corr_a.data, [off]), pv), align=4)
            for m in range(MR):
                val = builder.sitofp(builder.sub(builder.load(accs[m][n]), cv), f16)
                row = builder.mul(builder.add(i0v, ir.Constant(_I64, m)), lde)
                eoff = builder.add(e0v, ir.Constant(_I64, 16 * n))
                ptr = builder.gep(est_a.data, [builder.add(row, eoff)])
                builder.store(val, builder.bitcast(ptr, ir.PointerType(f16)), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _plain_tile(est, qw, kw, corr, i0, j0, e0):
    """The same tile with scalar byte arithmetic (hosts without VNNI; never on the fast path)."""
    qb = qw.view(np.uint8)
    kb = kw.view(np.int8)
    for m in range(MR):
        for jj in range(NR):
            j = j0 + jj
            s = np.int32(0)
            for c in range(qw.shape[1]):
                for b in range(4):
                    s += np.int32(qb[i0 + m, 4 * c + b]) * np.int32(kb[c, 4 * j + b])
            est[i0 + m, e0 + jj] = np.float32(s - corr[j])


def estimate_tile(est, qw, kw, corr, i0, j0):
    """One ``MR x NR`` tile of the estimate, keys ``j0 ...`` into columns ``j0 ...`` (Numba only)."""
    raise NotImplementedError("only callable from Numba-compiled code")


def estimate_tile_at(est, e0, qw, kw, corr, i0, j0):
    """:func:`estimate_tile` into columns ``e0 ...`` of ``est`` (a tile of a key chunk; Numba only)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(estimate_tile, jit_options={"nogil": True})
def _estimate_tile_typed(est, qw, kw, corr, i0, j0):
    if AVAILABLE:
        return lambda est, qw, kw, corr, i0, j0: _vnni_tile(est, qw, kw, corr, i0, j0, j0)
    return lambda est, qw, kw, corr, i0, j0: _plain_tile(est, qw, kw, corr, i0, j0, j0)


@overload(estimate_tile_at, jit_options={"nogil": True})
def _estimate_tile_at_typed(est, e0, qw, kw, corr, i0, j0):
    if AVAILABLE:
        return lambda est, e0, qw, kw, corr, i0, j0: _vnni_tile(est, qw, kw, corr, i0, j0, e0)
    return lambda est, e0, qw, kw, corr, i0, j0: _plain_tile(est, qw, kw, corr, i0, j0, e0)


@njit(nogil=True, cache=True)
def pack_keys(k8, bh, kend, full, kbytes, kw, corr):
    """Keys of head ``bh`` into ``kw`` (through its byte view ``kbytes``) and ``corr``.

    ``full=False``: the high nibbles ``hi(k8)`` and ``corr = 8 sum hi(k8)`` (the
    estimate); ``full=True``: ``k8`` itself and ``corr = 128 sum k8`` (the int8 scores
    ``q8 . k8``, with the queries biased by 128). ``kbytes [d4, nk_pad, 4]`` int8 is
    ``kw``'s memory; keys ``>= kend`` and bytes past ``d`` are zero (they add nothing).
    """
    d = k8.shape[2]
    kbytes[:] = 0
    corr[:] = 0
    for j in range(kend):
        s = np.int32(0)
        for cc in range(d):
            h = k8[bh, j, cc] if full else np.int8(k8[bh, j, cc] >> 4)
            kbytes[cc // 4, j, cc % 4] = h
            s += np.int32(h)
        corr[j] = (128 if full else 8) * s


@njit(nogil=True, cache=True)
def pack_queries(q8, bh, i0, nrows, full, qbytes):
    """Biased query rows ``i0 : i0 + nrows`` into ``qbytes [rows_pad, 4 d4]`` (uint8).

    ``full=False``: ``hi(q8) + 8`` in [0, 15]; ``full=True``: ``q8 + 128`` in [1, 255].
    Rows past ``nrows`` and bytes past ``d`` are zero.
    """
    d = q8.shape[2]
    qbytes[:] = 0
    for i in range(nrows):
        for cc in range(d):
            x = np.int32(q8[bh, i0 + i, cc])
            qbytes[i, cc] = np.uint8(x + 128 if full else (x >> 4) + 8)


# ----------------------------------------------------------------------------- the keep rule
# Two row passes of the relative / absolute keep rule in AVX-512 vectors: the row maximum
# of ``u = est * 256 s_k`` and the kept indices ``{j : u_j >= cut}`` (vpcompressd into a
# register, then one store). The products are the same IEEE float64 operations as the
# scalar code (fpext, fmul) and a maximum does not depend on its order, so the kept sets
# are identical. Whole groups only: the caller finishes the row's tail in scalar code.

_F8 = ir.VectorType(ir.FloatType(), 8)
_F16 = ir.VectorType(ir.FloatType(), 16)
_D8 = ir.VectorType(ir.DoubleType(), 8)
_B16 = ir.VectorType(ir.IntType(1), 16)


def _ptr(builder, arr, index, vtype):
    return builder.bitcast(builder.gep(arr.data, [index]), ir.PointerType(vtype))


@intrinsic
def _max_groups(typingctx, est_row, sk_row, groups):
    """``max u`` over the first ``8 groups`` keys (float64; -inf for none)."""
    sig = types.float64(est_row, sk_row, groups)

    def codegen(context, builder, signature, args):
        est_a, sk_a = (context.make_array(t)(context, builder, a)
                       for t, a in zip(signature.args[:2], args[:2]))
        fmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_D8, [_D8, _D8]),
                                              "llvm.maxnum.v8f64")
        red = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.DoubleType(), [_D8]), "llvm.vector.reduce.fmax.v8f64")
        acc = cgutils.alloca_once_value(builder, ir.Constant(_D8, [float("-inf")] * 8))
        with cgutils.for_range(builder, args[2]) as loop:
            off = builder.mul(loop.index, ir.Constant(_I64, 8))
            e = builder.fpext(builder.load(_ptr(builder, est_a, off, _F8), align=4), _D8)
            s = builder.load(_ptr(builder, sk_a, off, _D8), align=8)
            builder.store(builder.call(fmax, [builder.load(acc), builder.fmul(e, s)]), acc)
        return builder.call(red, [builder.load(acc)])

    return sig, codegen


@intrinsic
def _compress_groups(typingctx, est_row, sk_row, groups, cut, idx):
    """Indices ``j < 16 groups`` with ``u_j >= cut`` into ``idx`` (ascending); their count.

    ``idx`` (int32) needs 16 slots of slack past the count: each group stores 16 lanes.
    """
    sig = types.int64(est_row, sk_row, groups, cut, idx)

    def codegen(context, builder, signature, args):
        est_a, sk_a = (context.make_array(t)(context, builder, a)
                       for t, a in zip(signature.args[:2], args[:2]))
        idx_a = context.make_array(signature.args[4])(context, builder, args[4])
        i32 = ir.IntType(32)
        i16 = ir.IntType(16)
        comp = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _V16, _B16]), "llvm.x86.avx512.mask.compress.v16i32")
        pop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        cutv = builder.insert_element(ir.Constant(_D8, None), args[3], ir.Constant(i32, 0))
        sel8 = ir.VectorType(i32, 8)
        cutv = builder.shuffle_vector(cutv, ir.Constant(_D8, None), ir.Constant(sel8, [0] * 8))
        lanes = ir.Constant(_V16, list(range(16)))
        count = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))
        with cgutils.for_range(builder, args[2]) as loop:
            off = builder.mul(loop.index, ir.Constant(_I64, 16))
            e = builder.load(_ptr(builder, est_a, off, _F16), align=4)
            masks = []
            for h in range(2):
                half = builder.shuffle_vector(e, ir.Constant(_F16, None),
                                              ir.Constant(sel8, list(range(8 * h, 8 * h + 8))))
                at = builder.add(off, ir.Constant(_I64, 8 * h))
                s = builder.load(_ptr(builder, sk_a, at, _D8), align=8)
                masks.append(builder.fcmp_ordered(">=", builder.fmul(builder.fpext(half, _D8), s), cutv))
            m = builder.shuffle_vector(masks[0], masks[1], lanes)
            base = builder.trunc(off, i32)
            bvec = builder.insert_element(ir.Constant(_V16, None), base, ir.Constant(i32, 0))
            bvec = builder.shuffle_vector(bvec, ir.Constant(_V16, None), ir.Constant(_V16, [0] * 16))
            packed = builder.call(comp, [builder.add(bvec, lanes), ir.Constant(_V16, None), m])
            n = builder.load(count)
            builder.store(packed, _ptr(builder, idx_a, n, _V16), align=4)
            bits = builder.bitcast(m, ir.IntType(16))
            builder.store(builder.add(n, builder.zext(builder.call(pop, [bits]), _I64)), count)
        return builder.load(count)

    return sig, codegen


@njit(nogil=True, cache=True)
def _max_groups_plain(est_row, sk_row, groups):
    top = -np.inf
    for j in range(8 * groups):
        top = max(top, np.float64(est_row[j]) * sk_row[j])
    return top


@njit(nogil=True, cache=True)
def _compress_groups_plain(est_row, sk_row, groups, cut, idx):
    n = 0
    for j in range(16 * groups):
        idx[n] = j
        n += np.float64(est_row[j]) * sk_row[j] >= cut
    return n


def max_groups(est_row, sk_row, groups):
    """``max_j est_row[j] * sk_row[j]`` over ``j < 8 groups`` (Numba only)."""
    raise NotImplementedError("only callable from Numba-compiled code")


def compress_groups(est_row, sk_row, groups, cut, idx):
    """Kept indices of ``j < 16 groups`` into ``idx``, their count (Numba only)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(max_groups, jit_options={"nogil": True})
def _max_groups_typed(est_row, sk_row, groups):
    if AVAILABLE:
        return lambda est_row, sk_row, groups: _max_groups(est_row, sk_row, groups)
    return lambda est_row, sk_row, groups: _max_groups_plain(est_row, sk_row, groups)


@overload(compress_groups, jit_options={"nogil": True})
def _compress_groups_typed(est_row, sk_row, groups, cut, idx):
    if AVAILABLE:
        return lambda est_row, sk_row, groups, cut, idx: _compress_groups(
            est_row, sk_row, groups, cut, idx)
    return lambda est_row, sk_row, groups, cut, idx: _compress_groups_plain(
        est_row, sk_row, groups, cut, idx)

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
           "max_groups", "compress_groups", "compress_groups_screened", "kept_dots", "kept_scores"]

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
    """``max u`` over the first ``8 groups`` keys (float64; -inf for none).

    Four independent running maxima (one per group modulo 4) so that each vector max waits
    only on the one four groups back, and ``x > m ? x : m`` rather than ``llvm.maxnum``
    (whose NaN handling adds a compare and a blend to the chain): the same maximum, as no
    ``u`` is NaN (finite integers times positive scales) and a maximum does not depend on
    its order.
    """
    sig = types.float64(est_row, sk_row, groups)

    def codegen(context, builder, signature, args):
        est_a, sk_a = (context.make_array(t)(context, builder, a)
                       for t, a in zip(signature.args[:2], args[:2]))
        red = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.DoubleType(), [_D8]), "llvm.vector.reduce.fmax.v8f64")
        ninf = ir.Constant(_D8, [float("-inf")] * 8)
        accs = [cgutils.alloca_once_value(builder, ninf) for _ in range(4)]

        def step(acc, group):
            off = builder.mul(group, ir.Constant(_I64, 8))
            e = builder.fpext(builder.load(_ptr(builder, est_a, off, _F8), align=4), _D8)
            u = builder.fmul(e, builder.load(_ptr(builder, sk_a, off, _D8), align=8))
            m = builder.load(acc)
            builder.store(builder.select(builder.fcmp_ordered(">", u, m), u, m), acc)

        quads = builder.sdiv(args[2], ir.Constant(_I64, 4))
        with cgutils.for_range(builder, quads) as loop:
            for a in range(4):
                step(accs[a], builder.add(builder.mul(loop.index, ir.Constant(_I64, 4)),
                                          ir.Constant(_I64, a)))
        done = builder.mul(quads, ir.Constant(_I64, 4))
        with cgutils.for_range(builder, builder.sub(args[2], done)) as loop:
            step(accs[0], builder.add(done, loop.index))
        m01 = [builder.load(a) for a in accs]
        best = m01[0]
        for m in m01[1:]:
            best = builder.select(builder.fcmp_ordered(">", m, best), m, best)
        return builder.call(red, [best])

    return sig, codegen


def _compress_codegen(context, builder, est_a, sk_a, groups, cut, idx_a, s_k_row=None):
    """The loop of :func:`_compress_groups`. With ``s_k_row`` (a pointer to the row's float32
    scales ``s_k = sk / 256``) each group is first screened in float32 (see
    :func:`_compress_groups_screened`); only a group with a lane that float32 cannot decide
    takes the float64 products."""
    i32 = ir.IntType(32)
    i16 = ir.IntType(16)
    comp = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16, _B16]), "llvm.x86.avx512.mask.compress.v16i32")
    pop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
    sel8 = ir.VectorType(i32, 8)
    cutv = builder.insert_element(ir.Constant(_D8, None), cut, ir.Constant(i32, 0))
    cutv = builder.shuffle_vector(cutv, ir.Constant(_D8, None), ir.Constant(sel8, [0] * 8))
    if s_k_row is not None:  # cut / 256 (exact in float64), rounded to float32
        c32 = builder.fptrunc(builder.fmul(cut, ir.Constant(ir.DoubleType(), 1.0 / 256.0)),
                              ir.FloatType())
        c32 = builder.insert_element(ir.Constant(_F16, None), c32, ir.Constant(i32, 0))
        c32 = builder.shuffle_vector(c32, ir.Constant(_F16, None), ir.Constant(_V16, [0] * 16))
    lanes = ir.Constant(_V16, list(range(16)))
    count = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))
    mask = cgutils.alloca_once_value(builder, ir.Constant(_B16, None))

    def exact_mask(e, off):
        masks = []
        for h in range(2):
            half = builder.shuffle_vector(e, ir.Constant(_F16, None),
                                          ir.Constant(sel8, list(range(8 * h, 8 * h + 8))))
            at = builder.add(off, ir.Constant(_I64, 8 * h))
            s = builder.load(_ptr(builder, sk_a, at, _D8), align=8)
            masks.append(builder.fcmp_ordered(">=", builder.fmul(builder.fpext(half, _D8), s), cutv))
        return builder.shuffle_vector(masks[0], masks[1], lanes)

    with cgutils.for_range(builder, groups) as loop:
        off = builder.mul(loop.index, ir.Constant(_I64, 16))
        e = builder.load(_ptr(builder, est_a, off, _F16), align=4)
        if s_k_row is None:
            builder.store(exact_mask(e, off), mask)
        else:
            sk32 = builder.load(builder.bitcast(builder.gep(s_k_row, [off]), ir.PointerType(_F16)), align=4)
            p = builder.fmul(e, sk32)
            sure = builder.fcmp_ordered(">", p, c32)
            maybe = builder.fcmp_ordered(">=", p, c32)
            builder.store(sure, mask)
            open_lanes = builder.bitcast(builder.xor(sure, maybe), i16)
            with cgutils.if_unlikely(builder, builder.icmp_unsigned("!=", open_lanes, ir.Constant(i16, 0))):
                builder.store(exact_mask(e, off), mask)
        m = builder.load(mask)
        base = builder.trunc(off, i32)
        bvec = builder.insert_element(ir.Constant(_V16, None), base, ir.Constant(i32, 0))
        bvec = builder.shuffle_vector(bvec, ir.Constant(_V16, None), ir.Constant(_V16, [0] * 16))
        packed = builder.call(comp, [builder.add(bvec, lanes), ir.Constant(_V16, None), m])
        n = builder.load(count)
        builder.store(packed, _ptr(builder, idx_a, n, _V16), align=4)
        bits = builder.bitcast(m, i16)
        builder.store(builder.add(n, builder.zext(builder.call(pop, [bits]), _I64)), count)
    return builder.load(count)


@intrinsic
def _compress_groups(typingctx, est_row, sk_row, groups, cut, idx):
    """Indices ``j < 16 groups`` with ``u_j >= cut`` into ``idx`` (ascending); their count.

    ``idx`` (int32) needs 16 slots of slack past the count: each group stores 16 lanes.
    """
    if cut != types.float64:
        return None
    sig = types.int64(est_row, sk_row, groups, cut, idx)

    def codegen(context, builder, signature, args):
        est_a, sk_a, idx_a = (context.make_array(signature.args[n])(context, builder, args[n])
                              for n in (0, 1, 4))
        return _compress_codegen(context, builder, est_a, sk_a, args[2], args[3], idx_a)

    return sig, codegen


@intrinsic
def _compress_groups_screened(typingctx, est_row, sk_row, s_k_row, groups, cut, idx):
    """:func:`_compress_groups` screened in float32: ``s_k_row = sk_row / 256`` (float32).

    ``p = fl32(est s_k)`` is the float32 rounding of the exact ``x = est s_k = u / 256`` and
    ``c = fl32(cut / 256)``; rounding is monotone, so ``p > c`` implies ``u >= cut`` and
    ``p < c`` implies ``u < cut`` (inf and NaN included: a NaN product fails both tests in
    either precision). Only ``p == c`` is undecided; such a group takes the float64 products.
    The kept sets are those of the float64 rule exactly, at half the vector operations.
    """
    if cut != types.float64 or s_k_row.dtype != types.float32:
        return None
    sig = types.int64(est_row, sk_row, s_k_row, groups, cut, idx)

    def codegen(context, builder, signature, args):
        est_a, sk_a, s32_a, idx_a = (context.make_array(signature.args[n])(context, builder, args[n])
                                     for n in (0, 1, 2, 5))
        return _compress_codegen(context, builder, est_a, sk_a, args[3], args[4], idx_a,
                                 s_k_row=s32_a.data)

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


# ------------------------------------------------------------------- kept int8 scores
# ``q8 . k8`` for a run of kept keys of one query row: per key one 64-byte load of its
# (aligned, zero-padded) int8 row and one ``vpdpbusd`` per 64 bytes of the head dim, 16 keys
# at a time; the 16 partial-sum vectors are then added pairwise in a transpose tree (15
# vector adds and 30 shuffles for 16 keys) so that one store writes the 16 scores. Against
# the dense ``q8 . k8`` tile of the block this does ``keep`` of the work plus the tree.

def _fold(builder, a, b, lo, hi):
    """``shuffle(a, b, lo) + shuffle(a, b, hi)`` (int32 x 16; lanes 16.. index ``b``)."""
    return builder.add(builder.shuffle_vector(a, b, ir.Constant(_V16, lo)),
                       builder.shuffle_vector(a, b, ir.Constant(_V16, hi)))


def _transpose_sum(builder, vecs):
    """The lane sums of 16 int32 x 16 vectors as one vector (lane ``s``: the sum of ``vecs[s]``).

    Four levels of pairwise folds, each halving the lanes per vector: shuffles of 256-bit,
    then 128-bit halves, then 64- and 32-bit elements within 128-bit blocks (cheaper than
    full two-source permutes); the keys end in a known order that one permute restores.
    """
    def blocks(size, picks):  # lane lists of the given blocks of ``size`` lanes
        return [size * blk + r for blk in picks for r in range(size)]

    # 1: [a_lo | b_lo] + [a_hi | b_hi]: l1[n] lanes 0-7 fold key 2n, lanes 8-15 key 2n + 1
    l1 = [_fold(builder, vecs[n], vecs[n + 1], blocks(8, (0, 2)), blocks(8, (1, 3)))
          for n in range(0, 16, 2)]
    # 2: 128-bit blocks [u0 u2 w0 w2] + [u1 u3 w1 w3]: l2[m] block k folds key 4m + k
    l2 = [_fold(builder, l1[n], l1[n + 1], blocks(4, (0, 2, 4, 6)), blocks(4, (1, 3, 5, 7)))
          for n in range(0, 8, 2)]
    # 3: per block k, qwords [u.q0 w.q0] + [u.q1 w.q1]: l3[p] block k holds keys 8p + k, 8p + 4 + k
    lo = [x for k in range(4) for x in (4 * k, 4 * k + 1, 16 + 4 * k, 17 + 4 * k)]
    l3 = [_fold(builder, l2[n], l2[n + 1], lo, [x + 2 for x in lo]) for n in (0, 2)]
    # 4: per block k, dwords [u.d0 u.d2 w.d0 w.d2] + [u.d1 u.d3 w.d1 w.d3]: lane 4k + r = key 4r + k
    ev = [x for k in range(4) for x in (4 * k, 4 * k + 2, 16 + 4 * k, 18 + 4 * k)]
    l4 = _fold(builder, l3[0], l3[1], ev, [x + 1 for x in ev])
    order = [4 * (s % 4) + s // 4 for s in range(16)]  # lane holding key s
    return builder.shuffle_vector(l4, ir.Constant(_V16, None), ir.Constant(_V16, order))


def _kept_dots_codegen(context, builder, iv, qb_a, kp_a, idx_a, t0v, t1v, store):
    """The loop of :func:`_kept_dots`: per group of 16 kept keys, ``store(tb, keys, sums)``
    with ``tb`` the group's first slot, ``keys`` the 16 key indices (int64; the tail repeats
    key ``t1 - 1``) and ``sums`` their 16 dot products (int32 x 16, in slot order)."""
    dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3),
                                        "llvm.x86.avx512.vpdpbusd.512")
    pv = ir.PointerType(_V16)
    ldq = cgutils.unpack_tuple(builder, qb_a.shape, 2)[1]
    ldk = cgutils.unpack_tuple(builder, kp_a.shape, 2)[1]
    ldi = cgutils.unpack_tuple(builder, idx_a.shape, 2)[1]
    nchunks = builder.udiv(ldk, ir.Constant(_I64, 64))
    qrow = builder.gep(qb_a.data, [builder.mul(iv, ldq)])
    irow = builder.gep(idx_a.data, [builder.mul(iv, ldi)])
    last = builder.sub(t1v, ir.Constant(_I64, 1))
    ngroups = builder.sdiv(builder.add(builder.sub(t1v, t0v), ir.Constant(_I64, 15)),
                           ir.Constant(_I64, 16))
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16, None)) for _ in range(16)]
    with cgutils.for_range(builder, ngroups) as group:
        tb = builder.add(t0v, builder.mul(group.index, ir.Constant(_I64, 16)))
        rows = []
        keys = []
        for s in range(16):
            t = builder.add(tb, ir.Constant(_I64, s))
            t = builder.select(builder.icmp_signed("<", t, last), t, last)
            j = builder.sext(builder.load(builder.gep(irow, [t])), _I64)
            keys.append(j)
            rows.append(builder.gep(kp_a.data, [builder.mul(j, ldk)]))
            builder.store(ir.Constant(_V16, None), accs[s])
        with cgutils.for_range(builder, nchunks) as chunk:
            off = builder.mul(chunk.index, ir.Constant(_I64, 64))
            qv = builder.load(builder.bitcast(builder.gep(qrow, [off]), pv), align=1)
            for s in range(16):
                kv = builder.load(builder.bitcast(builder.gep(rows[s], [off]), pv), align=64)
                builder.store(builder.call(dp, [builder.load(accs[s]), qv, kv]), accs[s])
        store(tb, keys, _transpose_sum(builder, [builder.load(a) for a in accs]))


@intrinsic
def _kept_dots(typingctx, dots, i, qb, kpad, idx, t0, t1):
    """``dots[i, t] = qb[i] . kpad[idx[i, t]]`` (uint8 x int8 into int32) for ``t0 <= t < t1``;
    lanes up to the next multiple of 16 past ``t1`` are written too (repeats of key ``t1 - 1``)."""
    sig = types.void(dots, i, qb, kpad, idx, t0, t1)

    def codegen(context, builder, signature, args):
        dots_a, qb_a, kp_a, idx_a = (context.make_array(signature.args[n])(context, builder, args[n])
                                     for n in (0, 2, 3, 4))
        iv, t0v, t1v = (context.cast(builder, args[n], signature.args[n], types.int64)
                        for n in (1, 5, 6))
        ldd = cgutils.unpack_tuple(builder, dots_a.shape, 2)[1]
        drow = builder.gep(dots_a.data, [builder.mul(iv, ldd)])

        def store(tb, keys, sums):
            builder.store(sums, builder.bitcast(builder.gep(drow, [tb]), ir.PointerType(_V16)), align=4)

        _kept_dots_codegen(context, builder, iv, qb_a, kp_a, idx_a, t0v, t1v, store)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _kept_scores(typingctx, sc, i, qb, kpad, idx, n, corr, s_k, bh, c):
    """``sc[i, t] = c s_k[bh, j] (qb[i] . kpad[j] - corr[j])``, ``j = idx[i, t]``, ``t < n``
    (float64 products in this order, then rounded to ``sc``'s dtype, as the scalar code
    does); returns their maximum (-inf for ``n = 0``). Lanes up to the next multiple of 16
    are written too."""
    if sc.dtype not in (types.float32, types.float64) or s_k.dtype != types.float32:
        return None
    sig = types.float64(sc, i, qb, kpad, idx, n, corr, s_k, bh, c)

    def codegen(context, builder, signature, args):
        sc_a, qb_a, kp_a, idx_a, corr_a, sk_a = (
            context.make_array(signature.args[m])(context, builder, args[m]) for m in (0, 2, 3, 4, 6, 7))
        iv, nv, bhv = (context.cast(builder, args[m], signature.args[m], types.int64) for m in (1, 5, 8))
        cv = context.cast(builder, args[9], signature.args[9], types.float64)
        out_t = context.get_value_type(signature.args[0].dtype)
        f64 = ir.DoubleType()
        d16 = ir.VectorType(f64, 16)
        o16 = ir.VectorType(out_t, 16)
        ldsc = cgutils.unpack_tuple(builder, sc_a.shape, 2)[1]
        ldsk = cgutils.unpack_tuple(builder, sk_a.shape, 2)[1]
        srow = builder.gep(sc_a.data, [builder.mul(iv, ldsc)])
        skrow = builder.gep(sk_a.data, [builder.mul(bhv, ldsk)])
        csplat = builder.insert_element(ir.Constant(d16, None), cv, ir.Constant(ir.IntType(32), 0))
        csplat = builder.shuffle_vector(csplat, ir.Constant(d16, None), ir.Constant(_V16, [0] * 16))
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(o16, [o16, o16]),
                                              f"llvm.maxnum.v16{'f32' if out_t == ir.FloatType() else 'f64'}")
        top = cgutils.alloca_once_value(builder, ir.Constant(o16, [float("-inf")] * 16))

        i64v = ir.VectorType(_I64, 16)
        f16v = ir.VectorType(ir.FloatType(), 16)
        pi32 = ir.VectorType(ir.PointerType(ir.IntType(32)), 16)
        pf32 = ir.VectorType(ir.PointerType(ir.FloatType()), 16)
        ones = ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16)
        g32 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V16, [pi32, ir.IntType(32), ones.type, _V16]), "llvm.masked.gather.v16i32.v16p0i32")
        gf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            f16v, [pf32, ir.IntType(32), ones.type, f16v]), "llvm.masked.gather.v16f32.v16p0f32")

        def splat64(x):
            v = builder.insert_element(ir.Constant(i64v, None), x, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(v, ir.Constant(i64v, None), ir.Constant(_V16, [0] * 16))

        cbase = splat64(builder.ptrtoint(corr_a.data, _I64))
        sbase = splat64(builder.ptrtoint(skrow, _I64))

        ldi = cgutils.unpack_tuple(builder, idx_a.shape, 2)[1]
        irow = builder.gep(idx_a.data, [builder.mul(iv, ldi)])
        lanes = ir.Constant(i64v, list(range(16)))

        def store(tb, keys, sums):
            # the group's 16 key indices in one load; lanes past n repeat key n - 1
            jv = builder.load(builder.bitcast(builder.gep(irow, [tb]), ir.PointerType(_V16)), align=4)
            jv = builder.sext(jv, i64v)
            inside = builder.icmp_signed("<", builder.add(splat64(tb), lanes), splat64(nv))
            jv = builder.select(inside, jv, splat64(keys[15]))
            off = builder.mul(jv, ir.Constant(i64v, [4] * 16))
            corrv = builder.call(g32, [builder.inttoptr(builder.add(cbase, off), pi32),
                                       ir.Constant(ir.IntType(32), 4), ones, ir.Constant(_V16, None)])
            skv = builder.fpext(builder.call(gf, [builder.inttoptr(builder.add(sbase, off), pf32),
                                                  ir.Constant(ir.IntType(32), 4), ones,
                                                  ir.Constant(f16v, None)]), d16)
            x = builder.sitofp(builder.sub(sums, corrv), d16)
            val = builder.fmul(builder.fmul(csplat, skv), x)
            val = builder.fptrunc(val, o16) if out_t != f64 else val
            builder.store(val, builder.bitcast(builder.gep(srow, [tb]), ir.PointerType(o16)),
                          align=context.get_abi_sizeof(out_t))
            builder.store(builder.call(vmax, [builder.load(top), val]), top)

        _kept_dots_codegen(context, builder, iv, qb_a, kp_a, idx_a, ir.Constant(_I64, 0), nv, store)
        red = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(out_t, [o16]),
            f"llvm.vector.reduce.fmax.v16{'f32' if out_t == ir.FloatType() else 'f64'}")
        res = builder.call(red, [builder.load(top)])
        return builder.fpext(res, f64) if out_t != f64 else res

    return sig, codegen


@njit(nogil=True, cache=True)
def _kept_dots_plain(dots, i, qb, kpad, idx, t0, t1):
    for t in range(t0, t1):
        j = idx[i, t]
        s = np.int32(0)
        for c in range(kpad.shape[1]):
            s += np.int32(qb[i, c]) * np.int32(kpad[j, c])
        dots[i, t] = s


def kept_dots(dots, i, qb, kpad, idx, t0, t1):
    """``dots[i, t] = sum_c qb[i, c] kpad[idx[i, t], c]`` for ``t0 <= t < t1`` (Numba only).

    Parameters
    ----------
    dots : int32 array ``[rows, >= t1 + 15]``
        Output; with VNNI the lanes up to the next multiple of 16 past ``t1 - t0`` are
        overwritten too.
    qb : uint8 array ``[rows, dpad]``
        Biased query rows ``q8 + 128`` (bytes past ``d`` are any value).
    kpad : int8 array ``[Nk, dpad]``
        The head's int8 keys, ``dpad`` a multiple of 64, rows 64-byte aligned, bytes past
        ``d`` zero (:func:`mcattn._cpu_math.aligned_rows`).
    idx : int32 array ``[rows, >= t1]``
        Kept key indices.
    """
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(kept_dots, jit_options={"nogil": True})
def _kept_dots_typed(dots, i, qb, kpad, idx, t0, t1):
    if AVAILABLE:
        return lambda dots, i, qb, kpad, idx, t0, t1: _kept_dots(dots, i, qb, kpad, idx, t0, t1)
    return lambda dots, i, qb, kpad, idx, t0, t1: _kept_dots_plain(dots, i, qb, kpad, idx, t0, t1)


@njit(nogil=True, cache=True)
def _kept_scores_plain(sc, i, qb, kpad, idx, n, corr, s_k, bh, c):
    top = -np.inf
    for t in range(n):
        j = idx[i, t]
        s = np.int32(0)
        for cc in range(kpad.shape[1]):
            s += np.int32(qb[i, cc]) * np.int32(kpad[j, cc])
        sc[i, t] = c * np.float64(s_k[bh, j]) * np.float64(s - corr[j])
        top = max(top, np.float64(sc[i, t]))
    return top


def kept_scores(sc, i, qb, kpad, idx, n, corr, s_k, bh, c):
    """The kept int8 scores of row ``i``, scaled: ``sc[i, t] = c s_k[bh, j] (qb[i] . kpad[j] -
    corr[j])`` for ``j = idx[i, t]``, ``t < n``; returns their maximum (Numba only).

    The dot products are those of :func:`kept_dots` (exact integers); the scaling is the
    same float64 operations in the same order as the scalar expression
    ``c * float64(s_k[bh, j]) * float64(dot - corr[j])``, rounded once to ``sc``'s dtype,
    so the scores are bit for bit those of the scalar code. ``sc`` needs 15 columns of
    slack past ``n`` (written with repeats of the last key's score).

    Parameters
    ----------
    sc : float32 or float64 array ``[rows, >= n + 15]``
    qb, kpad, idx
        As in :func:`kept_dots`.
    corr : int32 array ``[Nk]``
        ``128 sum_c k8[j, c]``: removes the queries' bias.
    s_k : float32 array ``[BH, Nk]``
        The keys' quantisation scales.
    c : float
        The row's ``scale s_q``.
    """
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(kept_scores, jit_options={"nogil": True})
def _kept_scores_typed(sc, i, qb, kpad, idx, n, corr, s_k, bh, c):
    if AVAILABLE:
        return lambda sc, i, qb, kpad, idx, n, corr, s_k, bh, c: _kept_scores(
            sc, i, qb, kpad, idx, n, corr, s_k, bh, c)
    return lambda sc, i, qb, kpad, idx, n, corr, s_k, bh, c: _kept_scores_plain(
        sc, i, qb, kpad, idx, n, corr, s_k, bh, c)


def compress_groups_screened(est_row, sk_row, s_k_row, groups, cut, idx):
    """:func:`compress_groups` with a float32 screen (``s_k_row = sk_row / 256``, float32):
    the same kept indices and count (Numba only)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(compress_groups_screened, jit_options={"nogil": True})
def _compress_groups_screened_typed(est_row, sk_row, s_k_row, groups, cut, idx):
    if AVAILABLE:
        return lambda est_row, sk_row, s_k_row, groups, cut, idx: _compress_groups_screened(
            est_row, sk_row, s_k_row, groups, cut, idx)
    return lambda est_row, sk_row, s_k_row, groups, cut, idx: _compress_groups_plain(
        est_row, sk_row, groups, cut, idx)

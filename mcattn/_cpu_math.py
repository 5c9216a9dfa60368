"""Vectorisable math blocks shared by the Numba CPU kernels.

``exp_block(s, bits, rows, cols)`` replaces ``s[:rows, :cols]`` by ``exp(s)`` for
``s <= 0`` (or -inf), chosen by dtype when the calling kernel is typed (an ``overload``,
so kernels take no function-typed argument: such an argument makes Numba's on-disk
cache miss in every new process). ``bits`` is int32 scratch for float32, int64 for
float64 (:func:`bits_dtype`).

Why a polynomial exp: without Intel's SVML, ``math.exp`` in a Numba loop is a scalar
libm call per score, several times slower than the matrix products around it. The float32
kernel evaluates ``2**t`` as ``2**round(t) * p(t - round(t))`` with ``p`` the degree-7
Taylor polynomial of ``2**f`` on ``|f| <= 1/2`` (truncation error below 6e-9, under
float32 rounding) and builds ``2**round(t)`` from its exponent bits, reinterpreted as a
float32 in a register (:func:`_f32_from_bits`, an LLVM bitcast), so the whole exp is one
loop that LLVM vectorises and can be fused with its neighbours (the row sum).

Why ``llvm.maxnum`` for row maxima (:func:`fmax`): Numba lowers ``max(a, b)`` on floats
with an explicit NaN test that LLVM does not vectorise as a reduction (measured: 0.49 ns
per score, against 0.085 ns with ``maxnum``, on this machine's 256 x 512 tiles). The two
agree whenever no score is NaN.
"""

import math

import llvmlite.ir as llvm_ir
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._jit import njit

__all__ = ["exp_block", "exp_scalar", "fmax", "bits_dtype", "online_softmax_tile", "gather_axpy",
           "aligned_rows", "exp2_f32", "online_softmax_tile_exp2"]

_LOG2E = np.float32(1.4426950408889634)
_LN2 = math.log(2.0)
# Taylor coefficients (ln 2)^n / n! of 2**f = exp(f ln 2), n = 0..7.
_C = [np.float32(_LN2**n / math.factorial(n)) for n in range(8)]
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7 = _C
_HALF = np.float32(0.5)
_FLOOR_EXP = np.float32(-127.0)  # 2**-127 -> exponent bits 0 -> exactly 0 (underflow)
_BIAS = np.int32(127)
_MANT = np.int32(23)


@intrinsic
def _f32_from_bits(typingctx, x):
    """The float32 whose IEEE bits are the int32 ``x`` (a register bitcast, no memory)."""
    if x != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@intrinsic
def fmax(typingctx, a, b):
    """``llvm.maxnum(a, b)`` of two floats of one type: vectorisable in reductions."""
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        name = "llvm.maxnum.f32" if signature.args[0] == types.float32 else "llvm.maxnum.f64"
        fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(ty, [ty, ty]), name)
        return builder.call(fn, args)

    return a(a, b), codegen


@njit(nogil=True, cache=True, fastmath={"contract"})
def _exp_f32(x):
    """``exp(x)`` for float32 ``x <= 0`` (or -inf): the polynomial of the module docstring."""
    t = max(x * _LOG2E, _FLOOR_EXP)
    n = np.floor(t + _HALF)
    f = t - n
    p = _C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * (_C5 + f * (_C6 + f * _C7))))))
    return p * _f32_from_bits(np.int32((np.int32(n) + _BIAS) << _MANT))


@njit(nogil=True, cache=True, fastmath={"contract"})
def _exp_block_f32(s, bits, rows, cols):
    """In place ``s[:rows, :cols] = exp(s)`` for ``s <= 0`` (or -inf), float32.

    ``bits`` is no longer needed (the exponent is built in a register) but stays in the
    signature that callers share; the values are those of the former two-loop version
    bit for bit (the same float32 operations in the same order).
    """
    for r in range(rows):
        for c in range(cols):
            s[r, c] = _exp_f32(s[r, c])


@njit(nogil=True, cache=True)
def _exp_block_f64(s, bits, rows, cols):
    """In place ``s[:rows, :cols] = exp(s)``, float64, libm (accuracy first)."""
    for r in range(rows):
        for c in range(cols):
            s[r, c] = math.exp(s[r, c])


def exp_block(s, bits, rows, cols):
    """``s = exp(s)`` in place on ``s[:rows, :cols]`` (Numba only; typed by dtype)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(exp_block, jit_options={"nogil": True})
def _exp_block_typed(s, bits, rows, cols):
    if s.dtype == types.float32:
        return lambda s, bits, rows, cols: _exp_block_f32(s, bits, rows, cols)
    return lambda s, bits, rows, cols: _exp_block_f64(s, bits, rows, cols)


def exp_scalar(x):
    """``exp(x)`` of one score ``x <= 0`` (Numba only; float32 polynomial, float64 libm)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(exp_scalar, jit_options={"nogil": True})
def _exp_scalar_typed(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


def bits_dtype(dtype):
    """The scratch dtype :func:`exp_block` needs for arrays of ``dtype``."""
    return np.int32 if np.dtype(dtype) == np.float32 else np.int64


@njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def online_softmax_tile(s, p, bits, v_tile, prod, m, l, acc, bias, slot, has_bias, row_bias,
                        is_causal, i0, j0, nrows, ncols):
    """Fold one tile of scores into a streaming softmax: the step every CPU kernel shares.

    Parameters
    ----------
    s : array ``[nrows, ncols]``
        Scores of query rows ``i0 ...`` against keys ``j0 ...`` (mask and causal applied here).
    p : array ``[nrows, ncols]``
        Scratch for the probabilities; may be ``s`` itself.
    bits : int array ``[nrows, ncols]``
        Unused (kept for the callers' signature; the exp needs no scratch any more).
    v_tile : array ``[ncols, dv]``
        The tile's values.
    prod : array ``[nrows, dv]``
        Scratch for ``P V``.
    m, l : arrays ``[>= nrows]``
        Running row maximum and sum (start at -inf and 0).
    acc : array ``[>= nrows, dv]``
        Running unnormalised output (starts at 0).
    bias, slot, has_bias, row_bias, is_causal
        The canonical mask (``bias [M, R, Nk]``, the batch row's slice) and causal flag.
    """
    neg_inf = -np.inf
    dv = acc.shape[1]
    j1 = j0 + ncols
    in_place = s.ctypes.data == p.ctypes.data
    for i in range(nrows):
        if has_bias:
            r = i0 + i if row_bias else 0
            for j in range(ncols):
                s[i, j] += bias[slot, r, j0 + j]
        if is_causal and j1 - 1 > i0 + i:
            for j in range(max(0, i0 + i + 1 - j0), ncols):
                s[i, j] = neg_inf
        top = m[i]
        for j in range(ncols):
            top = fmax(top, s[i, j])
        if top == neg_inf:  # nothing visible yet: contributes exp(-inf) = 0
            for j in range(ncols):
                p[i, j] = 0.0
            continue
        rescale = math.exp(m[i] - top)  # exp(-inf) = 0 on the first visible tile
        m[i] = top
        l[i] *= rescale
        for c in range(dv):
            acc[i, c] *= rescale
        # One pass: exp of the shifted score and the row sum while it is in a register.
        total = l[i] * 0  # a typed zero; p is not written yet (stale scratch)
        if in_place:  # (a loop over s and p with p = s fails LLVM's overlap check: scalar)
            for j in range(ncols):
                e = exp_scalar(s[i, j] - top)
                s[i, j] = e
                total += e
        else:
            for j in range(ncols):
                e = exp_scalar(s[i, j] - top)
                p[i, j] = e
                total += e
        l[i] += total
    np.dot(p, v_tile, prod)
    for i in range(nrows):
        for c in range(dv):
            acc[i, c] += prod[i, c]


# ------------------------------------------------------------------ base-2 tile (float32)
# Exact attention's float32 kernel scales the queries by ``scale * log2(e)``, so that its
# scores are base-2 logits and each probability is one ``2**(s - max)``: no multiply by
# log2(e) per score. ``2**t`` for ``t <= 0``: ``n = round(t)`` by the 1.5 * 2**23 trick
# (``t + M`` rounds to an integer in its low mantissa bits, which shifted left by 23 are
# already ``(n + 127) << 23``: no float-to-int conversion, no exponent add), ``2**f`` on
# ``|f| <= 1/2`` by a degree-6 polynomial fitted for relative error (1.9e-9 in exact
# arithmetic; 9.6e-8, under one float32 ulp, in float32 Horner steps). Fewer operations
# per score than :func:`_exp_f32` (one multiply-add and three integer/convert steps less).

_ROUND_MAGIC = np.float32(12582912.0 + 127.0)  # 1.5 * 2**23, plus the exponent bias
_E0, _E1, _E2, _E3, _E4, _E5, _E6 = (np.float32(c) for c in (
    1.0000000005539984, 0.6931472057293508, 0.2402264689119398, 0.055503287939323,
    0.009618488964336197, 0.001339992443557357, 0.0001534579257035091))
_LOG2E_F32 = np.float32(1.4426950408889634)


@intrinsic
def _bits_from_f32(typingctx, x):
    """The int32 whose bits are those of the float32 ``x`` (a register bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return types.int32(types.float32), codegen


@njit(nogil=True, cache=True, fastmath={"contract"})
def exp2_f32(t):
    """``2**t`` for float32 ``t <= 0`` (or -inf); 0 from ``2**-126.5`` down (no denormals).

    No ``reassoc`` here: ``(t + M) - M`` must round, not cancel.
    """
    t = max(t, _FLOOR_EXP)
    y = t + _ROUND_MAGIC  # = round(t) + 127 + 1.5 * 2**23 exactly (ulp 1 in [2**23, 2**24))
    f = t - (y - _ROUND_MAGIC)
    p = _E0 + f * (_E1 + f * (_E2 + f * (_E3 + f * (_E4 + f * (_E5 + f * _E6)))))
    # y's low mantissa bits are round(t) + 127; shifted by 23 they are 2**round(t)'s bits
    # (the high bits of 1.5 * 2**23 shift out).
    return p * _f32_from_bits(np.int32(_bits_from_f32(y) << _MANT))


@njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def online_softmax_tile_exp2(s, v_tile, prod, alpha, m, l, acc, bias, slot, has_bias, row_bias,
                             is_causal, i0, j0, nrows, ncols):
    """:func:`online_softmax_tile` for float32 base-2 scores, in place (exact's forward).

    Parameters
    ----------
    s : float32 array ``[nrows, ncols]``
        Scores ``log2(e) scale q_i . k_j`` of query rows ``i0 ...`` against keys ``j0 ...``;
        overwritten by the unnormalised probabilities ``2**(s_ij - m_i)``.
    v_tile : float32 array ``[ncols, dv]``
        The tile's values.
    prod : float32 array ``[nrows, dv]``
        Scratch for ``P V``.
    alpha : float32 array ``[>= nrows]``
        Scratch: each row's rescale of ``acc``.
    m, l : float32 arrays ``[>= nrows]``
        Running row maximum (base-2 units) and sum; start at -inf and 0.
    acc : float32 array ``[>= nrows, dv]``
        Running unnormalised output (starts at 0).
    bias, slot, has_bias, row_bias, is_causal
        The canonical mask (natural-log units, so multiplied by log2(e) here) and the
        causal flag.

    Notes
    -----
    Against the base-e tile: no multiply by log2(e) per score, :func:`exp2_f32`, the row
    sum in float32 (the base-e tile's is float64, typed so by ``l[i] * 0``: a conversion
    per score), and the rescale of ``acc`` fused with the add of ``P V``.
    """
    neg_inf = np.float32(-np.inf)
    dv = acc.shape[1]
    j1 = j0 + ncols
    for i in range(nrows):
        if has_bias:
            r = i0 + i if row_bias else 0
            for j in range(ncols):
                s[i, j] += bias[slot, r, j0 + j] * _LOG2E_F32
        if is_causal and j1 - 1 > i0 + i:
            for j in range(max(0, i0 + i + 1 - j0), ncols):
                s[i, j] = neg_inf
        top = m[i]
        for j in range(ncols):
            top = fmax(top, s[i, j])
        if top == neg_inf:  # nothing visible yet: contributes 2**-inf = 0
            for j in range(ncols):
                s[i, j] = 0.0
            alpha[i] = 1.0
            continue
        rescale = exp2_f32(m[i] - top)  # 2**-inf = 0 on the first visible tile
        m[i] = top
        total = np.float32(0.0)
        for j in range(ncols):
            e = exp2_f32(s[i, j] - top)
            s[i, j] = e
            total += e
        l[i] = l[i] * rescale + total
        alpha[i] = rescale
    np.dot(s, v_tile, prod)
    for i in range(nrows):
        a = alpha[i]
        for c in range(dv):
            acc[i, c] = acc[i, c] * a + prod[i, c]


# ------------------------------------------------------------------ gathered rows, weighted
# ``acc[i] += sum_t w[i, t] v[bh, idx[i, t]]`` over a run of kept keys: the sparse P V of
# LATTE and hybrid. Written as a Numba loop over the value columns, LLVM vectorises the
# column loop but re-checks, for every handful of keys, that ``acc`` does not overlap the
# gathered ``v`` rows (tens of instructions per key; measured 5.6 ns per kept key at
# dv = 64). Here the row's accumulator lives in vector registers for the whole run: one
# load and one store per run, and per key one splat of the weight and one multiply-add per
# 64 bytes of the value row (two accumulator sets, even and odd keys, so that the adds do
# not wait on each other). Plain LLVM vector IR, no target intrinsic: it lowers on any CPU.

_LANE_BYTES = 64  # one 512-bit vector (two 256-bit halves where the CPU has no AVX-512)
_NV = 4  # vectors per column pass: 64 float32 columns, four chains per accumulator set
_FLAGS = ("contract", "reassoc", "nsz")  # a multiply-add may fuse; the sum's order is free


def _offset(builder, arr, strides, index):
    """Byte address (int64) of ``arr[index...]`` (strides in bytes)."""
    i64 = llvm_ir.IntType(64)
    addr = builder.ptrtoint(arr.data, i64)
    for s, x in zip(strides, index):
        addr = builder.add(addr, builder.mul(s, x))
    return addr


@intrinsic
def _gather_axpy_vec(typingctx, acc, i, v, bh, idx, w, t0, t1):
    """``acc[i, :G] += sum_{t0 <= t < t1} w[i, t] v[bh, idx[i, t], :G]``, ``G`` the whole
    vectors of columns (``acc.shape[1]`` rounded down to a multiple of 64 bytes); returns ``G``."""
    sig = types.int64(acc, i, v, bh, idx, w, t0, t1)

    def codegen(context, builder, signature, args):
        acc_t, _, v_t, _, idx_t, w_t = signature.args[:6]
        acc_a, v_a, idx_a, w_a = (context.make_array(t)(context, builder, a) for t, a in
                                  ((acc_t, args[0]), (v_t, args[2]), (idx_t, args[4]), (w_t, args[5])))
        i64 = llvm_ir.IntType(64)
        ev = context.get_value_type(acc_t.dtype)
        size = context.get_abi_sizeof(ev)
        lanes = _LANE_BYTES // size
        vec = llvm_ir.VectorType(ev, lanes)
        pvec = llvm_ir.PointerType(vec)
        iv, bhv, t0v, t1v = (context.cast(builder, a, ty, types.int64) for a, ty in
                             zip((args[1], args[3], args[6], args[7]),
                                 (signature.args[1], signature.args[3], signature.args[6],
                                  signature.args[7])))
        acc_st = cgutils.unpack_tuple(builder, acc_a.strides, 2)
        v_st = cgutils.unpack_tuple(builder, v_a.strides, 3)
        idx_st = cgutils.unpack_tuple(builder, idx_a.strides, 2)
        w_st = cgutils.unpack_tuple(builder, w_a.strides, 2)
        ncols = cgutils.unpack_tuple(builder, acc_a.shape, 2)[1]
        groups = builder.udiv(ncols, llvm_ir.Constant(i64, lanes))
        acc_row = _offset(builder, acc_a, acc_st[:1], [iv])
        v_head = _offset(builder, v_a, v_st[:1], [bhv])
        idx_row = _offset(builder, idx_a, idx_st[:1], [iv])
        w_row = _offset(builder, w_a, w_st[:1], [iv])
        idx_ty = context.get_value_type(idx_t.dtype)
        idx_size = context.get_abi_sizeof(idx_ty)
        zero = llvm_ir.Constant(vec, None)

        def vptr(addr):
            return builder.inttoptr(addr, pvec)

        def key(t):  # (byte address of the key's value row, weight splat)
            ia = builder.add(idx_row, builder.mul(t, llvm_ir.Constant(i64, idx_size)))
            j = builder.load(builder.inttoptr(ia, llvm_ir.PointerType(idx_ty)))
            j = builder.sext(j, i64) if idx_size < 8 else j
            wa = builder.add(w_row, builder.mul(t, llvm_ir.Constant(i64, size)))
            p = builder.load(builder.inttoptr(wa, llvm_ir.PointerType(ev)))
            splat = builder.insert_element(llvm_ir.Constant(vec, None), p, llvm_ir.Constant(i64, 0))
            splat = builder.shuffle_vector(splat, llvm_ir.Constant(vec, None),
                                           llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), lanes),
                                                            [0] * lanes))
            return builder.add(v_head, builder.mul(j, v_st[1])), splat

        def fma(acc_v, p, x):
            return builder.fadd(builder.fmul(p, x, flags=_FLAGS), acc_v, flags=_FLAGS)

        def column_pass(g0, nv):
            """Columns ``[g0 lanes, (g0 + nv) lanes)`` over the run of keys."""
            col = builder.mul(g0, llvm_ir.Constant(i64, _LANE_BYTES))
            arow = builder.add(acc_row, col)
            sets = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(2)]
            for n in range(nv):
                builder.store(builder.load(vptr(builder.add(arow, llvm_ir.Constant(i64, 64 * n))),
                                           align=size), sets[0][n])
                builder.store(zero, sets[1][n])
            npairs = builder.sdiv(builder.sub(t1v, t0v), llvm_ir.Constant(i64, 2))
            with cgutils.for_range(builder, npairs) as loop:
                t = builder.add(t0v, builder.mul(loop.index, llvm_ir.Constant(i64, 2)))
                for s in range(2):
                    base, p = key(builder.add(t, llvm_ir.Constant(i64, s)))
                    base = builder.add(base, col)
                    xs = [builder.load(vptr(builder.add(base, llvm_ir.Constant(i64, 64 * n))),
                                       align=size) for n in range(nv)]
                    for n in range(nv):
                        builder.store(fma(builder.load(sets[s][n]), p, xs[n]), sets[s][n])
            last = builder.add(t0v, builder.mul(npairs, llvm_ir.Constant(i64, 2)))
            with builder.if_then(builder.icmp_signed("<", last, t1v)):
                base, p = key(last)
                base = builder.add(base, col)
                for n in range(nv):
                    x = builder.load(vptr(builder.add(base, llvm_ir.Constant(i64, 64 * n))), align=size)
                    builder.store(fma(builder.load(sets[0][n]), p, x), sets[0][n])
            for n in range(nv):
                total = builder.fadd(builder.load(sets[0][n]), builder.load(sets[1][n]), flags=_FLAGS)
                builder.store(total, vptr(builder.add(arow, llvm_ir.Constant(i64, 64 * n))), align=size)

        wide = builder.udiv(groups, llvm_ir.Constant(i64, _NV))
        with cgutils.for_range(builder, wide) as loop:
            column_pass(builder.mul(loop.index, llvm_ir.Constant(i64, _NV)), _NV)
        done = builder.mul(wide, llvm_ir.Constant(i64, _NV))
        with cgutils.for_range(builder, builder.sub(groups, done)) as loop:
            column_pass(builder.add(done, loop.index), 1)
        return builder.mul(groups, llvm_ir.Constant(i64, lanes))

    return sig, codegen


@njit(nogil=True, cache=True)
def aligned_rows(v, nk):
    """Scratch ``[1, nk, dv]`` of ``v``'s dtype whose data starts on a 64-byte boundary.

    NumPy's large arrays start 16 bytes past a page, so every 64-byte vector load of a
    gathered value row would straddle two cache lines (measured: 4.3 against 3.2 ns per
    kept key in :func:`gather_axpy` at ``dv = 64``); the kernels copy each head's value
    rows here once (``Nk dv`` numbers against ``Nq Nk dv`` keep-fraction multiply-adds).
    """
    dv = v.shape[2]
    size = v.itemsize
    raw = np.empty(nk * dv + 64 // size, v.dtype)
    off = ((-raw.ctypes.data) % 64) // size
    return raw[off:off + nk * dv].reshape((1, nk, dv))


@njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def _gather_axpy_loop(acc, i, v, bh, idx, w, t0, t1, c0):
    """Columns ``c0 ...`` of :func:`gather_axpy` in a plain loop (the tail, or any layout)."""
    for t in range(t0, t1):
        j = idx[i, t]
        p = w[i, t]
        for cc in range(c0, acc.shape[1]):
            acc[i, cc] += p * v[bh, j, cc]


def gather_axpy(acc, i, v, bh, idx, w, t0, t1):
    """``acc[i] += sum_{t0 <= t < t1} w[i, t] v[bh, idx[i, t]]`` (Numba only).

    Parameters
    ----------
    acc : float array ``[rows, dv]``
    i, bh, t0, t1 : int
    v : float array ``[BH, Nk, dv]``, the dtype of ``acc`` and ``w``
    idx : int array ``[rows, >= t1]``, key indices
    w : float array ``[rows, >= t1]``, their weights
    """
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(gather_axpy, jit_options={"nogil": True})
def _gather_axpy_typed(acc, i, v, bh, idx, w, t0, t1):
    fast = (acc.dtype in (types.float32, types.float64) and acc.dtype == v.dtype == w.dtype
            and all(a.layout == "C" for a in (acc, v, idx, w)))
    if fast:
        def impl(acc, i, v, bh, idx, w, t0, t1):
            done = _gather_axpy_vec(acc, i, v, bh, idx, w, t0, t1)
            if done < acc.shape[1]:
                _gather_axpy_loop(acc, i, v, bh, idx, w, t0, t1, done)
        return impl
    return lambda acc, i, v, bh, idx, w, t0, t1: _gather_axpy_loop(acc, i, v, bh, idx, w, t0, t1, 0)

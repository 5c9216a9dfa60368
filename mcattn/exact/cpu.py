"""Exact attention on the CPU: a Numba kernel with a streaming (online) softmax.

A task is one block of ``BLOCK_Q`` query rows of one batch row. It walks over blocks of
``BLOCK_K`` keys: ``S = Q K^T`` by BLAS, the running max/sum update, ``exp`` by a
vectorisable polynomial (float32) or libm (float64), and ``acc += P V`` by BLAS, the
probabilities overwriting the scores (:func:`mcattn._cpu_math.online_softmax_tile`; why
a polynomial: :mod:`mcattn._cpu_math`). Each thread copies the current batch row's ``K``
into row-major ``K^T`` blocks (OpenBLAS multiplies by them faster than by the transposed
view). Scratch is ``O(BLOCK_Q * BLOCK_K + N d)`` per thread (``N d``: one batch row), so
memory is ``O(N d)`` whatever ``N`` is; with ``is_causal`` the key blocks after a query block are skipped.
"""

import math

import numpy as np
from numba import types
from numba.extending import overload

from .. import config
from .._cpu import run_tasks
from .._cpu_math import bits_dtype, exp_block, online_softmax_tile, online_softmax_tile_exp2
from .._jit import njit

__all__ = ["forward", "forward_lse", "backward"]

_FLAGS = {"nsz", "contract", "reassoc"}  # order of sums only; no finite-math assumptions


@njit(nogil=True, cache=True)
def _transpose_key_blocks(k, bh, block_k, kt, start=0, stop=-1):
    """``kt[d j0 : d j1] = k[bh, j0:j1].T`` (row-major ``[d, j1 - j0]``) per key block.

    Only the blocks from ``start`` (a multiple of ``block_k``) to the one holding key
    ``stop - 1`` (all of them with ``stop < 0``).
    """
    nk, d = k.shape[1], k.shape[2]
    end = nk if stop < 0 else min(nk, stop)
    for j0 in range(start, end, block_k):
        j1 = min(nk, j0 + block_k)
        ncols = j1 - j0
        blk = kt[d * j0 : d * j1].reshape((d, ncols))
        for j in range(ncols):
            for c in range(d):
                blk[c, j] = k[bh, j0 + j, c]


def _fold_tile(s, bits, v_tile, prod, alpha, m, l, acc, bias, slot, has_bias, row_bias, is_causal,
               i0, j0, nrows, ncols):
    """One tile into the streaming softmax, by dtype (Numba only): float32 base-2 scores
    (:func:`mcattn._cpu_math.online_softmax_tile_exp2`), float64 base-e with libm ``exp``
    (:func:`mcattn._cpu_math.online_softmax_tile`)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_fold_tile, jit_options={"nogil": True})
def _fold_tile_typed(s, bits, v_tile, prod, alpha, m, l, acc, bias, slot, has_bias, row_bias,
                     is_causal, i0, j0, nrows, ncols):
    if s.dtype == types.float32:
        def impl(s, bits, v_tile, prod, alpha, m, l, acc, bias, slot, has_bias, row_bias, is_causal,
                 i0, j0, nrows, ncols):
            online_softmax_tile_exp2(s, v_tile, prod, alpha, m, l, acc, bias, slot, has_bias,
                                     row_bias, is_causal, i0, j0, nrows, ncols)
        return impl

    def impl64(s, bits, v_tile, prod, alpha, m, l, acc, bias, slot, has_bias, row_bias, is_causal,
               i0, j0, nrows, ncols):
        online_softmax_tile(s, s, bits, v_tile, prod, m, l, acc, bias, slot, has_bias, row_bias,
                            is_causal, i0, j0, nrows, ncols)
    return impl64


def _score_unit(dtype):
    """``(query factor, lse factor)``: float32 scores are base-2 logits (``scale log2 e``)."""
    return (math.log2(math.e), math.log(2.0)) if np.dtype(dtype) == np.float32 else (1.0, 1.0)


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _exact_tasks(q, k, v, out, lse, scale, lse_unit, bias, mask_index, has_bias, is_causal, block_q,
                 block_k, diag_k, bits_type, t0, t1):
    """Tasks = (batch row, block of queries), those of one batch row consecutive.

    ``scale`` multiplies the queries (for float32 it includes log2(e): base-2 scores);
    ``lse_unit`` turns the running maximum back into natural-log units (ln 2, or 1).
    With ``is_causal``, a key block that holds keys after some of the block's queries is
    taken in strips of ``diag_k`` keys, each with only the query rows that see a key of it.
    """
    bh_count, nq, d = q.shape
    nk = v.shape[1]
    dv = v.shape[2]
    row_bias = bias.shape[1] > 1
    n_qblocks = (nq + block_q - 1) // block_q
    # Per-call scratch (each thread runs its own call): O(block_q * (d + dv + block_k)).
    score_buf = np.empty(block_q * block_k, q.dtype)
    # The current batch row's K as row-major K^T blocks, rebuilt when the batch row changes
    # (a thread's tasks are consecutive: about once per row and call).
    kt = np.empty(nk * d, q.dtype)
    kt_row = -1
    kt_end = 0  # keys [0, kt_end) of batch row kt_row are in kt
    bits = np.empty((1, 1), bits_type)  # online_softmax_tile's exp needs no scratch
    qs = np.empty((block_q, d), q.dtype)
    acc = np.empty((block_q, dv), q.dtype)
    pv = np.empty((block_q * dv,), q.dtype)
    m = np.empty(block_q, q.dtype)
    l = np.empty(block_q, q.dtype)
    alpha = np.empty(block_q, q.dtype)
    ktd_buf = np.empty(d * min(diag_k, block_k), q.dtype)  # one strip of K^T, contiguous
    neg_inf = -np.inf
    for task in range(t0, t1):
        bh = task // n_qblocks
        # Causal: a batch row's most expensive (last) query blocks first, so that the
        # threads end the call on cheap tasks (the chunks are taken in order).
        qb = task % n_qblocks
        i0 = (n_qblocks - 1 - qb if is_causal else qb) * block_q
        i1 = min(nq, i0 + block_q)
        nrows = i1 - i0
        for i in range(nrows):
            for c in range(d):
                qs[i, c] = q[bh, i0 + i, c] * scale
            m[i] = neg_inf
            l[i] = 0.0
            for c in range(dv):
                acc[i, c] = 0.0
        key_end = min(nk, i1) if is_causal else nk
        if bh != kt_row:
            kt_row = bh
            kt_end = 0
        if kt_end < key_end:  # causal: only the key blocks this task needs, once
            _transpose_key_blocks(k, bh, block_k, kt, kt_end, key_end)
            kt_end = min(nk, (key_end + block_k - 1) // block_k * block_k)
        slot = mask_index[bh] if has_bias else 0
        for j0 in range(0, key_end, block_k):
            # Whole key blocks, as stored in kt (causal: the tile masks keys after a query).
            j1 = min(nk, j0 + block_k)
            ncols = j1 - j0
            if is_causal and j1 - 1 > i0 and diag_k < ncols:
                # The diagonal block in strips: rows before a strip's first key see none of
                # it and are skipped (about half the block's products at 128 of 512).
                kblk = kt[d * j0 : d * j1].reshape((d, ncols))
                for c0 in range(j0, min(j1, i1), diag_k):
                    c1 = min(j1, c0 + diag_k)
                    w = c1 - c0
                    r0 = max(i0, c0) - i0
                    rows = nrows - r0
                    ktd = ktd_buf[: d * w].reshape((d, w))
                    for c in range(d):
                        for j in range(w):
                            ktd[c, j] = kblk[c, c0 - j0 + j]
                    s = score_buf[: rows * w].reshape((rows, w))
                    np.dot(qs[r0:nrows], ktd, s)
                    prod = pv[: rows * dv].reshape((rows, dv))
                    _fold_tile(s, bits, v[bh, c0:c1], prod, alpha[r0:], m[r0:], l[r0:], acc[r0:],
                               bias, slot, has_bias, row_bias, is_causal, i0 + r0, c0, rows, w)
                continue
            s = score_buf[: nrows * ncols].reshape((nrows, ncols))
            # K^T blocks row-major: OpenBLAS packs them faster than k[bh, j0:j1].T
            # (one thread, 256 x 64 x 512: 90-92 against 85 GFLOP/s).
            np.dot(qs[:nrows], kt[d * j0 : d * j1].reshape((d, ncols)), s)
            prod = pv[: nrows * dv].reshape((nrows, dv))
            # The probabilities overwrite the scores: one tile-sized buffer.
            _fold_tile(s, bits, v[bh, j0:j1], prod, alpha, m, l, acc, bias, slot, has_bias,
                       row_bias, is_causal, i0, j0, nrows, ncols)
        for i in range(nrows):
            inv = 1.0 / l[i] if l[i] > 0 else 0.0
            for c in range(dv):
                out[bh, i0 + i, c] = acc[i, c] * inv
            # Row log-sum-exp of the scaled, masked scores (-inf for a row with no visible
            # key), saved for the backward pass; float64: lse_unit is 1, m[i] * 1 exact.
            lse[bh, i0 + i] = m[i] * lse_unit + math.log(l[i]) if l[i] > 0 else neg_inf


def forward(inp):
    """Exact attention of canonical inputs on the CPU threads (see :func:`forward_lse`)."""
    return forward_lse(inp)[0]


def forward_lse(inp):
    """Exact attention of canonical inputs on the CPU threads, and the rows' log-sum-exp.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        NumPy arrays ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``.

    Returns
    -------
    out : numpy.ndarray, shape ``[BH, Nq, dv]``
    lse : numpy.ndarray, shape ``[BH, Nq]``
        ``log sum_j exp(scale q_i k_j + bias_ij)`` over visible keys; -inf for a row with
        none.
    """
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    out = np.zeros((bh, nq, v.shape[2]), dtype=q.dtype)
    lse = np.full((bh, nq), -np.inf, dtype=q.dtype)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out, lse
    block_q = max(1, min(int(config.EXACT_CPU_BLOCK_Q), nq))
    block_k = max(1, min(int(config.EXACT_CPU_BLOCK_K), inp.nk))
    diag_k = max(1, int(config.EXACT_CPU_DIAG_K))
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    n_tasks = bh * ((nq + block_q - 1) // block_q)
    q_unit, lse_unit = _score_unit(q.dtype)
    run_tasks(_exact_tasks, n_tasks, q, k, v, out, lse, q.dtype.type(inp.scale * q_unit),
              q.dtype.type(lse_unit), bias, mask_index, has_bias, bool(inp.mask.is_causal), block_q,
              block_k, diag_k, bits_dtype(q.dtype),
              # causal tasks differ in cost up to Nq / block_q times: smaller chunks
              chunks_per_thread=16 if inp.mask.is_causal else 4)
    return out, lse


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _exact_backward_tasks(q, k, v, out, dout, lse, dq, dk, dv, scale, bias, mask_index, has_bias,
                          is_causal, block_q, block_k, bits_type, t0, t1):
    """Gradients of one batch row per task, recomputing the probabilities block by block.

    With ``P = exp(S - lse)`` and ``D_i = dout_i . out_i``: ``dV = P^T dout``,
    ``dS = P * (dout V^T - D)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``. A task owns
    its batch row's ``dq``, so no two threads write the same memory.
    """
    bh_count, nq, d = q.shape
    nk = k.shape[1]
    dvw = v.shape[2]
    row_bias = bias.shape[1] > 1
    neg_inf = -np.inf
    qs = np.empty((nq, d), q.dtype)
    drow = np.empty(nq, q.dtype)
    s_buf = np.empty(block_q * block_k, q.dtype)
    dp_buf = np.empty(block_q * block_k, q.dtype)
    bits_buf = np.empty(block_q * block_k, bits_type)
    dk_acc = np.empty((block_k, d), q.dtype)
    dv_acc = np.empty((block_k, dvw), q.dtype)
    dk_part = np.empty((block_k, d), q.dtype)
    dv_part = np.empty((block_k, dvw), q.dtype)
    dq_part = np.empty((block_q, d), q.dtype)
    for bh in range(t0, t1):
        slot = mask_index[bh] if has_bias else 0
        for i in range(nq):
            total = q[bh, i, 0] * 0
            for c in range(dvw):
                total += dout[bh, i, c] * out[bh, i, c]
            drow[i] = total
            for c in range(d):
                qs[i, c] = q[bh, i, c] * scale
                dq[bh, i, c] = 0.0
        for j0 in range(0, nk, block_k):
            j1 = min(nk, j0 + block_k)
            ncols = j1 - j0
            dk_acc[:ncols] = 0.0
            dv_acc[:ncols] = 0.0
            first = (j0 // block_q) * block_q if is_causal else 0  # earlier queries see no key here
            for i0 in range(first, nq, block_q):
                i1 = min(nq, i0 + block_q)
                nrows = i1 - i0
                p = s_buf[: nrows * ncols].reshape((nrows, ncols))
                np.dot(qs[i0:i1], k[bh, j0:j1].T, p)
                for i in range(nrows):
                    top = lse[bh, i0 + i]
                    r = i0 + i if row_bias else 0
                    for j in range(ncols):
                        sij = p[i, j]
                        if has_bias:
                            sij += bias[slot, r, j0 + j]
                        if (is_causal and j0 + j > i0 + i) or top == neg_inf:
                            sij = neg_inf
                        p[i, j] = sij - top if sij != neg_inf else neg_inf
                exp_block(p, bits_buf[: nrows * ncols].reshape((nrows, ncols)), nrows, ncols)
                np.dot(p.T, dout[bh, i0:i1], dv_part[:ncols])
                dp = dp_buf[: nrows * ncols].reshape((nrows, ncols))
                np.dot(dout[bh, i0:i1], v[bh, j0:j1].T, dp)
                for i in range(nrows):
                    for j in range(ncols):
                        dp[i, j] = p[i, j] * (dp[i, j] - drow[i0 + i])
                np.dot(dp, k[bh, j0:j1], dq_part[:nrows])
                np.dot(dp.T, qs[i0:i1], dk_part[:ncols])
                for i in range(nrows):
                    for c in range(d):
                        dq[bh, i0 + i, c] += dq_part[i, c] * scale
                for j in range(ncols):
                    for c in range(d):
                        dk_acc[j, c] += dk_part[j, c]
                    for c in range(dvw):
                        dv_acc[j, c] += dv_part[j, c]
            for j in range(ncols):
                for c in range(d):
                    dk[bh, j0 + j, c] = dk_acc[j, c]
                for c in range(dvw):
                    dv[bh, j0 + j, c] = dv_acc[j, c]


def backward(inp, out, lse, dout):
    """Gradients of exact attention on the CPU threads.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        The forward's canonical inputs (NumPy).
    out : numpy.ndarray, shape ``[BH, Nq, dv]``
    lse : numpy.ndarray, shape ``[BH, Nq]``
        From :func:`forward_lse`.
    dout : numpy.ndarray, shape ``[BH, Nq, dv]``
        Gradient of the loss with respect to ``out``.

    Returns
    -------
    dq, dk, dv : numpy.ndarray
        ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]``. Memory ``O(N d)`` besides them:
        the probabilities are recomputed block by block, never stored.
    """
    q, k, v = inp.q, inp.k, inp.v
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    if q.shape[0] == 0 or inp.nq == 0 or inp.nk == 0:
        return dq, dk, dv
    block_q = max(1, min(int(config.CPU_BWD_BLOCK_Q), inp.nq))
    block_k = max(1, min(int(config.CPU_BWD_BLOCK_K), inp.nk))
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    cast = [np.ascontiguousarray(a, dtype=q.dtype) for a in (out, dout, lse)]
    run_tasks(_exact_backward_tasks, q.shape[0], q, k, v, *cast, dq, dk, dv, q.dtype.type(inp.scale),
              bias, mask_index, has_bias, bool(inp.mask.is_causal), block_q, block_k,
              bits_dtype(q.dtype), chunks_per_thread=1)
    return dq, dk, dv

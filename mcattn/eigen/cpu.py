"""Eigen reconstruction attention on the CPU: one Numba pass per query row.

A task is a block of query rows of one batch row. For the block the kernel computes the
fixed columns' scores and the reconstruction ``base + a_S @ G`` by BLAS; per row it
writes the computed columns back exactly, applies the mask, picks the ``per_query``
largest visible reconstructed scores outside the fixed columns (one ``O(n)`` partition
for the threshold, ties to the lower index, as :mod:`mcattn.eigen.naive`), computes them exactly, and
finishes with the softmax (:func:`mcattn._cpu_math.exp_block`) and ``P @ V`` (BLAS).
Scratch is ``O(BLOCK_Q (n + m + d + dv))`` per thread.
"""

import numpy as np

from .._cpu import run_tasks
from .._cpu_math import bits_dtype, exp_block
from .._jit import njit

__all__ = ["forward", "BLOCK_Q"]

BLOCK_Q = 64
_FLAGS = {"nsz", "contract", "reassoc"}


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _eigen_tasks(q, k, v, out, scale, cols, weights, base, per_query, bias, mask_index, has_bias,
                 is_causal, block_q, bits_type, t0, t1):
    bh_count, nq, d = q.shape
    nk = k.shape[1]
    dv = v.shape[2]
    heads, m = cols.shape
    positional = base.shape[1] > 1
    row_bias = bias.shape[1] > 1
    n_qblocks = (nq + block_q - 1) // block_q
    qs = np.empty((block_q, d), q.dtype)
    ks = np.empty((m, d), q.dtype)
    a_s = np.empty((block_q, m), q.dtype)
    s = np.empty((block_q, nk), q.dtype)
    bits = np.empty((block_q, nk), bits_type)
    cand = np.empty(nk, q.dtype)
    work = np.empty(nk, q.dtype)
    total = np.empty(block_q, q.dtype)
    pv = np.empty((block_q, dv), q.dtype)
    neg_inf = -np.inf
    for task in range(t0, t1):
        b = task // n_qblocks
        i0 = (task % n_qblocks) * block_q
        i1 = min(nq, i0 + block_q)
        rows = i1 - i0
        h = b % heads
        slot = mask_index[b] if has_bias else 0
        for i in range(rows):
            for c in range(d):
                qs[i, c] = q[b, i0 + i, c] * scale
        for t in range(m):
            for c in range(d):
                ks[t, c] = k[b, cols[h, t], c]
        # Fixed columns and the reconstruction, a block of rows at a time (BLAS).
        np.dot(qs[:rows], ks.T, a_s[:rows])
        np.dot(a_s[:rows], weights[h], s[:rows])
        for i in range(rows):
            pos = i0 + i if positional else 0
            for j in range(nk):
                s[i, j] += base[h, pos, j]
            for t in range(m):
                s[i, cols[h, t]] = a_s[i, t]
            r = i0 + i if row_bias else 0
            if has_bias:
                for j in range(nk):
                    s[i, j] += bias[slot, r, j]
            if is_causal:
                for j in range(i0 + i + 1, nk):
                    s[i, j] = neg_inf
            if per_query > 0:
                # The per_query largest visible scores outside the fixed columns: one
                # O(n) partition finds the threshold, ties go to the lower index.
                live = 0
                for j in range(nk):
                    cand[j] = s[i, j]
                for t in range(m):
                    cand[cols[h, t]] = neg_inf
                for j in range(nk):
                    if cand[j] > neg_inf:
                        live += 1
                want = min(per_query, live)
                if want > 0:
                    for j in range(nk):
                        work[j] = cand[j]
                    thresh = np.partition(work, nk - want)[nk - want]
                    above = 0
                    for j in range(nk):
                        if cand[j] > thresh:
                            above += 1
                    ties = want - above
                    for j in range(nk):
                        c0 = cand[j]
                        if c0 > thresh or (c0 == thresh and ties > 0):
                            if c0 == thresh:
                                ties -= 1
                            acc0 = qs[i, 0] * 0
                            for c in range(d):
                                acc0 += qs[i, c] * k[b, j, c]
                            if has_bias:
                                acc0 += bias[slot, r, j]
                            s[i, j] = acc0
            top = neg_inf
            for j in range(nk):
                top = max(top, s[i, j])
            if top == neg_inf:  # no visible key: a zero row
                for j in range(nk):
                    s[i, j] = neg_inf
                top = 0.0
            for j in range(nk):
                s[i, j] -= top
        exp_block(s, bits, rows, nk)
        for i in range(rows):
            acc0 = s[i, 0] * 0
            for j in range(nk):
                acc0 += s[i, j]
            total[i] = acc0
        np.dot(s[:rows], v[b], pv[:rows])
        for i in range(rows):
            inv = 1.0 / total[i] if total[i] > 0 else 0.0
            for c in range(dv):
                out[b, i0 + i, c] = pv[i, c] * inv


def forward(inp, plan):
    """Eigen reconstruction attention of canonical NumPy inputs on the CPU threads.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    plan : mcattn.eigen.plan.Plan

    Returns
    -------
    numpy.ndarray, shape ``[BH, Nq, dv]``
    """
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    out = np.zeros((bh, nq, v.shape[2]), dtype=q.dtype)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out
    dt = q.dtype
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), dt)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    block_q = max(1, min(BLOCK_Q, nq))
    n_tasks = bh * ((nq + block_q - 1) // block_q)
    run_tasks(_eigen_tasks, n_tasks, q, k, v, out, dt.type(inp.scale),
              np.ascontiguousarray(plan.columns, dtype=np.int64),
              np.ascontiguousarray(plan.weights, dtype=dt), np.ascontiguousarray(plan.base, dtype=dt),
              int(plan.per_query), bias, mask_index, has_bias, bool(inp.mask.is_causal), block_q,
              bits_dtype(dt))
    return out

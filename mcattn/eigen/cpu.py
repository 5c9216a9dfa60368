"""Eigen reconstruction attention on the CPU: one Numba pass per query row.

A task is a block of query rows of one batch row. For each row the kernel computes the
fixed columns' scores, the reconstruction ``base + a_S @ G`` (a loop LLVM vectorises),
writes the computed columns back exactly, applies the mask, picks the ``per_query``
largest visible reconstructed scores outside the fixed columns (a selection pass per
pick, ties to the lower index, as :mod:`mcattn.eigen.naive`), computes them exactly, and
finishes with the softmax (:func:`mcattn._cpu_math.exp_block`) and ``P @ V``. Scratch is
``O(n + m)`` per thread.
"""

import numpy as np
from numba import njit

from .._cpu import run_tasks
from .._cpu_math import bits_dtype, exp_block

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
    a_s = np.empty(m, q.dtype)
    s = np.empty((1, nk), q.dtype)
    bits = np.empty((1, nk), bits_type)
    taken = np.zeros(nk, np.uint8)
    acc = np.empty(dv, q.dtype)
    qs = np.empty(d, q.dtype)
    neg_inf = -np.inf
    for task in range(t0, t1):
        b = task // n_qblocks
        i0 = (task % n_qblocks) * block_q
        i1 = min(nq, i0 + block_q)
        h = b % heads
        slot = mask_index[b] if has_bias else 0
        for i in range(i0, i1):
            for c in range(d):
                qs[c] = q[b, i, c] * scale
            for t in range(m):
                acc0 = qs[0] * 0
                kj = cols[h, t]
                for c in range(d):
                    acc0 += qs[c] * k[b, kj, c]
                a_s[t] = acc0
            pos = i if positional else 0
            for j in range(nk):
                s[0, j] = base[h, pos, j]
            for t in range(m):
                w = a_s[t]
                for j in range(nk):
                    s[0, j] += w * weights[h, t, j]
            for t in range(m):
                s[0, cols[h, t]] = a_s[t]
            r = i if row_bias else 0
            if has_bias:
                for j in range(nk):
                    s[0, j] += bias[slot, r, j]
            if is_causal:
                for j in range(i + 1, nk):
                    s[0, j] = neg_inf
            if per_query > 0:
                for j in range(nk):
                    taken[j] = 0
                for t in range(m):
                    taken[cols[h, t]] = 1
                for _ in range(per_query):
                    best = -1
                    for j in range(nk):
                        if taken[j] == 0 and s[0, j] > neg_inf and (best < 0 or s[0, j] > s[0, best]):
                            best = j
                    if best < 0:
                        break
                    taken[best] = 1
                    acc0 = qs[0] * 0
                    for c in range(d):
                        acc0 += qs[c] * k[b, best, c]
                    if has_bias:
                        acc0 += bias[slot, r, best]
                    s[0, best] = acc0
            top = neg_inf
            for j in range(nk):
                top = max(top, s[0, j])
            if top == neg_inf:
                for c in range(dv):
                    out[b, i, c] = 0.0
                continue
            for j in range(nk):
                s[0, j] -= top
            exp_block(s, bits, 1, nk)
            total = s[0, 0] * 0
            for c in range(dv):
                acc[c] = 0.0
            for j in range(nk):
                p = s[0, j]
                total += p
                for c in range(dv):
                    acc[c] += p * v[b, j, c]
            inv = 1.0 / total
            for c in range(dv):
                out[b, i, c] = acc[c] * inv


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

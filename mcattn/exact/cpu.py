"""Exact attention on the CPU: a Numba kernel with a streaming (online) softmax.

A task is one block of ``BLOCK_Q`` query rows of one batch row. It walks over blocks of
``BLOCK_K`` keys: ``S = Q K^T`` by BLAS, the running max/sum update, ``exp`` by a
vectorisable polynomial (float32) or libm (float64), and ``acc += P V`` by BLAS. Scratch
is ``O(BLOCK_Q * BLOCK_K)`` per thread, so memory is ``O(N d)`` whatever ``N`` is; with
``is_causal`` the key blocks after a query block are skipped.

Why a polynomial exp: without Intel's SVML, ``math.exp`` in a Numba loop is a scalar
libm call per score, several times slower than the matrix products around it. The float32
kernel evaluates ``2**t`` as ``2**round(t) * p(t - round(t))`` with ``p`` the degree-7
Taylor polynomial of ``2**f`` on ``|f| <= 1/2`` (truncation error below 6e-9, under
float32 rounding) and builds ``2**round(t)`` from its exponent bits. Two plain loops,
both of which LLVM vectorises.
"""

import math

import numpy as np
from numba import njit

from .. import config
from .._cpu import run_tasks

__all__ = ["forward"]

_LOG2E = np.float32(1.4426950408889634)
_LN2 = math.log(2.0)
# Taylor coefficients (ln 2)^n / n! of 2**f = exp(f ln 2), n = 0..7.
_C = [np.float32(_LN2**n / math.factorial(n)) for n in range(8)]
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7 = _C
_HALF = np.float32(0.5)
_FLOOR_EXP = np.float32(-127.0)  # 2**-127 -> exponent bits 0 -> exactly 0 (underflow)
_BIAS = np.int32(127)
_MANT = np.int32(23)

_FLAGS = {"nsz", "contract", "reassoc"}  # order of sums only; no finite-math assumptions


@njit(nogil=True, cache=True, fastmath={"contract"})
def _exp_block_f32(s, bits, rows, cols):
    """In place ``s[:rows, :cols] = exp(s)`` for ``s <= 0`` (or -inf), float32."""
    for r in range(rows):
        for c in range(cols):
            t = max(s[r, c] * _LOG2E, _FLOOR_EXP)
            n = np.floor(t + _HALF)
            f = t - n
            s[r, c] = _C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * (_C5 + f * (_C6 + f * _C7))))))
            bits[r, c] = (np.int32(n) + _BIAS) << _MANT
    scale = bits.view(np.float32)
    for r in range(rows):
        for c in range(cols):
            s[r, c] *= scale[r, c]


@njit(nogil=True, cache=True)
def _exp_block_f64(s, bits, rows, cols):
    """In place ``s[:rows, :cols] = exp(s)``, float64, libm (accuracy first)."""
    for r in range(rows):
        for c in range(cols):
            s[r, c] = math.exp(s[r, c])


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _exact_tasks(q, k, v, out, scale, bias, mask_index, has_bias, is_causal, block_q, block_k,
                 exp_block, bits_dtype, t0, t1):
    bh_count, nq, d = q.shape
    nk = k.shape[1]
    dv = v.shape[2]
    row_bias = bias.shape[1] > 1
    n_qblocks = (nq + block_q - 1) // block_q
    # Per-call scratch (each thread runs its own call): O(block_q * (d + dv + block_k)).
    score_buf = np.empty(block_q * block_k, q.dtype)
    prob_buf = np.empty(block_q * block_k, q.dtype)
    bits_buf = np.empty(block_q * block_k, bits_dtype)
    qs = np.empty((block_q, d), q.dtype)
    acc = np.empty((block_q, dv), q.dtype)
    pv = np.empty((block_q * dv,), q.dtype)
    m = np.empty(block_q, q.dtype)
    l = np.empty(block_q, q.dtype)
    neg_inf = -np.inf
    for task in range(t0, t1):
        bh = task // n_qblocks
        i0 = (task % n_qblocks) * block_q
        i1 = min(nq, i0 + block_q)
        nrows = i1 - i0
        for i in range(nrows):
            for c in range(d):
                qs[i, c] = q[bh, i0 + i, c] * scale
            m[i] = neg_inf
            l[i] = 0.0
            for c in range(dv):
                acc[i, c] = 0.0
        slot = mask_index[bh] if has_bias else 0
        key_end = min(nk, i1) if is_causal else nk
        for j0 in range(0, key_end, block_k):
            j1 = min(key_end, j0 + block_k)
            ncols = j1 - j0
            s = score_buf[: nrows * ncols].reshape((nrows, ncols))
            np.dot(qs[:nrows], k[bh, j0:j1].T, s)
            p = prob_buf[: nrows * ncols].reshape((nrows, ncols))
            bits = bits_buf[: nrows * ncols].reshape((nrows, ncols))
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
                    top = max(top, s[i, j])
                if top == neg_inf:  # nothing visible yet: contributes exp(-inf) = 0
                    for j in range(ncols):
                        p[i, j] = neg_inf
                    continue
                rescale = math.exp(m[i] - top)  # exp(-inf) = 0 on the first visible block
                m[i] = top
                l[i] *= rescale
                for c in range(dv):
                    acc[i, c] *= rescale
                for j in range(ncols):
                    p[i, j] = s[i, j] - top
            exp_block(p, bits, nrows, ncols)
            for i in range(nrows):
                total = p[i, 0] * 0
                for j in range(ncols):
                    total += p[i, j]
                l[i] += total
            prod = pv[: nrows * dv].reshape((nrows, dv))
            np.dot(p, v[bh, j0:j1], prod)
            for i in range(nrows):
                for c in range(dv):
                    acc[i, c] += prod[i, c]
        for i in range(nrows):
            inv = 1.0 / l[i] if l[i] > 0 else 0.0
            for c in range(dv):
                out[bh, i0 + i, c] = acc[i, c] * inv


def forward(inp):
    """Exact attention of canonical inputs on the CPU threads.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        NumPy arrays ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``.

    Returns
    -------
    numpy.ndarray, shape ``[BH, Nq, dv]``
    """
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    out = np.zeros((bh, nq, v.shape[2]), dtype=q.dtype)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out
    block_q = max(1, min(int(config.CPU_BLOCK_Q), nq))
    block_k = max(1, min(int(config.CPU_BLOCK_K), inp.nk))
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    exp_block = _exp_block_f32 if q.dtype == np.float32 else _exp_block_f64
    n_tasks = bh * ((nq + block_q - 1) // block_q)
    bits_dtype = np.int32 if q.dtype == np.float32 else np.int64
    run_tasks(_exact_tasks, n_tasks, q, k, v, out, q.dtype.type(inp.scale), bias, mask_index,
              has_bias, bool(inp.mask.is_causal), block_q, block_k, exp_block, bits_dtype)
    return out

"""E-Att on the CPU: Numba kernels for the streaming L1/Hamming attention and the projection.

Attention: a task is a block of ``BLOCK_Q`` query rows of one batch row, walking over
blocks of ``BLOCK_K`` keys with an online softmax (as :mod:`mcattn.exact.cpu`). The
score block is built without a multiplication: L1 distances of the pre-scaled rows (the
inner loop over the head dim is a vectorised subtract / abs / add reduction), or
Hamming distances by XOR and popcount on the packed sign codes, turned into scores by a
``d + 1`` entry table. ``P V`` is a BLAS product, as in exact attention (values are
full precision in E-Att).

Selective projection: a task is a range of tokens; for each set bit of a token's packed
code the matching row of ``w`` is added (a vectorised loop over the output columns).

Backward (L1 alignment, :func:`backward_l1`): a task is a batch row; each query row's
scores are recomputed into a buffer of ``Nk`` numbers and its gradients accumulated key
by key (the reference is :func:`mcattn.eatt.naive.reference_backward`).
"""

import numpy as np

from .. import config
from .._cpu import run_tasks
from .._cpu_math import bits_dtype, online_softmax_tile
from .._jit import njit

__all__ = ["forward", "backward_l1", "selective_projection", "popcount64"]

_FLAGS = {"nsz", "contract", "reassoc"}  # order of sums only; no finite-math assumptions
_U1 = np.uint64(1)
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(nogil=True, cache=True, inline="always")
def popcount64(x):
    """Set bits of a uint64 (SWAR; LLVM turns it into ``popcnt`` where the CPU has one)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _eatt_tasks(hamming, qs, ks, qc, kc, neg_table, v, out, bias, mask_index, has_bias,
                is_causal, block_q, block_k, bits_type, t0, t1):
    nq = out.shape[1]
    nk, dv = v.shape[1], v.shape[2]
    d = qs.shape[2]
    words = qc.shape[2]
    row_bias = bias.shape[1] > 1
    n_qblocks = (nq + block_q - 1) // block_q
    score_buf = np.empty(block_q * block_k, v.dtype)
    bits_buf = np.empty(block_q * block_k, bits_type)
    kt_buf = np.empty(block_k * (1 if hamming else d), v.dtype)
    acc = np.empty((block_q, dv), v.dtype)
    pv = np.empty(block_q * dv, v.dtype)
    m = np.empty(block_q, v.dtype)
    l = np.empty(block_q, v.dtype)
    neg_inf = -np.inf
    zero = np.zeros(1, v.dtype)[0]
    for task in range(t0, t1):
        bh = task // n_qblocks
        i0 = (task % n_qblocks) * block_q
        i1 = min(nq, i0 + block_q)
        nrows = i1 - i0
        for i in range(nrows):
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
            bits = bits_buf[: nrows * ncols].reshape((nrows, ncols))
            if hamming:
                for i in range(nrows):
                    for j in range(ncols):
                        h = 0
                        for w in range(words):
                            h += popcount64(qc[bh, i0 + i, w] ^ kc[bh, j0 + j, w])
                        s[i, j] = neg_table[h]
            else:
                # Keys transposed once per block, so that the innermost loop runs over
                # contiguous keys (vectorised, no horizontal sum per pair).
                kt = kt_buf[: d * ncols].reshape((d, ncols))
                for j in range(ncols):
                    for c in range(d):
                        kt[c, j] = ks[bh, j0 + j, c]
                for i in range(nrows):
                    for j in range(ncols):
                        s[i, j] = zero
                    for c in range(d):
                        qv = qs[bh, i0 + i, c]
                        for j in range(ncols):
                            s[i, j] -= abs(qv - kt[c, j])
            prod = pv[: nrows * dv].reshape((nrows, dv))
            online_softmax_tile(s, s, bits, v[bh, j0:j1], prod, m, l, acc, bias, slot, has_bias,
                                row_bias, is_causal, i0, j0, nrows, ncols)
        for i in range(nrows):
            inv = 1.0 / l[i] if l[i] > 0 else 0.0
            for c in range(dv):
                out[bh, i0 + i, c] = acc[i, c] * inv


def forward(inp, alignment="l1", codes=None):
    """E-Att attention of canonical inputs on the CPU threads.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        NumPy ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``.
    alignment : {"l1", "hamming"}
    codes : (qb, kb), for ``"hamming"``
        Packed sign codes ``[BH, Nq, W]``, ``[BH, Nk, W]`` (uint64).

    Returns
    -------
    numpy.ndarray, shape ``[BH, Nq, dv]``
    """
    q, v = inp.q, inp.v
    bh, nq, d = q.shape
    dt = q.dtype
    out = np.zeros((bh, nq, v.shape[2]), dtype=dt)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out
    block_q = max(1, min(int(config.CPU_BLOCK_Q), nq))
    block_k = max(1, min(int(config.CPU_BLOCK_K), inp.nk))
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), dt)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    scale = dt.type(inp.scale)
    hamming = alignment == "hamming"
    if hamming:
        qc, kc = (np.ascontiguousarray(c) for c in codes)
        qs = ks = np.zeros((1, 1, 1), dt)
        neg_table = -(scale * np.arange(d + 1, dtype=dt))  # score of each distance
    else:
        # s |a - b| = |s a - s b| for s > 0: rows scaled once, no multiply per pair.
        qs, ks = (q, inp.k) if inp.scale == 1.0 else (q * scale, inp.k * scale)
        qc = kc = np.zeros((1, 1, 1), np.uint64)
        neg_table = np.zeros(1, dt)
    n_tasks = bh * ((nq + block_q - 1) // block_q)
    run_tasks(_eatt_tasks, n_tasks, hamming, qs, ks, qc, kc, neg_table, v, out, bias, mask_index,
              has_bias, bool(inp.mask.is_causal), block_q, block_k, bits_dtype(dt))
    return out


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _projection_tasks(words, w, out, t0, t1):
    d_in, d_out = w.shape
    for t in range(t0, t1):
        for c in range(d_out):
            out[t, c] = 0.0
        for wi in range(words.shape[1]):
            word = words[t, wi]
            b = 0
            while word != 0:  # visit the set bits only
                if word & _U1:
                    row = wi * 64 + b
                    for c in range(d_out):
                        out[t, c] += w[row, c]
                word = word >> _U1
                b += 1


def selective_projection(words, w, bias=None):
    """Rows of ``w`` selected by packed codes, summed.

    Parameters
    ----------
    words : numpy.ndarray of uint64, shape ``[T, ceil(d_in / 64)]``
    w : numpy.ndarray, shape ``[d_in, d_out]``
    bias : numpy.ndarray, shape ``[d_out]``, optional

    Returns
    -------
    numpy.ndarray, shape ``[T, d_out]``
    """
    t = words.shape[0]
    out = np.empty((t, w.shape[1]), w.dtype)
    run_tasks(_projection_tasks, t, np.ascontiguousarray(words), np.ascontiguousarray(w), out)
    if bias is not None:
        out += bias
    return out


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _l1_backward_tasks(q, k, v, dout, dq, dk, dv, scale, bias, mask_index, has_bias, is_causal,
                       t0, t1):
    nq, d = q.shape[1], q.shape[2]
    nk, width = v.shape[1], v.shape[2]
    row_bias = bias.shape[1] > 1
    s = np.empty(nk, np.float64)
    dp = np.empty(nk, np.float64)
    kt = np.empty((d, nk), np.float64)  # keys and values transposed: inner loops over keys
    vt = np.empty((width, nk), np.float64)
    kr = np.empty((nk, d), np.float64)
    qi = np.empty(d, np.float64)
    gi = np.empty(width, np.float64)
    neg_inf = -np.inf
    for b in range(t0, t1):  # one batch row per task: dk, dv are summed over its queries only
        for j in range(nk):
            for c in range(d):
                kt[c, j] = k[b, j, c]
                kr[j, c] = k[b, j, c]
            for c in range(width):
                vt[c, j] = v[b, j, c]
        slot = mask_index[b] if has_bias else 0
        for i in range(nq):
            end = min(nk, i + 1) if is_causal else nk
            for c in range(d):
                qi[c] = q[b, i, c]
            for c in range(width):
                gi[c] = dout[b, i, c]
            for j in range(end):
                s[j] = 0.0
                dp[j] = 0.0
            for c in range(d):  # L1 distances, vectorised over the keys
                for j in range(end):
                    s[j] += abs(qi[c] - kt[c, j])
            for c in range(width):  # dO_i . v_j
                for j in range(end):
                    dp[j] += gi[c] * vt[c, j]
            top = neg_inf
            for j in range(end):
                sj = -scale * s[j]
                if has_bias:
                    sj += bias[slot, i if row_bias else 0, j]
                s[j] = sj
                top = max(top, sj)
            if top == neg_inf:
                continue  # no visible key: the row's output is 0 and so are its gradients
            total = 0.0
            for j in range(end):
                e = np.exp(s[j] - top) if s[j] > neg_inf else 0.0
                s[j] = e
                total += e
            delta = 0.0
            for j in range(end):
                s[j] /= total  # P_ij
                delta += s[j] * dp[j]
            for j in range(end):
                dp[j] = scale * s[j] * (dp[j] - delta)  # scale dS_ij
            for c in range(d):  # dq_ic = -sum_j scale dS_ij sign(q_ic - k_jc)
                acc = 0.0
                for j in range(end):
                    diff = qi[c] - kt[c, j]
                    acc += dp[j] * ((diff > 0.0) - (diff < 0.0))
                dq[b, i, c] = -acc
            for j in range(end):
                pj, dsj = s[j], dp[j]
                if pj == 0.0:
                    continue
                for c in range(width):
                    dv[b, j, c] += pj * gi[c]
                for c in range(d):
                    diff = qi[c] - kr[j, c]
                    dk[b, j, c] += dsj * ((diff > 0.0) - (diff < 0.0))


def backward_l1(inp, dout):
    """Gradients of L1-alignment attention on the CPU threads (float64 accumulation).

    A task is a batch row; for each query row the scores are computed into a buffer of
    ``Nk`` numbers, normalised, and the gradients accumulated key by key:
    ``dS_ij = P_ij (dO_i . v_j - sum_j' P_ij' dO_i . v_j')``,
    ``dq_i -= scale sum_j dS_ij sign(q_i - k_j)``, ``dk_j += scale dS_ij sign(q_i - k_j)``,
    ``dv_j += P_ij dO_i`` (``sign(0) = 0``). Memory ``O(Nk (d + dv))`` per thread besides
    the gradients; the reference is :func:`mcattn.eatt.naive.reference_backward`.

    Keys and values of the task's batch row are held transposed in float64 (``O(Nk d)``
    per thread) so that the loops over keys vectorise.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        NumPy ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``, mask, scale.
    dout : numpy.ndarray, shape ``[BH, Nq, dv]``

    Returns
    -------
    dq, dk, dv : numpy.ndarray of float64
    """
    q, k, v = inp.q, inp.k, inp.v
    bh = q.shape[0]
    dq = np.zeros(q.shape, np.float64)
    dk = np.zeros(k.shape, np.float64)
    dv = np.zeros(v.shape, np.float64)
    if bh == 0 or inp.nq == 0 or inp.nk == 0:
        return dq, dk, dv
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias.astype(np.float64) if has_bias else np.zeros((1, 1, 1))
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    run_tasks(_l1_backward_tasks, bh, q, k, v, np.ascontiguousarray(dout), dq, dk, dv,
              float(inp.scale), bias, mask_index, has_bias, bool(inp.mask.is_causal))
    return dq, dk, dv

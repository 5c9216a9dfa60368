"""Exact softmax attention, the readable reference (NumPy, or CuPy through ``xp``).

``forward`` streams over blocks of keys with an online softmax, so memory stays
``O(block)`` instead of ``O(Nq * Nk)``; ``probs`` builds the full probability matrix (it
is ``Nq x Nk`` by nature). Both compute in the dtype of the inputs (float32 or float64)
and work on the canonical inputs of :func:`mcattn._validate.prepare_attention`.
"""

import numpy as np

from .. import config

__all__ = ["forward", "forward_lse", "backward", "probs", "masked_scores"]


def masked_scores(inp, b0, b1, i0, i1, j0, j1):
    """Scores ``scale * q k^T + bias`` (causal applied) of one block: ``[b1-b0, i1-i0, j1-j0]``."""
    xp = inp.xp
    s = xp.matmul(inp.q[b0:b1, i0:i1], inp.k[b0:b1, j0:j1].transpose(0, 2, 1))
    s *= inp.dtype.type(inp.scale)
    mask = inp.mask
    if mask.bias is not None:
        rows = slice(i0, i1) if mask.bias.shape[1] > 1 else slice(0, 1)
        index = xp.asarray(mask.mask_index[b0:b1])
        s += mask.bias[index, rows, j0:j1]
    if mask.is_causal:
        visible = xp.arange(j0, j1)[None, :] <= xp.arange(i0, i1)[:, None]
        s = xp.where(visible[None], s, inp.dtype.type(-np.inf))
    return s


def _blocks(inp):
    """Block sizes (batch rows, queries, keys) that keep a score block under the cap."""
    cap = max(1, int(config.NUMPY_MAX_BLOCK_ELEMENTS))
    bk = max(1, min(inp.nk, int(config.NUMPY_BLOCK_K)))
    bq = max(1, min(inp.nq, cap // bk))
    bb = max(1, min(inp.q.shape[0], cap // (bk * bq)))
    return bb, bq, bk


def forward(inp):
    """Exact attention of canonical inputs (see :func:`forward_lse`)."""
    return forward_lse(inp)[0]


def forward_lse(inp):
    """Exact attention of canonical inputs, and each row's log-sum-exp.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]`` and the mask spec.

    Returns
    -------
    out : array, shape ``[BH, Nq, dv]``
        ``softmax(scale q k^T + bias) v``; a query row with no visible key is zero.
    lse : array, shape ``[BH, Nq]``
        ``log sum_j exp(scale q_i k_j + bias_ij)``; -inf for a row with no visible key.
    """
    xp = inp.xp
    dt = inp.dtype.type
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    out = xp.zeros((bh, nq, inp.value_dim), dtype=inp.dtype)
    lse = xp.full((bh, nq), -np.inf, dtype=inp.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out, lse
    bb, bq, bk = _blocks(inp)
    for b0 in range(0, bh, bb):
        b1 = min(bh, b0 + bb)
        for i0 in range(0, nq, bq):
            i1 = min(nq, i0 + bq)
            # Running max m, running sum l and unnormalised output acc of every row.
            m = xp.full((b1 - b0, i1 - i0), -np.inf, dtype=inp.dtype)
            l = xp.zeros((b1 - b0, i1 - i0), dtype=inp.dtype)
            acc = xp.zeros((b1 - b0, i1 - i0, inp.value_dim), dtype=inp.dtype)
            key_end = min(nk, i1) if inp.mask.is_causal else nk  # later keys are invisible
            for j0 in range(0, key_end, bk):
                j1 = min(key_end, j0 + bk)
                s = masked_scores(inp, b0, b1, i0, i1, j0, j1)
                m_new = xp.maximum(m, s.max(axis=-1))
                # A row that has seen no visible key yet keeps max -inf: shift by 0 instead
                # so that exp(-inf - shift) = 0 rather than NaN.
                shift = xp.where(xp.isfinite(m_new), m_new, dt(0))
                p = xp.exp(s - shift[..., None])
                rescale = xp.exp(m - shift)
                l = l * rescale + p.sum(axis=-1)
                acc = acc * rescale[..., None] + xp.matmul(p, inp.v[b0:b1, j0:j1])
                m = m_new
            safe = xp.where(l > 0, l, dt(1))
            out[b0:b1, i0:i1] = xp.where((l > 0)[..., None], acc / safe[..., None], dt(0))
            lse[b0:b1, i0:i1] = xp.where(l > 0, m + xp.log(safe), dt(-np.inf))
    return out, lse


def backward(inp, out, lse, dout):
    """Gradients of exact attention, recomputing the probabilities block by block.

    With ``P = exp(S - lse)`` (``S`` the scaled, masked scores) and
    ``D_i = sum_c dout_ic out_ic``: ``dV = P^T dout``, ``dS = P * (dout V^T - D)``,
    ``dQ = scale dS K`` and ``dK = scale dS^T Q``. Masks get no gradient.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    out : array, shape ``[BH, Nq, dv]``
    lse : array, shape ``[BH, Nq]``
        From :func:`forward_lse`.
    dout : array, shape ``[BH, Nq, dv]``

    Returns
    -------
    dq, dk, dv : arrays of the shapes of ``inp.q``, ``inp.k``, ``inp.v``
    """
    xp = inp.xp
    dq, dk, dv = xp.zeros_like(inp.q), xp.zeros_like(inp.k), xp.zeros_like(inp.v)
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    if bh == 0 or nq == 0 or nk == 0:
        return dq, dk, dv
    scale = inp.dtype.type(inp.scale)
    delta = (dout * out).sum(-1)  # [BH, Nq]
    finite = xp.isfinite(lse)
    shift = xp.where(finite, lse, inp.dtype.type(0))
    bb, bq, bk = _blocks(inp)
    for b0 in range(0, bh, bb):
        b1 = min(bh, b0 + bb)
        for i0 in range(0, nq, bq):
            i1 = min(nq, i0 + bq)
            for j0 in range(0, nk, bk):
                j1 = min(nk, j0 + bk)
                s = masked_scores(inp, b0, b1, i0, i1, j0, j1)
                p = xp.exp(s - shift[b0:b1, i0:i1, None])
                p = xp.where(finite[b0:b1, i0:i1, None], p, inp.dtype.type(0))
                g = dout[b0:b1, i0:i1]
                dv[b0:b1, j0:j1] += xp.matmul(p.transpose(0, 2, 1), g)
                ds = p * (xp.matmul(g, inp.v[b0:b1, j0:j1].transpose(0, 2, 1))
                          - delta[b0:b1, i0:i1, None])
                dq[b0:b1, i0:i1] += scale * xp.matmul(ds, inp.k[b0:b1, j0:j1])
                dk[b0:b1, j0:j1] += scale * xp.matmul(ds.transpose(0, 2, 1), inp.q[b0:b1, i0:i1])
    return dq, dk, dv


def probs(inp):
    """The attention probability matrix ``softmax(scale q k^T + bias)``.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs

    Returns
    -------
    array, shape ``[BH, Nq, Nk]``
        Rows sum to 1, except rows with no visible key, which are 0.
    """
    xp = inp.xp
    dt = inp.dtype.type
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    out = xp.zeros((bh, nq, nk), dtype=inp.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    # Several batch rows per step when rows are short, keeping a step's temporaries
    # cache-sized (about 2**16 numbers).
    step = max(1, (1 << 16) // max(1, nq * nk))
    for b0 in range(0, bh, step):
        b1 = min(bh, b0 + step)
        s = masked_scores(inp, b0, b1, 0, nq, 0, nk)
        top = s.max(axis=-1, keepdims=True)
        top = xp.where(xp.isfinite(top), top, dt(0))
        p = xp.exp(s - top)
        total = p.sum(axis=-1, keepdims=True)
        out[b0:b1] = xp.where(total > 0, p / xp.where(total > 0, total, dt(1)), dt(0))
    return out

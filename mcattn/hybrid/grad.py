"""Hybrid attention for training: the backward through the kept scores and the remainder.

The forward is :func:`mcattn.hybrid.attention` itself (no residuals: the backward
recomputes the kept sets, identical on every backend). With ``P = (w + r) / sum(w + r)``
the forward's weights (:mod:`mcattn.hybrid.naive`):

* ``dV = P^T dO``: the pooled weights ``r`` reach the values of the dropped keys;
* ``dS = P * (dO V^T - rowsum(dO * O))`` on the kept keys only, ``dq = scale dS k``,
  ``dk = scale dS^T q``. The pooled masses come from LATTE's estimate, which is piecewise
  constant in ``q`` and ``k`` (4-bit products, float32 scales): its derivative is zero
  wherever it exists, so it passes nothing. The row shift ``m_i`` cancels in ``P``.

This is the exact derivative of the forward wherever the kept sets and the quantised
estimate do not change (almost everywhere). The reference is written with array
operations (NumPy, or CuPy through ``xp``), one batch row at a time, ``O(Nq Nk)`` memory.
Masks get no gradient; gradients of broadcast inputs are summed over the broadcast dims.
"""

import numpy as np

from .._validate import sum_to_shape
from ..latte._inputs import prepare_latte
from . import naive
from .api import attention

__all__ = ["forward", "backward", "reference_backward", "TRAINABLE"]

#: Knob arrays that receive gradients (none).
TRAINABLE = ()


def forward(q, k, v, *, threshold, mode="topk", remainder="pooled", block=16, attn_mask=None,
            key_padding_mask=None, is_causal=False, scale=None, backend=None, check_finite=True):
    """:func:`mcattn.hybrid.attention` and no residuals; parameters as there."""
    out = attention(q, k, v, threshold=threshold, mode=mode, remainder=remainder, block=block,
                    attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                    scale=scale, backend=backend, check_finite=check_finite)
    return out, ()


def reference_backward(lat, dout, remainder, block):
    """``dq, dk, dv`` (float64, canonical shapes) of canonical inputs ``lat`` and ``dout [BH, Nq, dv]``."""
    from ..latte.naive import keep_rows

    inp = lat.inp
    xp = inp.xp
    f64 = np.float64
    bh = inp.q.shape[0]
    dq = xp.zeros((bh, inp.nq, inp.head_dim), dtype=f64)
    dk = xp.zeros((bh, inp.nk, inp.head_dim), dtype=f64)
    dv = xp.zeros((bh, inp.nk, inp.value_dim), dtype=f64)
    for b in range(bh):
        s, visible, bias = naive.scores(inp, b)
        keep = keep_rows(lat, b) & visible
        est = naive.estimate(lat, b, bias) if remainder == "pooled" else None
        wt = naive.weights(s, keep, visible, remainder, est=est, block=block, xp=xp)
        total = wt.sum(-1, keepdims=True)
        p = xp.where(total > 0, wt / xp.where(total > 0, total, 1.0), 0.0)
        g = dout[b].astype(f64)
        dp = g @ inp.v[b].astype(f64).T
        ds = xp.where(keep, p * (dp - (p * dp).sum(-1, keepdims=True)), 0.0)
        dv[b] = p.T @ g
        dq[b] = inp.scale * (ds @ inp.k[b].astype(f64))
        dk[b] = inp.scale * (ds.T @ inp.q[b].astype(f64))
    return dq, dk, dv


def backward(q, k, v, out, residuals, dout, *, threshold, mode="topk", remainder="pooled", block=16,
             attn_mask=None, key_padding_mask=None, is_causal=False, scale=None, backend=None,
             check_finite=True):
    """Gradients with respect to ``q``, ``k``, ``v`` (see the module docstring).

    Parameters
    ----------
    q, k, v : arrays
        The forward's inputs, ``[..., Nq, d]``, ``[..., Nk, d]``, ``[..., Nk, dv]``.
    out, residuals
        The forward's output and residuals (not used: recomputed in float64).
    dout : array, shape ``[..., Nq, dv]``
    threshold, mode, remainder, block, attn_mask, key_padding_mask, is_causal, scale
        As in the forward call. ``backend`` and ``check_finite`` are ignored (the array
        reference runs on the inputs' device).

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` in the shapes and dtypes of the inputs.
    """
    lat = prepare_latte(q, k, v, threshold=threshold, mode=mode, attn_mask=attn_mask,
                        key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                        exact_scores="float", check_finite=False, want_mass=False)
    inp = lat.inp
    xp = inp.xp
    g = xp.ascontiguousarray(xp.broadcast_to(dout, inp.out_shape).reshape(inp.q.shape[0], inp.nq, -1))
    dq, dk, dv = reference_backward(lat, g, remainder, int(block))
    batch = tuple(inp.batch_shape)
    return {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
            "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
            "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}

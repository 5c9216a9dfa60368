"""Eigen reconstruction for training: gradients through the reconstructed scores.

The forward is :func:`mcattn.eigen.attention`'s computation (:mod:`mcattn.eigen.naive`),
per batch row ``b`` (head ``h``) and query ``i``, with fixed columns ``S = S_h``:

    a_S     = scale * q_i K[S]^T                        (computed scores)
    s_i     = base_h[i] + a_S G_h,   s_i[S] = a_S       (reconstruction, then exact columns)
    s_i[E_i] = scale * q_i K[E_i]^T (+ mask)            (the per-query extra columns)
    out_i   = softmax(s_i + mask) @ V

Backward (array code, float64): ``dV = P^T dout``; ``dS = P * (dP - rowsum(dP * P))``
with ``dP = dout V^T``; the entries that were computed (``S`` and ``E_i``) pass ``dS``
straight to ``q_i`` and their keys; the reconstructed entries pass it back through the
linear map, ``da_S += dS_rec G_h^T``, and ``a_S`` to ``q`` and ``K[S]``.

Held constant: the basis and its map (``G``, ``base``: the ``basis`` / ``columns`` knobs,
``TRAINABLE = ()``), the fixed columns, and the per-query choice ``E_i`` (the largest
reconstructed scores: a step function, kept from the forward as a residual). Masked
fixed columns still inform the reconstruction, so their keys can receive gradients from
the other entries of the row. ``O(Nq Nk)`` memory per batch row.
"""

import numpy as np

from .._validate import prepare_attention, sum_to_shape
from ._inputs import check_plan_fits
from .plan import make_plan

__all__ = ["forward", "backward", "TRAINABLE", "scores"]

#: Knob arrays that receive gradients (none: the basis and columns are constants).
TRAINABLE = ()


def _prepare(q, k, v, basis, columns, rank, per_query, estimator, attn_mask, key_padding_mask,
             is_causal, scale, check_finite):
    """Canonical inputs and the plan, checked as :func:`mcattn.eigen.attention` does."""
    plan = make_plan(basis, columns, rank=rank, per_query=per_query, estimator=estimator)
    inp = prepare_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=check_finite)
    check_plan_fits(inp, plan)
    return inp, plan


def scores(inp, plan, extra=None):
    """Reconstructed, masked scores of every batch row, in float64 (array code).

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    plan : mcattn.eigen.plan.Plan
    extra : numpy.ndarray of int64, shape ``[BH, Nq, per_query]``, optional
        The per-query columns (``-1`` = none); chosen here as the reference does (largest
        reconstructed visible scores outside the fixed columns, ties to the lower index)
        when not given.

    Returns
    -------
    s : array, shape ``[BH, Nq, Nk]``
        ``-inf`` where masked.
    a_s : array, shape ``[BH, Nq, m]``
        The computed scores of the fixed columns.
    extra : numpy.ndarray of int64, shape ``[BH, Nq, per_query]``
    """
    xp = inp.xp
    f64 = np.float64
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    heads = np.arange(bh) % plan.num_heads
    cols = xp.asarray(plan.columns[heads])  # [BH, m]
    rows = xp.arange(bh)[:, None]
    q = inp.q.astype(f64) * inp.scale
    k = inp.k.astype(f64)
    k_s = k[rows, cols]  # [BH, m, d]
    a_s = xp.matmul(q, k_s.transpose(0, 2, 1))
    g = xp.asarray(plan.weights)[heads]
    base = xp.asarray(plan.base)[heads][:, :nq]  # [BH, Nq or 1, Nk]
    s = base + xp.matmul(a_s, g)
    at_cols = (rows[:, :, None], xp.arange(nq)[None, :, None], cols[:, None, :])
    s[at_cols] = a_s
    bias = None
    if inp.mask.bias is not None:
        bias = xp.broadcast_to(inp.mask.bias[xp.asarray(inp.mask.mask_index)].astype(f64), (bh, nq, nk))
        s = s + bias
    if inp.mask.is_causal:
        s = xp.where(xp.arange(nk)[None, :] <= xp.arange(nq)[:, None], s, -np.inf)
    pq = plan.per_query
    if extra is None:
        extra = np.full((bh, nq, pq), -1, np.int64)
        if pq:
            cand = s.copy()
            cand[at_cols] = -np.inf
            host = np.asarray(cand.get() if hasattr(cand, "get") else cand)
            order = np.argsort(-host, axis=-1, kind="stable")[..., :pq]  # ties: lower index
            seen = np.take_along_axis(host, order, -1) > -np.inf
            extra = np.where(seen, order, -1)
    if pq:
        live = extra >= 0
        idx = np.where(live, extra, 0)
        b_i, i_i, p_i = np.nonzero(live)
        b_i, i_i, j_i = (xp.asarray(a) for a in (b_i, i_i, idx[b_i, i_i, p_i]))
        value = (q[b_i, i_i] * k[b_i, j_i]).sum(-1)
        if bias is not None:
            value = value + bias[b_i, i_i, j_i]
        s[b_i, i_i, j_i] = value
    return s, a_s, extra


def _softmax(s, xp):
    top = s.max(axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    p = xp.exp(s - top)
    total = p.sum(axis=-1, keepdims=True)
    return xp.where(total > 0, p / xp.where(total > 0, total, 1.0), 0.0)


def forward(q, k, v, *, basis, columns, rank=None, per_query=None, estimator="conditional",
            attn_mask=None, key_padding_mask=None, is_causal=False, scale=None, backend=None,
            check_finite=True):
    """Eigen reconstruction attention and the per-query columns it chose.

    Parameters and result as :func:`mcattn.eigen.attention` (``backend`` is accepted and
    unused: the training forward is the float64 array reference, so forward and backward
    see the same scores and the same chosen columns).

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
    residuals : tuple
        ``(extra,)``: the per-query columns ``[BH, Nq, per_query]`` (int64, ``-1`` = none).
    """
    inp, plan = _prepare(q, k, v, basis, columns, rank, per_query, estimator, attn_mask,
                         key_padding_mask, is_causal, scale, check_finite)
    s, _, extra = scores(inp, plan)
    p = _softmax(s, inp.xp)
    out = inp.xp.matmul(p, inp.v.astype(np.float64)).astype(inp.dtype)
    return out.reshape(inp.out_shape), (extra,)


def backward(q, k, v, out, residuals, dout, *, basis, columns, rank=None, per_query=None,
             estimator="conditional", attn_mask=None, key_padding_mask=None, is_causal=False,
             scale=None, backend=None, check_finite=True):
    """Gradients with respect to ``q``, ``k``, ``v`` (basis, columns and chosen columns fixed).

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` in the shapes of the inputs (summed over broadcast
        dims).
    """
    inp, plan = _prepare(q, k, v, basis, columns, rank, per_query, estimator, attn_mask,
                         key_padding_mask, is_causal, scale, False)
    xp = inp.xp
    f64 = np.float64
    (extra,) = residuals
    s, _, _ = scores(inp, plan, np.asarray(extra))
    bh, nq, nk = s.shape
    p = _softmax(s, xp)
    vv = inp.v.astype(f64)
    g = xp.broadcast_to(dout, inp.out_shape).reshape(bh, nq, -1).astype(f64)
    dv = xp.matmul(p.transpose(0, 2, 1), g)
    dp = xp.matmul(g, vv.transpose(0, 2, 1))
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))

    heads = np.arange(bh) % plan.num_heads
    cols = xp.asarray(plan.columns[heads])  # [BH, m]
    rows = xp.arange(bh)[:, None]
    at_cols = (rows[:, :, None], xp.arange(nq)[None, :, None], cols[:, None, :])
    computed = xp.zeros((bh, nq, nk), bool)  # entries that were computed, not reconstructed
    computed[at_cols] = True
    ds_extra = xp.zeros_like(ds)
    if plan.per_query:
        b_i, i_i, p_i = np.nonzero(extra >= 0)
        b_i, i_i, j_i = (xp.asarray(a) for a in (b_i, i_i, extra[b_i, i_i, p_i]))
        computed[b_i, i_i, j_i] = True
        ds_extra[b_i, i_i, j_i] = ds[b_i, i_i, j_i]
    ds_rec = xp.where(computed, 0.0, ds)
    gmat = xp.asarray(plan.weights)[heads]  # [BH, m, Nk]
    da_s = xp.matmul(ds_rec, gmat.transpose(0, 2, 1)) + ds[at_cols]  # [BH, Nq, m]
    q64 = inp.q.astype(f64)
    k64 = inp.k.astype(f64)
    k_s = k64[rows, cols]
    dq = (xp.matmul(da_s, k_s) + xp.matmul(ds_extra, k64)) * inp.scale
    dk = xp.matmul(ds_extra.transpose(0, 2, 1), q64) * inp.scale
    dk[rows, cols] += xp.matmul(da_s.transpose(0, 2, 1), q64) * inp.scale  # columns distinct per row
    batch = tuple(inp.batch_shape)
    return {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
            "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
            "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}

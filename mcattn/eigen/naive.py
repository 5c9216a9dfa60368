"""Eigen reconstruction attention, the readable reference (NumPy, float64 or the input dtype).

For every batch row ``b`` (head ``h = b % H`` of the plan) and query ``i``:

1. ``a_S = scale * q_i K[S_h]^T``: the fixed computed columns (``m`` dot products);
2. ``a_hat = base_h[i] + a_S @ G_h``; ``a_hat[S_h] = a_S`` (computed columns are exact);
3. the mask (bias, causal) is added; then the ``per_query`` largest reconstructed visible
   scores outside ``S_h`` (ties: lower key index first) are computed exactly too;
4. ``out_i = softmax(a_hat) @ V``; a row with no visible key is zero.

The scores used for the reconstruction are the raw ``scale * q k`` (the mask is applied
after it), so masked fixed columns still inform the other entries; with all columns
computed the result is exact attention.
"""

import numpy as np

__all__ = ["forward", "reconstruct"]


def _row_bias(inp, b):
    """Additive bias ``[Nq or 1, Nk]`` of batch row ``b`` (None without a mask)."""
    mask = inp.mask
    if mask.bias is None:
        return None
    return mask.bias[int(mask.mask_index[b])]


def reconstruct(inp, plan, b):
    """Reconstructed, masked scores ``[Nq, Nk]`` of batch row ``b`` and the extra columns chosen.

    Returns
    -------
    scores : array ``[Nq, Nk]`` (``-inf`` where masked)
    extra : array of int64 ``[Nq, per_query]`` (``-1`` where fewer visible keys remained)
    """
    xp = inp.xp
    dt = inp.dtype.type
    h = b % plan.num_heads
    cols = plan.columns[h]
    q = inp.q[b] * dt(inp.scale)
    k = inp.k[b]
    a_s = q @ k[cols].T  # [Nq, m]
    g = xp.asarray(plan.weights[h], dtype=inp.dtype)
    base = xp.asarray(plan.base[h], dtype=inp.dtype)
    nq, nk = inp.nq, inp.nk
    if plan.positional:
        base = base[:nq]
    s = base + a_s @ g
    s[:, cols] = a_s
    bias = _row_bias(inp, b)
    if bias is not None:
        s = s + bias
    if inp.mask.is_causal:
        s = xp.where(xp.arange(nk)[None, :] <= xp.arange(nq)[:, None], s, dt(-np.inf))
    extra = np.full((nq, plan.per_query), -1, dtype=np.int64)
    if plan.per_query:
        cand = s.copy()
        cand[:, cols] = dt(-np.inf)
        host = cand.get() if hasattr(cand, "get") else np.asarray(cand)
        order = np.lexsort((np.broadcast_to(np.arange(nk), host.shape), -host), axis=-1)
        for i in range(nq):
            chosen = [j for j in order[i, : plan.per_query] if host[i, j] > -np.inf]
            if chosen:
                idx = np.asarray(chosen)
                extra_bias = 0 if bias is None else bias[i if bias.shape[0] > 1 else 0, idx]
                s[i, idx] = q[i] @ k[idx].T + extra_bias
                extra[i, : len(idx)] = idx
    return s, extra


def forward(inp, plan):
    """Eigen reconstruction attention of canonical inputs.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]`` and the mask.
    plan : mcattn.eigen.plan.Plan

    Returns
    -------
    array ``[BH, Nq, dv]``
    """
    xp = inp.xp
    dt = inp.dtype.type
    out = xp.zeros((inp.q.shape[0], inp.nq, inp.value_dim), dtype=inp.dtype)
    for b in range(inp.q.shape[0]):
        s, _ = reconstruct(inp, plan, b)
        top = s.max(axis=-1, keepdims=True)
        top = xp.where(xp.isfinite(top), top, dt(0))
        p = xp.exp(s - top)
        total = p.sum(axis=-1, keepdims=True)
        p = xp.where(total > 0, p / xp.where(total > 0, total, dt(1)), dt(0))
        out[b] = p @ inp.v[b]
    return out

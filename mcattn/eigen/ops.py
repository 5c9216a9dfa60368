"""Operation counts of eigen reconstruction."""

import numpy as np

from ..cost import OpCounts

__all__ = ["eigen_ops"]


def _fixed_visible(inp, plan):
    """Host ``[BH, Nq]``: visible keys per row, and visible fixed columns per row."""
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    vis = np.ones((1, nq, nk), dtype=bool)
    if inp.mask.bias is not None:
        from .._array import host_copy

        vis = np.broadcast_to(host_copy(inp.mask.bias) > -np.inf, (inp.mask.bias.shape[0], nq, nk))
    if inp.mask.is_causal:
        vis = vis & (np.arange(nk)[None, :] <= np.arange(nq)[:, None])[None]
    index = inp.mask.mask_index if inp.mask.bias is not None else np.zeros(bh, np.int64)
    heads = np.arange(bh) % plan.num_heads
    visible = np.empty((bh, nq), np.int64)
    fixed = np.empty((bh, nq), np.int64)
    for b in range(bh):
        v = vis[index[b]]
        visible[b] = v.sum(-1)
        fixed[b] = v[:, plan.columns[heads[b]]].sum(-1)
    return visible, fixed


def eigen_ops(inp, plan):
    """Operations of one call, from what the kernels do; also the MAC figures of :class:`EigenInfo`.

    Per query row: ``d`` multiplies to scale ``q``; ``m d`` multiply-adds for the fixed
    columns; ``m n`` for the reconstruction plus ``n`` adds of the mean; with
    ``per_query``, about ``3 n`` compares to pick the largest (an ``O(n)`` partition,
    about ``2 n`` expected, and a pass) and ``d`` multiply-adds per chosen column; then,
    per visible key, the softmax (compare, subtract, exp, add) and ``dv`` multiply-adds;
    a divide and ``dv`` multiplies per row with a visible key.

    Returns
    -------
    (OpCounts, dict)
        The counts and ``partial_score_macs``, ``reconstruction_macs``, ``dense_score_macs``.
    """
    bh, nq, nk, d, dv = inp.q.shape[0], inp.nq, inp.nk, inp.head_dim, inp.value_dim
    m = plan.num_fixed
    visible, fixed = _fixed_visible(inp, plan)
    chosen = int(np.minimum(plan.per_query, visible - fixed).sum())
    rows = bh * nq
    pairs = int(visible.sum())
    live = int(np.count_nonzero(visible))
    partial = rows * m * d + chosen * d
    recon = rows * m * nk
    counts = {
        "fp32_mul": rows * d + partial + recon + pairs * dv + live * dv,
        "fp32_add": partial + recon + rows * nk + pairs * (dv + 2)
                    + (rows * nk if inp.mask.bias is not None else 0),
        "fp32_cmp": pairs + (3 * rows * nk if plan.per_query else 0),
        "fp32_exp": pairs,
        "fp32_div": live,
    }
    figures = {"partial_score_macs": partial, "reconstruction_macs": recon,
               "dense_score_macs": rows * nk * d}
    return OpCounts(counts), figures

"""Eigen reconstruction's certified a-posteriori bound, per query row.

A reconstructed score is a dot product with a reconstructed key:
``a_hat_ij = base_ij + scale q_i . k~_j`` with ``k~_j = sum_c G[c, j] k_{S_c}``, so the
true score differs from it by ``scale q_i . (k_j - k~_j) - base_ij``, which
:func:`mcattn.posterior.dot_intervals` bounds for every pair (the mean difference and a few
principal directions exactly, Cauchy-Schwarz on the rest); computed columns (the fixed
ones and each query's extra ones) are exact. The output then moves by at most
:func:`mcattn.posterior.reweighting_bound` of those score intervals, plus the distance of
the kernel's output from the float64 output of the same scores (docs/bounds.md).

Computed on the host in float64 from the call's inputs and plan: the reconstruction is
repeated (dense ``[Nq, Nk]``), so its cost is measured in ``benchmarks/posterior_table.py``.
"""

import numpy as np

from .._array import host_copy
from ..posterior import (
    HostInputs,
    dot_intervals,
    from_rows,
    reweighting_bound,
    softmax_rows,
    value_spread,
    widen,
)
from . import naive

__all__ = ["row_bound", "attention_bound", "default_rank"]


def default_rank(head_dim):
    """Principal directions computed exactly: half the head dim (at least 8).

    The reconstruction's errors ``k_j - k~_j`` are low-rank, so exact directions pay:
    on the embedded sample (16 columns; layers 0 / 2 / 5) the median bound / error was
    154 / 231 / 28 at rank 4, 55 / 51 / 12 at 8, 12 / 10 / 5.2 at 16 and 4.3 / 4.2 / 3.2 at 24
    of ``d = 32`` (``python benchmarks/posterior_table.py --eigen-ranks``); each direction
    costs ``N^2`` multiply-adds per batch row.
    """
    return max(8, int(head_dim) // 2)


def _batch_row(h, plan, b, extra, out_b, rank):
    head = b % plan.num_heads
    cols = np.asarray(plan.columns[head])
    g = np.asarray(plan.weights[head], dtype=np.float64)  # [m, Nk]
    base = np.asarray(plan.base[head], dtype=np.float64)
    base = base[: h.nq] if plan.positional else np.broadcast_to(base, (h.nq, h.nk))
    q = h.scale * h.q[b]
    k = h.k[b]
    recon = k - g.T @ k[cols]  # k_j - k~_j, [Nk, d]
    a_s = q @ k[cols].T
    s = base + a_s @ g
    s[:, cols] = a_s
    computed = np.zeros((h.nq, h.nk), dtype=bool)
    computed[:, cols] = True
    rows = np.nonzero((extra >= 0).any(-1))[0]
    for i in rows:
        idx = extra[i][extra[i] >= 0]
        s[i, idx] = q[i] @ k[idx].T
        computed[i, idx] = True
    bias, visible = h.row_bias(b)
    s = np.where(visible, s + bias, -np.inf)
    centre, width = dot_intervals(q, recon, rank=rank)
    dlo = np.where(computed, 0.0, centre - base - width)
    dhi = np.where(computed, 0.0, centre - base + width)
    p = softmax_rows(s)
    spread = value_spread(h.v[b], visible.any(axis=0))
    bound = reweighting_bound(p, dlo, dhi, spread)
    bound = bound + np.linalg.norm(np.asarray(out_b, dtype=np.float64) - p @ h.v[b], axis=-1)
    return np.where(visible.any(-1), widen(bound, np.linalg.norm(h.v[b], axis=-1).max(initial=0.0)), 0.0)


def row_bound(inp, plan, out, rank=None):
    """Certified bound on ``||out_i - o_i||`` per query row of one eigen call.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        The call's canonical inputs ``q [BH, Nq, d]``, ``k``, ``v`` and mask.
    plan : mcattn.eigen.plan.Plan
    out : array, shape ``[BH, Nq, dv]``
    rank : int, optional
        Principal directions of the reconstruction errors computed exactly (default
        :func:`default_rank`): more is tighter and costs more.

    Returns
    -------
    numpy.ndarray of float64, shape ``[BH, Nq]``
    """
    h = HostInputs(inp)
    out = np.asarray(host_copy(out), dtype=np.float64)
    rows = np.zeros((h.q.shape[0], h.nq))
    rank = default_rank(h.q.shape[-1]) if rank is None else int(rank)
    for b in range(h.q.shape[0]):
        _, extra = naive.reconstruct(inp, plan, b)  # the extra columns the kernels choose
        rows[b] = _batch_row(h, plan, b, np.asarray(host_copy(extra)), out[b], rank)
    return rows


def attention_bound(inp, plan, out):
    """:class:`mcattn.posterior.PosteriorBound` of one call (output ``[..., Nq, dv]``)."""
    flat = np.asarray(host_copy(out)).reshape(inp.q.shape[0], inp.nq, -1)
    rows = row_bound(inp, plan, flat)
    return from_rows(rows.reshape(tuple(inp.batch_shape) + (inp.nq,)), np.asarray(host_copy(out)),
                     certified=True)

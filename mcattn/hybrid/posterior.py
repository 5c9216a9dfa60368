"""Hybrid attention's certified a-posteriori bound, per query row (docs/bounds.md).

The hybrid output is a softmax over *surrogate* scores ``t``: a kept key's exact score
``s~_j``, and for a dropped key of block ``B`` with ``|D_B|`` dropped keys the log of its
pooled weight, ``t_j = log(sum_{l in D_B} exp(est_l) / |D_B|)`` (:mod:`mcattn.hybrid.naive`:
the block's estimated mass shared evenly). The true output is the softmax of the true
scores ``s``. So the error is a *reweighting*: with ``lo_j <= s_j <= hi_j`` the certified
score intervals of :func:`mcattn.latte.posterior.score_intervals` (around the MS4B estimate)
and, on the kept keys, the rounding bounds of the exact scores, every key's offset
``s_j - t_j`` lies in a known interval, and :func:`mcattn.posterior.reweighting_bound`
turns those intervals into a bound on ``||softmax(t) V - softmax(s) V||``.

With ``remainder="none"`` the dropped keys have no surrogate weight: their true mass is at
most ``mu = U / (Z_lo + U)`` (``U = sum_D exp(hi_j)``, ``Z_lo`` the kept keys' smallest
mass), and moving it moves the output by at most ``mu (max_D rho_j + ||c - o~|| + e_K)``
(``rho`` the values' distances to their centre ``c``), as in LATTE's bound.

Per row: ``||out - o~64|| + e + mu (...)``, with ``o~64`` the float64 recomputation of the
hybrid output (the kernel's own rounding is measured, not bounded). Computed on the host in
float64, one batch row at a time, dense ``[Nq, Nk]``: its cost is in
``benchmarks/posterior_table.py``.
"""

import numpy as np

from .._array import host_copy
from ..latte import naive as latte_naive
from ..latte.posterior import _Host, _kept_scores, score_intervals
from ..posterior import from_rows, reweighting_bound, value_spread, widen
from . import naive

__all__ = ["surrogate_scores", "row_bound", "attention_bound"]


def surrogate_scores(est, drop, block):
    """``t [Nq, Nk]``: the log of each dropped key's pooled weight (``-inf`` off ``drop``).

    Parameters
    ----------
    est : numpy.ndarray ``[Nq, Nk]``
        The estimate in logit units (mask added).
    drop : numpy.ndarray of bool ``[Nq, Nk]``
    block : int

    Notes
    -----
    ``log sum exp`` per block with the block's own maximum, so no weight underflows.
    """
    nq, nk = est.shape
    t = np.full((nq, nk), -np.inf)
    for j0 in range(0, nk, block):
        sl = slice(j0, min(j0 + block, nk))
        e = np.where(drop[:, sl], est[:, sl], -np.inf)
        top = e.max(-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            lse = top + np.log(np.exp(e - top).sum(-1, keepdims=True))
            share = lse - np.log(np.maximum(drop[:, sl].sum(-1, keepdims=True), 1))
        t[:, sl] = np.where(drop[:, sl], share, -np.inf)
    return t


def _batch_row(h, b, keep, out_b, remainder, block):
    lat = h.lat
    bias, visible = h.row_bias(b)
    keep = keep & visible
    drop = visible & ~keep
    lo, hi = score_intervals(h, b, bias)
    s_t, dlo, dhi = _kept_scores(h, b, keep, bias, "float", lo, hi)
    pooled = remainder == "pooled"
    if pooled:
        est = np.asarray(host_copy(naive.estimate(lat, b, None)), dtype=np.float64) + bias
        t = np.where(drop, surrogate_scores(est, drop, block), s_t)
        dlo = np.where(drop, lo - np.where(drop, t, 0.0), dlo)
        dhi = np.where(drop, hi - np.where(drop, t, 0.0), dhi)
        used = visible
    else:
        t = s_t
        used = keep
    top = np.where(used, t, -np.inf).max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(used, np.exp(np.where(used, t, 0.0) - top), 0.0)
    total = e.sum(-1, keepdims=True)
    p = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    spread = value_spread(h.v[b], visible.any(axis=0))
    o64 = p @ h.v[b]
    e_used = reweighting_bound(p, dlo, dhi, spread)
    bound = np.linalg.norm(np.asarray(out_b, dtype=np.float64) - o64, axis=-1) + e_used
    unused = visible & ~used
    if unused.any():  # remainder "none": the dropped keys' true mass moves the output
        z_lo = np.where(used, np.exp(np.where(used, t + dlo, 0.0) - top), 0.0).sum(-1)
        upper = np.where(unused, np.exp(np.where(unused, hi, 0.0) - top), 0.0).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.minimum(np.where(upper > 0, upper / (z_lo + upper), 0.0), 1.0)
        far = np.where(unused, spread.rho[None, :], 0.0).max(-1)
        gap = np.linalg.norm(spread.centre[None, :] - o64, axis=-1)
        bound = bound + mu * (far + gap + e_used)
    scale = np.linalg.norm(h.v[b], axis=-1).max(initial=0.0)
    return np.where(visible.any(-1), widen(bound, scale), 0.0)


def row_bound(lat, out, remainder, block):
    """Certified bound on ``||out_i - o_i||`` per query row of one hybrid call.

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
        The call's canonical inputs (float exact scores).
    out : array ``[BH, Nq, dv]``
        The call's output.
    remainder : {"pooled", "none"}
    block : int

    Returns
    -------
    numpy.ndarray of float64 ``[BH, Nq]``
    """
    h = _Host(lat)
    out = np.asarray(host_copy(out), dtype=np.float64)
    rows = np.zeros((h.q.shape[0], h.nq))
    for b in range(h.q.shape[0]):
        keep = np.asarray(host_copy(latte_naive.keep_rows(lat, b)), dtype=bool)
        rows[b] = _batch_row(h, b, keep, out[b], remainder, int(block))
    return rows


def attention_bound(lat, out, remainder, block):
    """:class:`mcattn.posterior.PosteriorBound` of one call (output ``[..., Nq, dv]``)."""
    inp = lat.inp
    host = np.asarray(host_copy(out))
    rows = row_bound(lat, host.reshape(inp.q.shape[0], inp.nq, -1), remainder, block)
    return from_rows(rows.reshape(tuple(inp.batch_shape) + (inp.nq,)), host, certified=True)

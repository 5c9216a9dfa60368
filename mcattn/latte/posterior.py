"""LATTE's certified a-posteriori bound: per query row, from score intervals for every key.

For one query row with kept keys ``K`` and dropped keys ``D`` (docs/bounds.md derives it):

* Every visible key's true score ``s_j = scale q.k_j + bias_j`` lies in ``[lo_j, hi_j]``,
  around the MS4B estimate: ``q.k_j - qh.kh_j = q.(k_j - kh_j) + (q - qh).kh_j`` with
  ``qh = 16 s_q hi(q8)`` (and ``kh`` likewise) the estimate's operands; both terms come
  from :func:`mcattn.posterior.dot_intervals` (a mean, a few principal directions exactly,
  Cauchy-Schwarz on the rest), intersected with the elementwise nibble bound of
  :func:`mcattn.latte.bounds.estimate_error_bound` in the ``safe`` mode (which computes it).
* A kept key's score ``s~_j`` (int8 ``q8.k8`` or float) is off by at most ``eta_j``:
  the int8 rounding ``scale s_q s_k ((|q8|_1 + |k8|_1) / 2 + d / 4)``, or float rounding.
* The output over the kept keys moves by at most :func:`mcattn.posterior.reweighting_bound`
  when the kept scores move within ``eta`` (``e_K``); the dropped keys' weights are at most
  ``u_j = exp(hi_j) / (sum_K exp(s~_j - eta_j) + sum_D exp(lo_j))`` and their mass at most
  ``m = U / (Z_lo + U)``. With ``c`` the values' centre,
  ``||o~ - o|| <= ||out - o~64|| + e_K + spread(u) + m (||c - o~|| + e_K)``.

It is computed on the host in float64, one batch row at a time, from the call's quantised
inputs: the estimate, the kept sets and the kept probabilities are recomputed (dense
``[Nq, Nk]`` products), so its cost is measured in ``benchmarks/posterior_table.py``.
"""

import numpy as np

from .._array import host_copy
from ..posterior import (
    HostInputs,
    dot_intervals,
    from_rows,
    reweighting_bound,
    spread_sum,
    value_spread,
    widen,
)
from . import naive

__all__ = ["row_bound", "score_intervals", "attention_bound"]


class _Host(HostInputs):
    """The host (NumPy) view of :class:`LatteInputs` the bound reads."""

    def __init__(self, lat):
        super().__init__(lat.inp)
        self.lat = lat
        self.q8 = np.asarray(host_copy(lat.q8))
        self.k8 = np.asarray(host_copy(lat.k8))
        self.s_q = np.asarray(host_copy(lat.s_q), dtype=np.float64)
        self.s_k = np.asarray(host_copy(lat.s_k), dtype=np.float64)


def _operands(h, b):
    """The estimate's operands ``qh, kh`` (float64, exact) of batch row ``b``."""
    hq, _ = naive.nibbles(h.q8[b])
    hk, _ = naive.nibbles(h.k8[b])
    return 16.0 * h.s_q[b][:, None] * hq, 16.0 * h.s_k[b][:, None] * hk


def score_intervals(h, b, bias, safe_units=None, rank=8):
    """``lo, hi [Nq, Nk]``: certified intervals for the true scores of batch row ``b``.

    Parameters
    ----------
    h : _Host
    b : int
    bias : numpy.ndarray ``[Nq, Nk]``
        The additive mask (0 where none; invisible keys are the caller's business).
    safe_units : numpy.ndarray ``[Nq, Nk]``, optional
        The nibble bound in units of ``s_q s_k`` (:func:`naive.safe_error_units`), when the
        call computed it (``mode="safe"``): the intervals are intersected with it.
    rank : int
        Principal directions computed exactly by :func:`mcattn.posterior.dot_intervals`.
    """
    q, k = h.q[b], h.k[b]
    qh, kh = _operands(h, b)
    est = qh @ kh.T  # the estimate / scale, exact up to float64 rounding of small integers
    c1, w1 = dot_intervals(q, k - kh, rank=rank)  # q . (k - kh)
    c2, w2 = dot_intervals(kh, q - qh, rank=rank)  # kh . (q - qh), as [Nk, Nq]
    centre = h.scale * (est + c1 + c2.T) + bias
    width = h.scale * (w1 + w2.T)
    lo, hi = centre - width, centre + width
    if safe_units is not None:
        eps = safe_units * (h.scale * h.s_q[b][:, None] * h.s_k[b][None, :])
        lo = np.maximum(lo, h.scale * est + bias - eps)
        hi = np.minimum(hi, h.scale * est + bias + eps)
    return lo, hi


def _kept_scores(h, b, keep, bias, exact_scores, lo, hi):
    """The kept scores ``s~`` the kernels use (``-inf`` elsewhere) and bounds ``[dlo, dhi]``
    on the true scores' offsets ``s - s~`` (0 off the kept set).

    int8: ``q.k - s_q s_k q8.k8 = q.(k - s_k k8) + (q - s_q q8).(s_k k8)``, each term from
    :func:`mcattn.posterior.dot_intervals`, its width capped by the elementwise rounding
    bound ``s_q s_k ((|q8|_1 + |k8|_1) / 2 + d / 4)``; float: the products' rounding.
    Both are intersected with the score interval ``[lo, hi]``.
    """
    d = h.q.shape[-1]
    if exact_scores == "float":
        s = h.scale * (h.q[b] @ h.k[b].T)
        # float32 (or float64) dot products of length d: |fl(q.k) - q.k| <= d u |q|.|k|
        unit = 2.0 ** -24 if h.lat.inp.dtype == np.float32 else 2.0 ** -53
        eta = (d + 2) * unit * h.scale * (np.abs(h.q[b]) @ np.abs(h.k[b]).T) * 1.01
        dlo, dhi = -eta, eta
    else:
        q8 = h.q8[b].astype(np.float64)
        k8 = h.k8[b].astype(np.float64)
        dots = naive._integer_dots(h.q8[b], h.k8[b])
        c = h.scale * h.s_q[b]
        s = c[:, None] * h.s_k[b][None, :] * dots
        qh, kh = h.s_q[b][:, None] * q8, h.s_k[b][:, None] * k8
        c1, w1 = dot_intervals(h.q[b], h.k[b] - kh)
        c2, w2 = dot_intervals(kh, h.q[b] - qh)
        centre = h.scale * (c1 + c2.T)
        l1q, l1k = np.abs(q8).sum(-1), np.abs(k8).sum(-1)
        rounding = c[:, None] * h.s_k[b][None, :] * ((2 * (l1q[:, None] + l1k[None, :]) + d) / 4.0)
        width = np.minimum(h.scale * (w1 + w2.T), rounding)
        # and the float rounding of the kernels' own products (float32 scales and sums)
        width = width + 2.0 ** -20 * np.abs(s)
        dlo, dhi = centre - width, centre + width
    s = s + bias
    with np.errstate(invalid="ignore"):
        dlo = np.maximum(dlo, lo - s)
        dhi = np.maximum(np.minimum(dhi, hi - s), dlo)
    return np.where(keep, s, -np.inf), np.where(keep, dlo, 0.0), np.where(keep, dhi, 0.0)


def _batch_row(h, b, keep, out_b, exact_scores, safe_units):
    bias, visible = h.row_bias(b)
    keep = keep & visible
    drop = visible & ~keep
    lo, hi = score_intervals(h, b, bias, safe_units)
    s_t, dlo, dhi = _kept_scores(h, b, keep, bias, exact_scores, lo, hi)
    top = np.where(keep, s_t, -np.inf).max(-1, keepdims=True)
    top = np.maximum(top, np.where(drop, hi, -np.inf).max(-1, keepdims=True))
    top = np.where(np.isfinite(top), top, 0.0)
    e_kept = np.where(keep, np.exp(s_t - top), 0.0)
    total = e_kept.sum(-1, keepdims=True)
    p = np.where(total > 0, e_kept / np.where(total > 0, total, 1.0), 0.0)
    spread = value_spread(h.v[b], visible.any(axis=0))
    o64 = p @ h.v[b]
    e_k = reweighting_bound(p, dlo, dhi, spread)
    z_lo = np.where(keep, np.exp(s_t + dlo - top), 0.0).sum(-1)
    up = np.where(drop, np.exp(hi - top), 0.0)
    upper_mass = up.sum(-1)
    lower_mass = np.where(drop, np.exp(lo - top), 0.0).sum(-1)
    den = z_lo + lower_mass
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(den[:, None] > 0, up / np.where(den > 0, den, 1.0)[:, None], 0.0)
        mass = np.where(upper_mass > 0, upper_mass / (z_lo + upper_mass), 0.0)
    mass = np.minimum(mass, 1.0)
    centre_gap = np.linalg.norm(spread.centre[None, :] - o64, axis=-1)
    dropped = np.minimum(spread_sum(weights, spread), mass * spread.rho.max(initial=0.0))
    bound = np.linalg.norm(np.asarray(out_b, dtype=np.float64) - o64, axis=-1)
    bound = bound + e_k + dropped + mass * (centre_gap + e_k)
    return np.where(visible.any(-1), widen(bound, np.linalg.norm(h.v[b], axis=-1).max(initial=0.0)), 0.0)


def row_bound(lat, out, keep=None):
    """Certified bound on ``||out_i - o_i||`` per query row of one LATTE call.

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
    out : array, shape ``[BH, Nq, dv]``
        The call's output.
    keep : array of bool ``[BH, Nq, Nk]``, optional
        The kept sets; recomputed (:func:`naive.keep_rows`) when None.

    Returns
    -------
    numpy.ndarray of float64, shape ``[BH, Nq]``
    """
    h = _Host(lat)
    out = np.asarray(host_copy(out), dtype=np.float64)
    bh = h.q.shape[0]
    rows = np.zeros((bh, h.nq))
    for b in range(bh):
        kb = np.asarray(host_copy(naive.keep_rows(lat, b) if keep is None else keep[b]), dtype=bool)
        safe = naive.safe_error_units(h.q8[b], h.k8[b]) if lat.mode == "safe" else None
        rows[b] = _batch_row(h, b, kb, out[b], lat.exact_scores, safe)
    return rows


def attention_bound(lat, out):
    """:class:`mcattn.posterior.PosteriorBound` of one call (output ``[..., Nq, dv]``)."""
    inp = lat.inp
    flat = np.asarray(host_copy(out)).reshape(inp.q.shape[0], inp.nq, -1)
    rows = row_bound(lat, flat)
    return from_rows(rows.reshape(tuple(inp.batch_shape) + (inp.nq,)), np.asarray(host_copy(out)),
                     certified=True)

"""Hybrid sparse + low-rank attention, the readable reference (NumPy, float64, dense).

For one batch row (query ``i``, key ``j``; ``s`` the exact scores ``scale q k^T`` plus the
mask, ``est`` LATTE's 4-bit estimate, ``K_i`` the kept set LATTE's rule picks from ``est``,
``D_i`` the visible keys it drops, ``m_i = max_{j in K_i} s_ij``):

``w_ij = exp(s_ij - m_i)`` on ``K_i`` (exact), ``r_ij`` on ``D_i`` (the remainder), 0 elsewhere;
``out_i = sum_j (w_ij + r_ij) v_j / sum_j (w_ij + r_ij)``.

Remainders ``r`` (:data:`REMAINDERS`):

* ``"none"``: 0 (LATTE itself);
* ``"pooled"``: the dropped keys of each key block ``B`` (``block`` keys) share the block's
  estimated dropped mass ``M_iB = sum_{j in D_i, j in B} exp(est_ij - m_i)`` evenly, so the
  block adds ``M_iB`` times the mean value of its dropped keys. The fast form keeps one value
  sum per block (once per call) and subtracts the kept keys: ``O(N/b dv)`` per row on top of
  the estimate LATTE computes anyway;
* ``"rfa"``: positive random features (Performer), ``r_ij = phi(q_i) . phi(k_j) e^{-m_i}``,
  an unbiased estimate of ``exp(s_ij - m_i)``. The fast form is Scatterbrain's: the feature
  sums over all keys minus those over the kept keys (``O(F dv)`` per row plus ``O(F)`` per
  kept key);
* ``"eigen"`` (measurement only, :mod:`benchmarks.hybrid_heldout`): ``r_ij = exp(min(rec_ij,
  m_i) - m_i)`` with ``rec`` eigen's reconstruction from a fitted plan's fixed columns.

Everything is written as dense ``[Nq, Nk]`` weight matrices: it is the definition the fast
kernels are tested against, not a fast path.
"""

import numpy as np

__all__ = ["REMAINDERS", "weights", "output", "positive_features", "pooled_weights", "scores",
           "estimate", "forward"]

#: The remainders the public method offers (``"rfa"`` and ``"eigen"``: the benchmark only).
REMAINDERS = ("pooled", "none")


def positive_features(x, omega, scale):
    """Log of the positive random features ``phi(x) = exp(w.x' - |x'|^2 / 2) / sqrt(F)``.

    Parameters
    ----------
    x : array ``[N, d]``
    omega : array ``[F, d]``
        Standard normal draws.
    scale : float
        The attention scale; ``x' = sqrt(scale) x`` so that ``E phi(q).phi(k) = exp(scale q.k)``.

    Returns
    -------
    array ``[N, F]``, float64: ``log phi(x)`` (kept in logs so that the row shift is exact).
    """
    xs = np.sqrt(scale) * np.asarray(x, dtype=np.float64)
    return xs @ np.asarray(omega, np.float64).T - 0.5 * (xs * xs).sum(-1, keepdims=True) \
        - 0.5 * np.log(omega.shape[0])


def pooled_weights(est, drop, top, block, xp=np):
    """The pooled remainder ``r [Nq, Nk]``: each block's estimated dropped mass spread evenly.

    Parameters
    ----------
    est : array ``[Nq, Nk]``
        The estimate in logit units (mask added).
    drop : array of bool ``[Nq, Nk]``
        Visible keys not kept.
    top : array ``[Nq, 1]``
        ``m_i``, the largest kept exact score.
    block : int
        Keys per block (the last block may be shorter).
    """
    nq, nk = est.shape
    e = xp.where(drop, xp.exp(xp.where(drop, est, 0.0) - top), 0.0)
    r = xp.zeros_like(e)
    for j0 in range(0, nk, block):
        sl = slice(j0, min(j0 + block, nk))
        mass = e[:, sl].sum(-1, keepdims=True)
        count = drop[:, sl].sum(-1, keepdims=True)
        r[:, sl] = xp.where(drop[:, sl], mass / xp.maximum(count, 1), 0.0)
    return r


def weights(s, keep, visible, remainder, *, est=None, block=16, log_phi_q=None, log_phi_k=None,
            rec=None, xp=np):
    """Unnormalised weights ``w + r`` ``[Nq, Nk]`` of one batch row (float64).

    Parameters
    ----------
    s : array ``[Nq, Nk]``
        Exact scores (mask added; any value where not visible).
    keep, visible : arrays of bool ``[Nq, Nk]``
        The kept set (a subset of ``visible``) and the visible keys.
    remainder : {"none", "pooled", "rfa", "eigen"}
    est : array ``[Nq, Nk]``, for ``"pooled"``
    block : int, for ``"pooled"``
    log_phi_q, log_phi_k : arrays ``[Nq, F]``, ``[Nk, F]``, for ``"rfa"``
        :func:`positive_features` of ``q`` and ``k``.
    rec : array ``[Nq, Nk]``, for ``"eigen"``
        Reconstructed scores (mask added).
    """
    s = s.astype(np.float64)
    top = xp.where(keep, s, -np.inf).max(-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)  # rows that keep nothing (no visible key)
    w = xp.where(keep, xp.exp(xp.where(keep, s, 0.0) - top), 0.0)
    drop = visible & ~keep
    if remainder == "none":
        return w
    if remainder == "pooled":
        return w + pooled_weights(est, drop, top, int(block), xp)
    if remainder == "rfa":
        a = log_phi_q - top  # [Nq, F]
        # phi(q).phi(k) e^{-m} with one shift per feature so that exp stays in range
        shift = log_phi_k.max(0, keepdims=True)
        kern = xp.exp(a + shift) @ xp.exp(log_phi_k - shift).T
        return w + xp.where(drop, kern, 0.0)
    if remainder == "eigen":
        r = xp.exp(xp.minimum(xp.where(drop, rec, 0.0), top) - top)
        return w + xp.where(drop, r, 0.0)
    raise ValueError(f"remainder must be none, pooled, rfa or eigen; got {remainder!r}")


def output(wt, v, xp=np):
    """``wt @ v / wt.sum(-1)`` (rows of zero weight give zeros); float64 ``[Nq, dv]``."""
    total = wt.sum(-1, keepdims=True)
    return xp.where(total > 0, (wt @ v.astype(np.float64)) / xp.where(total > 0, total, 1.0), 0.0)


# ------------------------------------------------------------------ canonical inputs


def scores(inp, b):
    """Exact scores ``scale q k^T + bias`` (float64 ``[Nq, Nk]``) and the visible keys (bool)."""
    xp = inp.xp
    nq, nk = inp.nq, inp.nk
    s = inp.scale * (inp.q[b].astype(np.float64) @ inp.k[b].astype(np.float64).T)
    visible = xp.ones((nq, nk), dtype=bool)
    bias = None
    if inp.mask.bias is not None:
        bias = xp.broadcast_to(inp.mask.bias[int(inp.mask.mask_index[b])].astype(np.float64), (nq, nk))
        visible &= bias > -np.inf
        bias = xp.where(visible, bias, 0.0)
        s = s + bias
    if inp.mask.is_causal:
        visible &= xp.arange(nk)[None, :] <= xp.arange(nq)[:, None]
    return s, visible, bias


def estimate(lat, b, bias):
    """LATTE's estimate of batch row ``b`` in logit units, ``c u`` (+ the bias): ``[Nq, Nk]``."""
    from ..latte.naive import estimate_units

    u, c = estimate_units(lat, b)
    est = c[:, None] * u
    return est if bias is None else est + bias


def forward(lat, remainder, block):
    """Hybrid attention of canonical LATTE inputs (exact float kept scores).

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
    remainder : {"none", "pooled"}
    block : int
        Keys per block of the pooled remainder.

    Returns
    -------
    out : array ``[BH, Nq, dv]`` (compute dtype)
    kept : array of int64 ``[BH, Nq]``
    remainder_share : array of float64 ``[BH, Nq]``
        The remainder's share of each row's weight, ``sum r / sum (w + r)``.
    """
    from ..latte.naive import keep_rows

    inp = lat.inp
    xp = inp.xp
    bh = inp.q.shape[0]
    out = xp.zeros((bh, inp.nq, inp.value_dim), dtype=inp.dtype)
    kept = xp.zeros((bh, inp.nq), dtype=np.int64)
    share = xp.zeros((bh, inp.nq), dtype=np.float64)
    for b in range(bh):
        keep = keep_rows(lat, b)
        s, visible, bias = scores(inp, b)
        keep &= visible
        est = estimate(lat, b, bias) if remainder == "pooled" else None
        wt = weights(s, keep, visible, remainder, est=est, block=block, xp=xp)
        out[b] = output(wt, inp.v[b], xp).astype(inp.dtype)
        kept[b] = keep.sum(-1)
        total = wt.sum(-1)
        share[b] = xp.where(total > 0, xp.where(keep, 0.0, wt).sum(-1) / xp.where(total > 0, total, 1), 0)
    return out, kept, share

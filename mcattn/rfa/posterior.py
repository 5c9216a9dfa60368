"""RFA's a-posteriori bound: per query row, at confidence ``1 - delta``, from the call's features.

Non-causal RFA is a ratio of two averages over the ``D`` random projections ``t``: with
query features ``a_if``, key-side sums ``S_f = sum_j w_j f_j(k) v_j`` and ``z_f = sum_j w_j f_j(k)``,
``o~_i = sum_t X_t / sum_t Y_t``, ``X_t = sum_{f in t} a_if S_f``, ``Y_t = sum_{f in t} a_if z_f``
(``f in t``: the features of projection ``t``; one for ``positive``, the sine and the cosine for
``sincos``). The projections are drawn independently (orthogonal blocks are taken as
independent: their negative correlation only shrinks the variance), so by the delta method
``o~_i - o_i ~ (1 / sum_t Y_t) sum_t (X_t - o_i Y_t)``, a sum of ``D`` centred terms whose
variance is estimated from the call's own terms ``g_t = X_t - o~_i Y_t`` (which sum to 0):
``s_i^2 = D / (D - 1) sum_t ||g_t||^2 / (sum_t Y_t)^2``. The bound is ``z_delta s_i``
(:func:`mcattn.posterior.gaussian_factor`). Assumptions, stated in docs/bounds.md: the
delta method (first order in ``1 / sqrt(D)``) and a Gaussian row error; rows whose
denominator was floored get ``inf``.

``sum_t ||g_t||^2`` needs, per row, ``a^2`` against the per-feature ``||S_f||^2``, ``z_f S_f``
and ``z_f^2`` (and the sine-cosine cross terms): the cost of one more read-out.
Measured on MiniLM's attention (docs/bounds.md), the delta method holds for ``sincos``
features but not for ``positive`` ones: their per-projection terms are heavy-tailed (the
relative variance of one term is ``exp(|q' + k'|^2) - 1``), and the sample variance of
``D <= 256`` terms misses the rare large ones (coverage 30-70 % of rows at ``delta = 0.05``).

So the bound ``info.posterior`` reports depends on the feature map:

* ``positive`` and ``arccos`` (non-negative weights): the output is a convex combination
  of the values, and so is exact attention; certified, for every call form (causal, gated):
  ``||o~_i - o_i|| <= max_j ||v_j - c|| + ||o~_i - c||`` (:func:`hull_bound`, ``c`` the mean
  visible value). It is coarse by nature: about 5-9x the realised error on MiniLM, where
  rfa's error is itself a large fraction of the values' spread.
* ``sincos``: the delta-method bound (:func:`row_bound`), for the drop-in estimator
  (``normalize=None``) without causal masking or a gate; other ``sincos`` calls get None.

Rows whose denominator was floored get ``inf`` in both.
"""

import numpy as np

from .._array import host_copy
from ..posterior import from_rows, gaussian_factor, widen
from . import naive

__all__ = ["supported", "row_bound", "hull_bound", "attention_bound"]


def supported(rinp):
    """Whether :func:`row_bound` (the delta method) covers the call (see the module docstring)."""
    return (rinp.kind in ("positive", "sincos") and not rinp.unit and not rinp.is_causal
            and rinp.log_gate is None)


def _floored(rinp):
    """Rows whose denominator the kernels floored (their output is not a weighted mean): ``[BH, Nq]``,
    with the key-side statistics: query features, ``z``, the floor's reference and denominator."""
    fq, fk, lk = (np.asarray(host_copy(x), dtype=np.float64) for x in naive.row_features(rinp))
    top = np.where(np.isfinite(lk), lk, -np.inf).max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(lk - top)  # [BH, Nk], 0 on masked keys
    kw = fk * w[..., None]
    z = kw.sum(axis=1)
    mass = (w * np.sqrt((fk * fk).sum(-1))).sum(-1)
    den = np.einsum("bqm,bm->bq", fq, z)
    ref = np.sqrt((fq * fq).sum(-1)) * mass[:, None]
    return (ref > 0) & (den <= rinp.eps * ref), (fq, kw, z, den, ref)


def hull_bound(rinp, out, clamped=None):
    """Certified bound for non-negative feature maps: ``max_j ||v_j - c|| + ||out_i - c||``, ``[BH, Nq]``.

    Any weighted mean of the visible values, exact attention's included, lies within
    ``max_j ||v_j - c||`` of ``c``; ``inf`` on floored rows (causal, gated calls: the
    visible keys of a row are among all the batch row's keys, so the bound still holds).
    ``clamped [BH]``: the kernels' count of floored rows per batch row; where it is known to
    be 0 the features are not recomputed.
    """
    v = np.asarray(host_copy(rinp.v), dtype=np.float64)
    out = np.asarray(host_copy(out), dtype=np.float64)
    seen = np.ones(v.shape[:2], dtype=bool)
    if rinp.key_bias is not None:
        seen = np.asarray(host_copy(rinp.key_bias)) > -np.inf
    count = seen.sum(-1)
    centre = (v * seen[..., None]).sum(1) / np.maximum(count, 1)[:, None]  # [BH, dv]
    rho = np.where(seen, np.linalg.norm(v - centre[:, None, :], axis=-1), 0.0).max(-1, initial=0.0)
    rows = rho[:, None] + np.linalg.norm(out - centre[:, None, :], axis=-1)
    if clamped is not None and not np.asarray(host_copy(clamped)).any():
        floored = np.zeros(rows.shape, dtype=bool)
    else:
        floored, _ = _floored(rinp)
    rows = np.where(floored, np.inf, widen(rows, np.linalg.norm(v, axis=-1).max(-1, initial=0.0)[:, None]))
    return np.where(count[:, None] > 0, rows, 0.0)


def _groups(x, kind):
    """Split the last axis into the parts of each projection: ``[..., D, parts]``."""
    if kind == "sincos":
        half = x.shape[-1] // 2
        return np.stack([x[..., :half], x[..., half:]], axis=-1)
    return x[..., None]


def row_bound(rinp, out, delta):
    """Bound on ``||out_i - o_i||`` per query row at confidence ``1 - delta``: ``[BH, Nq]``.

    Parameters
    ----------
    rinp : mcattn.rfa._inputs.RFAInputs
        A call :func:`supported` covers.
    out : array, shape ``[BH, Nq, dv]``
    delta : float
    """
    z_delta = gaussian_factor(delta)
    floored, (fq, kw, z, den, ref) = _floored(rinp)
    v = np.asarray(host_copy(rinp.v), dtype=np.float64)
    out = np.asarray(host_copy(out), dtype=np.float64)
    s = np.matmul(kw.transpose(0, 2, 1), v)  # [BH, m, dv]
    a = _groups(fq, rinp.kind)  # [BH, Nq, D, P]
    sg = _groups(s.transpose(0, 2, 1), rinp.kind)  # [BH, dv, D, P]
    zg = _groups(z, rinp.kind)  # [BH, D, P]
    d_proj = a.shape[-2]
    # sum_t ||X_t||^2, sum_t Y_t X_t, sum_t Y_t^2 with X_t = sum_p a_tp S_tp, Y_t = sum_p a_tp z_tp
    xx = np.zeros(fq.shape[:2])
    xy = np.zeros(fq.shape[:2] + (v.shape[-1],))
    yy = np.zeros(fq.shape[:2])
    parts = a.shape[-1]
    for p1 in range(parts):
        for p2 in range(parts):
            pair = a[..., p1] * a[..., p2]  # [BH, Nq, D]
            gram = np.einsum("bvt,bvt->bt", sg[..., p1], sg[..., p2])  # S_tp1 . S_tp2
            xx += np.einsum("bqt,bt->bq", pair, gram)
            xy += np.einsum("bqt,bvt->bqv", pair * zg[:, None, :, p2], sg[..., p1])
            yy += np.einsum("bqt,bt->bq", pair, zg[..., p1] * zg[..., p2])
    gg = xx - 2.0 * (out * xy).sum(-1) + (out * out).sum(-1) * yy
    gg = np.maximum(gg, 0.0)
    has = ref > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(gg * d_proj / max(d_proj - 1, 1)) / np.abs(np.where(has, den, 1.0))
    rows = np.where(floored, np.inf, z_delta * sd)
    return np.where(has, rows, 0.0)


def attention_bound(rinp, out, delta, clamped=None):
    """:class:`mcattn.posterior.PosteriorBound` of one call (see the module docstring), or None."""
    host_out = np.asarray(host_copy(out))
    flat = host_out.reshape(rinp.q.shape[0], rinp.nq, -1)
    shape = tuple(rinp.batch_shape) + (rinp.nq,)
    if rinp.kind in ("positive", "arccos"):
        return from_rows(hull_bound(rinp, flat, clamped).reshape(shape), host_out, certified=True)
    if not supported(rinp):
        return None
    return from_rows(row_bound(rinp, flat, delta).reshape(shape), host_out, certified=False,
                     delta=delta)

"""Error bounds of LATTE and their inverse.

Estimate
    With ``q = s_q (q8 + a)``, ``k = s_k (k8 + b)``, ``|a|, |b| <= 1/2`` componentwise
    (int8 rounding) and ``x8 = 16 hi + lo``:
    ``|scale q.k - est| <= scale s_q s_k E`` with
    ``E = 16 (|hi_q|.lo_k + lo_q.|hi_k|) + lo_q.lo_k + (|q8|_1 + |k8|_1) / 2 + d / 4``
    (:func:`estimate_error_bound`). Deterministic; it is what ``mode="safe"`` widens by.

Dropped mass
    With ``m`` any shift and ``eps_j`` the estimate bound, the exact attention mass of
    the dropped keys is at most
    ``sum_dropped exp(est_j + eps_j - m) / sum_kept exp(s_j - m)`` (the dropped terms
    over the kept ones only, which is larger than over all keys), capped at 1
    (:func:`dropped_mass_bound`).

Output
    Softmax over the kept keys with exact scores moves the output by at most
    ``2 * dropped_mass * max_j |v_j|`` (:func:`output_error_bound`): the exact output is
    ``(1 - delta) o_kept + delta o_dropped``. With int8 kept scores, each kept score is
    off by at most ``eta = scale s_q s_k ((|q8|_1 + |k8|_1) / 2 + d / 4)``, which moves
    the softmax weights by a factor within ``exp(+-2 eta)`` and the output by at most
    ``(exp(2 eta) - 1) max |v|`` more.

Inverse
    In relative mode, a dropped key's estimate is below ``max est - theta``, so its true
    score is below ``true max - theta + eps_j + eps_best``; the dropped mass is then at most
    ``N exp(-theta + 2 eps_max)``. :func:`threshold_for_error` solves
    ``2 N exp(-theta + 2 eps_max) max|v| <= target`` for ``theta`` per head.
"""

import math

import numpy as np

from .._array import host_copy, import_arrays
from . import naive
from ._inputs import head_count, prepare_latte

__all__ = [
    "estimate_error_bound",
    "dropped_mass_bound",
    "output_error_bound",
    "int8_score_error",
    "threshold_for_error",
]


def _lat(q, k, v=None, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None):
    names = {"q": q, "k": k, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
    if v is not None:
        names["v"] = v
    _, a = import_arrays(names, float_names=("q", "k") + (("v",) if v is not None else ()))
    host = {n: (None if x is None else host_copy(x)) for n, x in a.items()}
    vv = host["v"] if v is not None else host["k"][..., :1]
    return prepare_latte(host["q"], host["k"], vv, threshold=0.0, mode="relative",
                         attn_mask=host["attn_mask"], key_padding_mask=host["key_padding_mask"],
                         is_causal=is_causal, scale=scale, exact_scores="int8", check_finite=True,
                         want_mass=False)


def _per_row(lat, b):
    c = lat.inp.scale * lat.s_q[b].astype(np.float64)
    return c[:, None] * lat.s_k[b].astype(np.float64)[None, :]


def estimate_error_bound(q, k, *, scale=None):
    """Elementwise bound on ``|scale q.k - est|``.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    scale : float, optional

    Returns
    -------
    numpy.ndarray of float64, shape ``[..., Nq, Nk]``
    """
    lat = _lat(q, k, scale=scale)
    out = np.stack([naive.safe_error_units(lat.q8[b], lat.k8[b]) * _per_row(lat, b)
                    for b in range(lat.inp.q.shape[0])])
    return out.reshape(tuple(lat.inp.batch_shape) + (lat.inp.nq, lat.inp.nk))


def dropped_mass_bound(q, k, kept, *, attn_mask=None, key_padding_mask=None, is_causal=False,
                       scale=None):
    """Bound on the exact attention mass of the keys ``kept`` leaves out, per query row.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    kept : array of bool, shape ``[..., Nq, Nk]``
        Kept keys (:func:`mcattn.latte.kept_mask`).
    attn_mask, key_padding_mask, is_causal, scale
        As :func:`mcattn.latte.attention`.

    Returns
    -------
    numpy.ndarray of float64, shape ``[..., Nq]``
        ``min(1, sum_dropped exp(est + eps - m) / sum_kept exp(s - m))``; 0 for rows that
        drop nothing.
    """
    lat = _lat(q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
               is_causal=is_causal, scale=scale)
    inp = lat.inp
    keep_all = np.broadcast_to(np.asarray(host_copy(kept), dtype=bool),
                               tuple(inp.batch_shape) + (inp.nq, inp.nk)).reshape(-1, inp.nq, inp.nk)
    out = np.zeros((inp.q.shape[0], inp.nq))
    for b in range(inp.q.shape[0]):
        u, c = naive.estimate_units(lat, b)
        visible, extra = naive._bias_over_c(inp, b, c)
        if extra is not None:
            u = u + extra
        est = c[:, None] * u
        eps = naive.safe_error_units(lat.q8[b], lat.k8[b]) * _per_row(lat, b)
        true = naive._true_scores(inp, b)
        keep = keep_all[b] & visible
        drop = visible & ~keep
        upper = np.where(drop, est + eps, -np.inf)
        kept_s = np.where(keep, true, -np.inf)
        m = np.maximum(upper.max(-1), kept_s.max(-1))
        m = np.where(np.isfinite(m), m, 0.0)[:, None]
        num = np.exp(upper - m).sum(-1)
        den = np.exp(kept_s - m).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[b] = np.where(num > 0, np.minimum(1.0, num / den), 0.0)
    return out.reshape(tuple(inp.batch_shape) + (inp.nq,))


def output_error_bound(dropped_mass, v, *, int8_error=None):
    """Bound on ``|out - exact out|`` per query row from the dropped mass.

    Parameters
    ----------
    dropped_mass : array, shape ``[..., Nq]``
        Realised (``info.dropped_mass_rows``) or bounded (:func:`dropped_mass_bound`).
    v : array, shape ``[..., Nk, dv]``
    int8_error : array, shape ``[..., Nq]``, optional
        Bound on the kept scores' error (:func:`int8_score_error`) for int8 kept scores.

    Returns
    -------
    numpy.ndarray of float64, shape ``[..., Nq]``
        ``2 dropped_mass max_j |v_j| (+ (exp(2 eta) - 1) max_j |v_j|)``.
    """
    v = np.asarray(host_copy(v), dtype=np.float64)
    vmax = np.linalg.norm(v, axis=-1).max(axis=-1, keepdims=True)
    bound = 2.0 * np.asarray(host_copy(dropped_mass), dtype=np.float64) * vmax
    if int8_error is not None:
        bound = bound + np.expm1(2.0 * np.asarray(int8_error, dtype=np.float64)) * vmax
    return bound


def int8_score_error(q, k, *, scale=None):
    """Bound ``eta`` per query row on the int8 kept scores' error, ``[..., Nq]``.

    ``|scale q.k - scale s_q s_k q8.k8| <= scale s_q s_k ((|q8|_1 + |k8|_1) / 2 + d / 4)``,
    maximised over the keys.
    """
    lat = _lat(q, k, scale=scale)
    d = lat.inp.head_dim
    out = []
    for b in range(lat.inp.q.shape[0]):
        l1q = np.abs(lat.q8[b].astype(np.int64)).sum(-1)
        l1k = np.abs(lat.k8[b].astype(np.int64)).sum(-1)
        units = (2 * (l1q[:, None] + l1k[None, :]) + d) / 4.0
        out.append((units * _per_row(lat, b)).max(-1))
    return np.stack(out).reshape(tuple(lat.inp.batch_shape) + (lat.inp.nq,))


def threshold_for_error(target, q, k, v, *, attn_mask=None, key_padding_mask=None,
                        is_causal=False, scale=None):
    """Relative-mode threshold per head that guarantees an output error <= ``target``.

    Parameters
    ----------
    target : float > 0
        Absolute bound on ``|out - exact out|`` of every query row (float kept scores).
    q, k, v : arrays ``[..., H, N, d]``
    attn_mask, key_padding_mask, is_causal, scale
        As :func:`mcattn.latte.attention`.

    Returns
    -------
    numpy.ndarray of float64, shape ``[H]``
        ``theta_h = log(2 N max|v| / target) + 2 eps_max`` (at least 0), ``eps_max`` the
        largest estimate bound of the head over visible pairs, ``N`` the key count.
    """
    target = float(target)
    if not target > 0 or math.isnan(target):
        raise ValueError(f"target must be > 0; got {target}")
    lat = _lat(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
               is_causal=is_causal, scale=scale)
    inp = lat.inp
    heads = head_count(inp.batch_shape)
    eps_h = np.zeros(heads)
    vmax_h = np.zeros(heads)
    for b in range(inp.q.shape[0]):
        u, c = naive.estimate_units(lat, b)
        visible, _ = naive._bias_over_c(inp, b, c)
        eps = naive.safe_error_units(lat.q8[b], lat.k8[b]) * _per_row(lat, b)
        h = b % heads
        if visible.any():
            eps_h[h] = max(eps_h[h], float(eps[visible].max()))
        vmax_h[h] = max(vmax_h[h], float(np.linalg.norm(np.asarray(inp.v[b], np.float64), axis=-1).max()))
    with np.errstate(divide="ignore"):
        theta = np.log(2.0 * inp.nk * vmax_h / target) + 2.0 * eps_h
    return np.maximum(theta, 0.0)

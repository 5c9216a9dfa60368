"""Error bounds of random feature attention, and their inverses.

Three levels, from the kernel to the attention output.

1. **Kernel estimate.** ``phi(x) . phi(y)`` is an unbiased estimate of :func:`kernel`
   with the variance of :func:`kernel_variance` (``D`` independent projections):

   * ``sincos`` (Gaussian kernel ``k(x, y) = exp(-|x - y|^2 / 2)``; Rahimi & Recht 2007):
     ``(1 + k(2 delta) - 2 k(delta)^2) / (2 D)`` with ``delta = x - y``;
   * ``positive`` (``exp(x . y)``; Choromanski et al. 2021, Lemma 1):
     ``exp(2 x.y) (exp(|x + y|^2) - 1) / D``;
   * ``arccos`` (``k1(x, y) = |x| |y| J1(theta) / (2 pi)``; Cho & Saul 2009):
     ``(|x|^2 |y|^2 J2(theta) / (2 pi) - k1^2) / D`` with
     ``J1 = sin t + (pi - t) cos t``, ``J2 = 3 sin t cos t + (pi - t)(1 + 2 cos^2 t)``.

   Orthogonal features keep the expectation and lower the variance (Yu et al. 2016 for
   sin/cos, Choromanski et al. 2021 Thm. 2 for positive features), so these iid
   formulas are what the bounds below use for both; the tests check them on
   orthogonal draws too.

2. **Uniform convergence** (sin/cos, Rahimi & Recht 2007, Claim 1): for points in a set
   of diameter ``diam`` (in the units the features see, i.e. after ``/ sigma``),
   ``P[sup |phi(x).phi(y) - k(x, y)| >= eps] <= 2^8 (sigma_p diam / eps)^2 exp(-D eps^2 / (4 (d + 2)))``
   with ``sigma_p^2 = d`` for the unit-bandwidth Gaussian kernel and ``D`` the number of
   frequencies. (Sutherland & Schneider 2015 prove the same form, with a smaller
   constant, for the ``[sin, cos]`` embedding used here.)
   :func:`uniform_error` and :func:`uniform_feature_count` evaluate and invert it.

3. **Attention output** (ratio estimator): ``out_i = N_i / Z_i`` with
   ``N_i = sum_j a_ij kappa_ij v_j`` and ``Z_i = sum_j a_ij kappa_ij`` (``a >= 0``:
   masks, gates, key factors). If ``|Z^ - Z| <= eps Z`` and
   ``|N^ - N| <= eps Z max_j |v_j|``, then
   ``|N^/Z^ - N/Z| <= 2 eps / (1 - eps) * max_j |v_j|`` (:func:`ratio_error_bound`;
   inverse :func:`ratio_eps_for_error`). Two ways to get ``eps``:

   * uniform (sin/cos; every row at once): a uniform kernel error ``eps_k`` over a ball
     of radius ``r`` gives ``eps = eps_k exp(2 r^2)``, since the Gaussian kernel is at
     least ``exp(-2 r^2)`` there (:func:`sincos_output_bound`,
     :func:`sincos_feature_count`). For ``normalize="unit"``, ``r = 1 / sigma``.
   * data-dependent (every kind; :func:`output_error_bound`): the standard deviation of
     a weighted sum is at most the weighted sum of standard deviations, so
     ``sd(Z^_i) <= rho_i Z_i`` with
     ``rho_i = sum_j a_ij sd_ij / sum_j a_ij kappa_ij`` (and
     ``sd(|N^_i - N_i|) <= rho_i Z_i max|v|``); Chebyshev with a union bound over the
     ``n`` rows and the two estimates gives ``eps_i = rho_i sqrt(2 n / delta)`` for all
     rows at once with probability ``1 - delta``. ``rho_i`` falls as ``1/sqrt(D)``, so
     :func:`features_for_output_error` inverts it.
"""

import math
from dataclasses import dataclass

import numpy as np

from .._array import host_copy as _host
from .._array import import_arrays
from ._inputs import prepare_rfa
from .features import RandomFeatures
from .naive import KINDS, log_kernel_matrix, scaled_rows, target_attention

__all__ = [
    "kernel",
    "kernel_variance",
    "log_kernel_matrix",
    "uniform_error",
    "uniform_feature_count",
    "ratio_error_bound",
    "ratio_eps_for_error",
    "sincos_output_bound",
    "sincos_feature_count",
    "OutputBound",
    "output_error_bound",
    "features_for_output_error",
]



def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


def _angle_terms(x, y):
    nx = np.linalg.norm(x, axis=-1)
    ny = np.linalg.norm(y, axis=-1)
    denom = nx * ny
    cos = np.clip(np.where(denom > 0, (x * y).sum(-1) / np.where(denom > 0, denom, 1.0), 1.0), -1.0, 1.0)
    theta = np.arccos(cos)
    return nx, ny, theta, cos


def kernel(kind, x, y):
    """The kernel a feature map estimates, ``E[phi(x) . phi(y)]`` (unit bandwidth).

    Parameters
    ----------
    kind : {"positive", "sincos", "arccos"}
    x, y : array_like ``[..., d]`` (broadcast together)
        For features with ``sigma != 1`` pass ``x / sigma`` and ``y / sigma``.

    Returns
    -------
    numpy.ndarray ``[...]``
        ``exp(x . y)``, ``exp(-|x - y|^2 / 2)`` or ``|x| |y| J1(theta) / (2 pi)``.
    """
    _check_kind(kind)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if kind == "positive":
        return np.exp((x * y).sum(-1))
    if kind == "sincos":
        return np.exp(-0.5 * ((x - y) ** 2).sum(-1))
    nx, ny, theta, cos = _angle_terms(x, y)
    return nx * ny * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)


def kernel_variance(kind, x, y, num_features):
    """Variance of the estimate ``phi(x) . phi(y)`` with ``D`` independent projections.

    Parameters
    ----------
    kind : {"positive", "sincos", "arccos"}
    x, y : array_like ``[..., d]``
    num_features : int
        ``D``.

    Returns
    -------
    numpy.ndarray ``[...]``
        See the module docstring for the formulas.
    """
    _check_kind(kind)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    D = float(num_features)
    if kind == "sincos":
        sq = ((x - y) ** 2).sum(-1)
        return (1.0 + np.exp(-2.0 * sq) - 2.0 * np.exp(-sq)) / (2.0 * D)
    if kind == "positive":
        dot = (x * y).sum(-1)
        return np.exp(2.0 * dot) * np.expm1(((x + y) ** 2).sum(-1)) / D
    nx, ny, theta, cos = _angle_terms(x, y)
    sin = np.sin(theta)
    j2 = 3.0 * sin * cos + (np.pi - theta) * (1.0 + 2.0 * cos**2)
    k1 = nx * ny * (sin + (np.pi - theta) * cos) / (2 * np.pi)
    return np.maximum(nx**2 * ny**2 * j2 / (2 * np.pi) - k1**2, 0.0) / D


def _log_uniform_prob(num_features, eps, head_dim, diameter):
    sigma_p_sq = float(head_dim)
    return (8 * math.log(2) + math.log(sigma_p_sq * diameter**2 / eps**2)
            - num_features * eps**2 / (4.0 * (head_dim + 2)))


def _check_prob(delta):
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    return delta


def uniform_feature_count(eps, delta, head_dim, diameter):
    """Frequencies ``D`` for ``sup |phi(x).phi(y) - k(x,y)| < eps`` with probability ``1 - delta``.

    Rahimi & Recht's Claim 1 for the unit-bandwidth Gaussian kernel (``sincos`` features)
    over a set of the given diameter (see the module docstring).

    Parameters
    ----------
    eps : float
        Uniform kernel error, in ``(0, 2)``.
    delta : float
        Failure probability, in ``(0, 1)``.
    head_dim : int
        ``d``.
    diameter : float
        Diameter of the set holding every ``x / sigma`` (``2 / sigma`` for unit-norm rows).

    Returns
    -------
    int
    """
    delta = _check_prob(delta)
    if not 0 < eps:
        raise ValueError(f"eps must be positive; got {eps}")
    if eps >= 2 or diameter <= 0:
        return 1  # |phi.phi - k| < 2 always; a single point has nothing to bound
    log_term = 8 * math.log(2) + math.log(head_dim * diameter**2 / eps**2) - math.log(delta)
    return max(1, math.ceil(4.0 * (head_dim + 2) * log_term / eps**2))


def uniform_error(num_features, delta, head_dim, diameter):
    """The uniform kernel error ``eps`` Rahimi & Recht's Claim 1 guarantees for ``D`` frequencies.

    Inverse of :func:`uniform_feature_count`: the smallest ``eps`` whose failure
    probability is at most ``delta`` (at most 2, which always holds).

    Returns
    -------
    float
    """
    delta = _check_prob(delta)
    if diameter <= 0:
        return 0.0
    log_delta = math.log(delta)
    lo, hi = 1e-12, 2.0
    if _log_uniform_prob(num_features, hi, head_dim, diameter) > log_delta:
        return 2.0
    for _ in range(200):  # the failure probability decreases in eps
        mid = math.sqrt(lo * hi)
        if _log_uniform_prob(num_features, mid, head_dim, diameter) <= log_delta:
            hi = mid
        else:
            lo = mid
    return hi


def ratio_error_bound(eps, value_norm=1.0):
    """``2 eps / (1 - eps) * value_norm``: the output error of ``N^/Z^`` when both are within ``eps``.

    Parameters
    ----------
    eps : float or array
        Relative error of the numerator (in units of ``Z max|v|``) and denominator.
    value_norm : float or array
        ``max_j |v_j|``.

    Returns
    -------
    float or numpy.ndarray
        ``inf`` where ``eps >= 1`` (the denominator may vanish: no bound).
    """
    eps = np.asarray(eps, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = np.where(eps < 1, 2 * eps / np.where(eps < 1, 1 - eps, 1.0) * value_norm, np.inf)
    return float(out) if out.ndim == 0 else out


def ratio_eps_for_error(error, value_norm=1.0):
    """The ``eps`` at which :func:`ratio_error_bound` equals ``error``.

    That is ``t / (2 + t)`` with ``t = error / value_norm``.
    """
    t = float(error) / float(value_norm)
    if t <= 0:
        raise ValueError(f"error must be positive; got {error}")
    return t / (2.0 + t)


def sincos_output_bound(num_features, delta, head_dim, radius, value_norm=1.0):
    """Uniform bound on every row's output error of sin/cos RFA, with probability ``1 - delta``.

    Parameters
    ----------
    num_features : int
        ``D`` (frequencies).
    delta : float
    head_dim : int
    radius : float
        Every row the features see (``q'``, ``k'``, after ``/ sigma``) has norm at most
        this; ``1 / sigma`` for ``normalize="unit"``.
    value_norm : float
        ``max_j |v_j|``.

    Returns
    -------
    float
        ``max_i |out~_i - out_i|`` bound (``inf`` when vacuous).
    """
    eps_k = uniform_error(num_features, delta, head_dim, 2.0 * radius)
    return ratio_error_bound(eps_k * math.exp(2.0 * radius**2), value_norm)


def sincos_feature_count(error, delta, head_dim, radius, value_norm=1.0):
    """Frequencies ``D`` for which :func:`sincos_output_bound` is at most ``error``."""
    eps = ratio_eps_for_error(error, value_norm)
    return uniform_feature_count(eps * math.exp(-2.0 * radius**2), delta, head_dim, 2.0 * radius)


@dataclass(frozen=True)
class OutputBound:
    """Data-dependent bound of :func:`output_error_bound`.

    Attributes
    ----------
    row : numpy.ndarray ``[..., Nq]``
        Bound on ``|out~_i - out_i|`` per query row (``inf`` when vacuous, 0 for rows
        with no visible key).
    relative : numpy.ndarray ``[...]``
        Bound on ``|out~ - out|_F / |out|_F`` per batch row (``[B, H]``).
    rho : numpy.ndarray ``[..., Nq]``
        Relative standard-deviation bound of the denominator at ``D = 1`` (divide by
        ``sqrt(D)``).
    delta : float
    num_features : int
    """

    row: np.ndarray
    relative: np.ndarray
    rho: np.ndarray
    delta: float
    num_features: int


def _rho_unit(rinp):
    """``rho_i`` at ``D = 1`` ``[BH, Nq]``, the exact target ``[BH, Nq, dv]``, visible-key value norms."""
    host = {name: np.asarray(_host(getattr(rinp, name)), dtype=np.float64) for name in ("q", "k", "v")}
    xq, _ = scaled_rows(host["q"], rinp.q_scale, rinp.unit, np)
    xk, sk = scaled_rows(host["k"], rinp.k_scale, rinp.unit, np)
    # log kappa_ij (absolute: the kernel the features estimate times the key factor) and
    # log sd_ij, one batch row at a time (the pair arrays are [Nq, Nk, d]).
    log_kappa = np.empty((xq.shape[0], xq.shape[1], xk.shape[1]))
    log_sd = np.empty_like(log_kappa)
    for b in range(xq.shape[0]):
        pq, pk = xq[b, :, None, :], xk[b, None, :, :]
        with np.errstate(divide="ignore"):
            if rinp.kind == "positive":
                log_kappa[b] = (pq * pk).sum(-1)
                log_sd[b] = log_kappa[b] + 0.5 * np.log(np.expm1(((pq + pk) ** 2).sum(-1)))
            elif rinp.kind == "sincos":
                key_factor = 0.5 * sk[b, None, :]
                log_kappa[b] = np.log(kernel("sincos", pq, pk)) + key_factor
                log_sd[b] = 0.5 * np.log(kernel_variance("sincos", pq, pk, 1)) + key_factor
            else:
                log_kappa[b] = np.log(kernel("arccos", pq, pk))
                log_sd[b] = 0.5 * np.log(kernel_variance("arccos", pq, pk, 1))
    extra = np.zeros(log_kappa.shape)
    if rinp.key_bias is not None:
        extra = extra + np.asarray(_host(rinp.key_bias), np.float64)[:, None, :]
    if rinp.log_gate is not None:
        cum = np.cumsum(np.asarray(_host(rinp.log_gate), np.float64), axis=1)
        extra = extra + cum[:, :, None] - cum[:, None, :]
    nq, nk = log_kappa.shape[-2:]
    if rinp.is_causal:
        extra = np.where(np.tril(np.ones((nq, nk), dtype=bool)), extra, -np.inf)
    a = log_kappa + extra
    b = log_sd + extra
    top = np.maximum(a.max(-1, keepdims=True), b.max(-1, keepdims=True))
    top = np.where(np.isfinite(top), top, 0.0)
    num = np.exp(b - top).sum(-1)
    den = np.exp(a - top).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
    visible = np.isfinite(extra)
    vnorm = np.linalg.norm(host["v"], axis=-1)[:, None, :]
    value_norm = np.where(visible, vnorm, 0.0).max(-1)
    return rho, target_attention(rinp), value_norm, visible.any(-1)


def _bound_from_rho(rho, value_norm, visible, num_features, delta, exact):
    n = np.maximum(visible.sum(-1, keepdims=True), 1)
    eps = rho / math.sqrt(num_features) * np.sqrt(2.0 * n / delta)
    row = np.where(visible, ratio_error_bound(eps, value_norm), 0.0)
    norm = np.linalg.norm(exact.reshape(exact.shape[0], -1), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.sqrt((row**2).sum(-1)) / np.where(norm > 0, norm, np.inf)
    return row, np.where(np.isnan(rel), 0.0, rel)


def _prepare(features, q, k, v, normalize, scale, key_padding_mask, is_causal, gate):
    _, a = import_arrays({"q": q, "k": k, "v": v, "key_padding_mask": key_padding_mask, "gate": gate},
                         float_names=("q", "k", "v"))
    rinp, _ = prepare_rfa(features, a["q"], a["k"], a["v"], attn_mask=None,
                          key_padding_mask=a["key_padding_mask"], gate=a["gate"], is_causal=is_causal,
                          normalize=normalize, scale=scale, chunk_size=None, eps=None, check_finite=True)
    return rinp


def output_error_bound(q, k, v, features, *, delta=0.1, normalize=None, scale=None,
                       key_padding_mask=None, is_causal=False, gate=None):
    """Data-dependent bound on RFA's output error for these inputs (``O(Nq Nk)``; analysis only).

    With probability at least ``1 - delta`` over the draw of the features, every query
    row of a batch row ``(b, h)`` satisfies ``|out~_i - out_i| <= row[b, h, i]`` (see
    the module docstring: Chebyshev, union over rows, ratio estimator). ``out`` is the
    attention RFA estimates (:func:`mcattn.rfa.naive.target_attention`: softmax
    attention for ``positive`` and ``sincos``, arc-cosine-kernel attention for ``arccos``).

    Parameters
    ----------
    q, k, v : array ``[..., N, d]``, ``[..., Nk, d]``, ``[..., Nk, dv]``
    features : RandomFeatures
        Kind, sigma, ``D`` (the bound uses the variance of independent features).
    delta : float, default 0.1
    normalize, scale, key_padding_mask, is_causal, gate
        As in :func:`mcattn.rfa.attention`.

    Returns
    -------
    OutputBound
    """
    delta = _check_prob(delta)
    rinp = _prepare(features, q, k, v, normalize, scale, key_padding_mask, is_causal, gate)
    rho, exact, value_norm, visible = _rho_unit(rinp)
    row, rel = _bound_from_rho(rho, value_norm, visible, features.num_features, delta, exact)
    shape = tuple(rinp.batch_shape)
    return OutputBound(row=row.reshape(shape + (rinp.nq,)), relative=rel.reshape(shape),
                       rho=rho.reshape(shape + (rinp.nq,)), delta=delta,
                       num_features=features.num_features)


def features_for_output_error(target, q, k, v, *, kind="positive", sigma=1.0, delta=0.1,
                              normalize=None, scale=None, key_padding_mask=None, is_causal=False,
                              gate=None, num_heads=None):
    """Smallest ``D`` whose :func:`output_error_bound` relative bound meets ``target`` in every batch row.

    Parameters
    ----------
    target : float
        Relative output error ``|out~ - out|_F / |out|_F``.
    q, k, v, delta, normalize, scale, key_padding_mask, is_causal, gate
        As in :func:`output_error_bound`.
    kind : str
    sigma : float
    num_heads : int, optional
        As in :class:`RandomFeatures` (only shapes matter here).

    Returns
    -------
    int or float
        An ``int`` up to ``2**53``; above, a float (the count is then only of
        theoretical interest); ``inf`` when no ``D`` meets the target (a row whose
        spread bound is infinite, e.g. a zero denominator).
    """
    delta = _check_prob(delta)
    if not target > 0:
        raise ValueError(f"target must be positive; got {target}")
    d = np.shape(q)[-1]
    template = RandomFeatures(d, 1, kind=kind, sigma=sigma, num_heads=num_heads, orthogonal=False)
    rinp = _prepare(template, q, k, v, normalize, scale, key_padding_mask, is_causal, gate)
    rho, exact, value_norm, visible = _rho_unit(rinp)

    def meets(D):
        return float(_bound_from_rho(rho, value_norm, visible, D, delta, exact)[1].max(initial=0.0)) <= target

    if not meets(1e300):
        return math.inf
    if meets(1):
        return 1
    lo, hi = 0.0, 300.0  # log10 D: the bound falls monotonically in D
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if meets(10.0**mid):
            hi = mid
        else:
            lo = mid
    D = 10.0**hi
    if D > 2.0**53:
        return D
    D = math.ceil(D)
    while D > 1 and meets(D - 1):  # the exact integer (the bisection stops within rounding)
        D -= 1
    while not meets(D):
        D += 1
    return D



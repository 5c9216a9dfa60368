"""A-posteriori error bounds: what one call can say about its own error, per query row.

A method that approximates softmax attention returns, with ``return_info=True``, a
:class:`PosteriorBound` in ``info.posterior``: a bound on ``||o~_i - o_i||_2`` for every query
row ``i``, computed from quantities the call already has. Certified bounds (deterministic
methods) hold on every row; the others hold on each row with probability at least
``1 - delta`` over the method's random draws. docs/bounds.md derives each method's bound.
"""

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from ._array import host_copy

__all__ = ["PosteriorBound", "from_rows", "relative_of", "widen", "HostInputs", "dot_intervals",
           "ValueSpread", "value_spread", "reweighting_bound", "spread_sum", "softmax_rows", "knob_for",
           "gaussian_factor", "SLACK"]

#: Relative widening of every certified bound: covers the float64 rounding of the bound's
#: own arithmetic (a few hundred operations per row, each off by at most 2**-53).
SLACK = 1e-9


def widen(rows, value_scale):
    """Certified rows widened for float64 rounding: ``rows (1 + SLACK) + SLACK * 1e-3 value_scale``.

    The absolute part (``value_scale``: the largest value norm) covers rows whose bound is
    only the rounding-level distance between the kernel's output and its float64 recomputation.
    """
    return rows * (1.0 + SLACK) + (SLACK * 1e-3) * value_scale


@dataclass(frozen=True)
class PosteriorBound:
    """A per-row bound on the output error of one call.

    Attributes
    ----------
    row : numpy.ndarray, shape ``[..., Nq]`` (the output's batch dims), float64
        Bound on ``||o~_i - o_i||_2`` per query row (0 for a row with no visible key,
        ``inf`` where the bound says nothing).
    relative : float
        Bound on ``||O~ - O||_F / ||O||_F`` over the call, from the rows:
        ``r / max(||O~||_F - r, 0)`` with ``r = sqrt(sum_i row_i^2)`` (``||O||_F >= ||O~||_F - r``).
    certified : bool
        True: holds on every row, no exceptions. False: each row holds with probability at
        least ``1 - delta``.
    delta : float or None
        The failure probability of a random bound; None when certified.
    """

    row: np.ndarray
    relative: float
    certified: bool
    delta: float | None = None

    @property
    def median(self):
        """Median of the per-row bounds."""
        return float(np.median(self.row)) if self.row.size else 0.0


def relative_of(total, norm):
    """``total / max(norm - total, 0)`` elementwise: a bound on ``||O~ - O|| / ||O||`` from
    ``total >= ||O~ - O||`` and ``norm = ||O~||`` (``||O|| >= ||O~|| - total``); 0 where
    ``total`` is 0, ``inf`` where it reaches ``norm``."""
    total = np.asarray(total, dtype=np.float64)
    floor = np.asarray(norm, dtype=np.float64) - total
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total == 0, 0.0, np.where(floor > 0, total / np.where(floor > 0, floor, 1.0), np.inf))


def from_rows(row, out, *, certified, delta=None):
    """A :class:`PosteriorBound` from per-row bounds and the call's output.

    Parameters
    ----------
    row : array_like, shape ``[..., Nq]``
        Bound on ``||o~_i - o_i||_2`` per row (host).
    out : array_like, shape ``[..., Nq, dv]``
        The call's output ``O~`` (host).
    certified : bool
    delta : float, optional
        Required when ``certified`` is False, in ``(0, 1)``.

    Returns
    -------
    PosteriorBound
    """
    row = np.asarray(row, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if row.shape != out.shape[:-1]:
        raise ValueError(f"row must have the output's shape without dv {out.shape[:-1]}; got {row.shape}")
    if certified:
        if delta is not None:
            raise ValueError("a certified bound has no delta")
    elif delta is None or not 0 < float(delta) < 1:
        raise ValueError(f"a random bound needs delta in (0, 1); got {delta}")
    relative = float(relative_of(np.sqrt((row * row).sum()), np.linalg.norm(out)))
    return PosteriorBound(row=row, relative=relative, certified=bool(certified),
                          delta=None if certified else float(delta))


class HostInputs:
    """Float64 host copies of canonical attention inputs, for a bound computed after the call.

    Attributes ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]`` (float64 NumPy),
    ``scale``, ``nq``, ``nk``; :meth:`row_bias` gives one batch row's mask.
    """

    def __init__(self, inp):
        self.inp = inp
        self.q = np.asarray(host_copy(inp.q), dtype=np.float64)
        self.k = np.asarray(host_copy(inp.k), dtype=np.float64)
        self.v = np.asarray(host_copy(inp.v), dtype=np.float64)
        mask = inp.mask
        self.bias = None if mask.bias is None else np.asarray(host_copy(mask.bias), dtype=np.float64)
        self.mask_index = None if mask.bias is None else np.asarray(host_copy(mask.mask_index))
        self.is_causal = bool(mask.is_causal)
        self.scale = float(inp.scale)
        self.nq, self.nk = inp.nq, inp.nk

    def row_bias(self, b):
        """``bias [Nq, Nk]`` (0 where invisible) and ``visible [Nq, Nk]`` of batch row ``b``."""
        visible = np.ones((self.nq, self.nk), dtype=bool)
        bias = np.zeros((self.nq, self.nk))
        if self.bias is not None:
            raw = np.broadcast_to(self.bias[int(self.mask_index[b])], (self.nq, self.nk))
            visible &= raw > -np.inf
            bias = np.where(visible, raw, 0.0)
        if self.is_causal:
            visible &= np.arange(self.nk)[None, :] <= np.arange(self.nq)[:, None]
        return bias, visible


def softmax_rows(s):
    """Row softmax of scores ``s [n, N]`` (``-inf`` = not used; an empty row is 0), float64."""
    top = s.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(s - top)
    total = e.sum(axis=-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


def dot_intervals(a, delta, *, rank=8):
    """Intervals for the dot products ``a_i . delta_j`` from a low-rank part and a remainder.

    ``delta_j = mu + U U^T (delta_j - mu) + r_j`` with ``mu`` the mean of the rows of
    ``delta`` and ``U`` its ``rank`` leading principal directions; the first two parts are
    computed exactly (``O(n N rank)``), the remainder by Cauchy-Schwarz on the part of
    ``a_i`` outside ``U`` (``r_j`` is orthogonal to ``U``):
    ``|a_i . r_j| <= ||a_i - U U^T a_i|| ||r_j||``. Certified: ``a_i . delta_j`` lies in
    ``[centre - width, centre + width]`` for every pair, up to float64 rounding.

    Parameters
    ----------
    a : numpy.ndarray, shape ``[n, d]``, float64
    delta : numpy.ndarray, shape ``[N, d]``, float64
    rank : int
        Principal directions computed exactly (at most ``d``).

    Returns
    -------
    centre, width : numpy.ndarray, shape ``[n, N]``, float64
    """
    n, d = a.shape
    if delta.shape[0] == 0 or n == 0:
        return np.zeros((n, delta.shape[0])), np.zeros((n, delta.shape[0]))
    mu = delta.mean(axis=0)
    dc = delta - mu
    rank = min(int(rank), d, dc.shape[0])
    if rank > 0:
        # principal directions of the centred rows: eigenvectors of the d x d Gram matrix
        w, vecs = np.linalg.eigh(dc.T @ dc)
        u = vecs[:, np.argsort(w)[::-1][:rank]]
    else:
        u = np.zeros((d, 0))
    dcu = dc @ u  # [N, rank]
    au = a @ u  # [n, rank]
    resid = np.sqrt(np.maximum((dc * dc).sum(-1) - (dcu * dcu).sum(-1), 0.0))  # ||r_j||
    a_out = np.sqrt(np.maximum((a * a).sum(-1) - (au * au).sum(-1), 0.0))  # ||a_i - U U^T a_i||
    centre = (a @ mu)[:, None] + au @ dcu.T
    width = a_out[:, None] * resid[None, :]
    return centre, width


@dataclass(frozen=True)
class ValueSpread:
    """How far the values of one batch row spread around a centre.

    Attributes
    ----------
    centre : numpy.ndarray, ``[dv]``
        Mean of the visible values.
    rho : numpy.ndarray, ``[Nk]``
        ``||v_j - centre||``.
    sigma : float
        Largest singular value of the centred visible values: for any weights ``w``,
        ``||sum_j w_j (v_j - centre)|| <= ||w||_2 sigma``.
    """

    centre: np.ndarray
    rho: np.ndarray
    sigma: float


def value_spread(v, visible=None):
    """:class:`ValueSpread` of values ``v [Nk, dv]`` (``visible [Nk]``: the keys any row may see)."""
    v = np.asarray(v, dtype=np.float64)
    seen = v if visible is None else v[np.asarray(visible, dtype=bool)]
    centre = seen.mean(axis=0) if seen.shape[0] else np.zeros(v.shape[-1])
    dc = seen - centre
    sigma = float(np.sqrt(max(np.linalg.eigvalsh(dc.T @ dc).max(), 0.0))) if dc.size else 0.0
    return ValueSpread(centre=centre, rho=np.linalg.norm(v - centre, axis=-1), sigma=sigma)


def spread_sum(weight, spread):
    """Bound on ``||sum_j c_j (v_j - centre)||`` for any ``|c_j| <= weight_j``: ``[n]``.

    The smaller of ``sum_j weight_j rho_j`` (triangle inequality) and
    ``||weight||_2 sigma`` (operator norm), row by row.
    """
    return np.minimum(weight @ spread.rho, np.sqrt((weight * weight).sum(-1)) * spread.sigma)


def reweighting_bound(p, lo, hi, spread):
    """Bound on ``||softmax(s) V - p V||`` per row when ``p = softmax(s~)`` and
    ``lo <= s - s~ <= hi``.

    With ``delta_j = s_j - s~_j``, ``softmax(s)_j / p_j = exp(delta_j) / sum_k p_k exp(delta_k)``
    lies in ``[exp(lo_j) / A, exp(hi_j) / B]`` (``A = sum p e^hi``, ``B = sum p e^lo``), so
    ``|softmax(s)_j - p_j| <= a_j = p_j max(exp(hi_j) / B - 1, 1 - exp(lo_j) / A)``; the
    difference of the outputs is ``sum_j (softmax(s)_j - p_j)(v_j - centre)`` (the weights'
    differences sum to 0), bounded by :func:`spread_sum` of ``a``. A shift common to a row
    cancels, so only the spread of ``delta`` within the row costs.

    Parameters
    ----------
    p : numpy.ndarray, shape ``[n, Nk]``
        The probabilities used (rows sum to 1, or 0 for an empty row).
    lo, hi : numpy.ndarray, shape ``[n, Nk]``
        Bounds on each score's error ``s - s~`` (only where ``p > 0`` matters).
    spread : ValueSpread

    Returns
    -------
    numpy.ndarray, ``[n]``
    """
    used = p > 0
    # shift each row so that the exponentials stay finite (the shift cancels)
    count = np.maximum(used.sum(-1, keepdims=True), 1)
    shift = np.where(used, 0.5 * (lo + hi), 0.0).sum(-1, keepdims=True) / count
    lo = np.where(used, lo - shift, 0.0)
    hi = np.where(used, hi - shift, 0.0)
    big = np.exp(hi)
    small = np.exp(lo)
    up = (p * big).sum(-1, keepdims=True)
    down = (p * small).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = p * np.maximum(big / np.where(down > 0, down, 1.0) - 1.0,
                           1.0 - small / np.where(up > 0, up, 1.0))
    return spread_sum(np.where(used, np.maximum(a, 0.0), 0.0), spread)


def gaussian_factor(delta):
    """``z`` with ``P(||g|| > z sqrt(E||g||^2)) <= delta`` for every centred Gaussian vector ``g``.

    The worst covariance shape at a fixed trace is rank one (``||g||^2 = E||g||^2 chi2_1``)
    for the upper tail, so ``z`` is the two-sided normal quantile ``Phi^-1(1 - delta / 2)``
    (1.96 at ``delta = 0.05``, 2.58 at 0.01).
    """
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    return NormalDist().inv_cdf(1.0 - delta / 2.0)


_STATISTICS = {
    "relative": lambda b: b.relative,
    "median": lambda b: b.median,
    "max": lambda b: float(b.row.max()) if b.row.size else 0.0,
}


def knob_for(bound_of, target, low, high, *, larger_is_safer, integer=False, statistic="relative",
             steps=30):
    """The cheapest knob in ``[low, high]`` whose a-posteriori bound meets ``target`` (bisection).

    Parameters
    ----------
    bound_of : callable
        ``bound_of(knob) -> PosteriorBound``: one call of the method with that knob (fix the
        seed of a random method, and run it on inputs like those it will see).
    target : float
        The largest acceptable value of ``statistic``.
    low, high : float
        The knob's range.
    larger_is_safer : bool
        True where a larger knob means less error (latte's threshold, eigen's columns, rfa's
        features): the smallest knob meeting ``target`` is returned; False (mca's ``alpha``):
        the largest.
    integer : bool
        Whole-number knobs.
    statistic : {"relative", "median", "max"}
        What must meet ``target``: :attr:`PosteriorBound.relative`, the median or the largest
        row bound.
    steps : int
        Bisection steps (continuous knobs).

    Returns
    -------
    knob : float or int
    bound : PosteriorBound
        The bound at that knob.

    Raises
    ------
    ValueError
        Bad arguments, or the safest end of the range does not meet ``target`` either (the
        message gives the bound there).

    Notes
    -----
    The bound is assumed to move monotonically with the knob; a bisection over a bound
    that does not (a random method at a fixed seed, roughly) returns a knob that meets the
    target, not necessarily the cheapest one.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}; got {statistic!r}")
    target = float(target)
    if not target > 0:
        raise ValueError(f"target must be > 0; got {target}")
    if not low < high:
        raise ValueError(f"need low < high; got {low}, {high}")
    stat = _STATISTICS[statistic]
    safe, cheap = (high, low) if larger_is_safer else (low, high)
    if integer:
        safe, cheap = int(safe), int(cheap)
    at_safe = bound_of(safe)
    if not stat(at_safe) <= target:
        raise ValueError(f"even the safest knob {safe} gives a {statistic} bound of {stat(at_safe):.4g} "
                         f"> target {target:.4g}")
    at_cheap = bound_of(cheap)
    if stat(at_cheap) <= target:
        return cheap, at_cheap
    good, good_bound, bad = safe, at_safe, cheap  # invariant: good meets the target, bad does not
    for _ in range(int(steps)):
        if integer and abs(good - bad) <= 1:
            break
        mid = (good + bad) // 2 if integer else 0.5 * (good + bad)
        b = bound_of(mid)
        if stat(b) <= target:
            good, good_bound = mid, b
        else:
            bad = mid
    return good, good_bound

"""Per-head thresholds from calibration data, without training."""

import math

import numpy as np

from .._array import host_copy, import_arrays
from . import naive
from ._inputs import check_mode, head_count, prepare_latte

__all__ = ["calibrate"]

# Calibrated thresholds are nudged up by this relative amount so that the pair that
# sets them passes the (float64) keep rule despite rounding.
_NUDGE = 1e-9


def _pairs_of_row(lat, b, mode):
    """Per visible pair of batch row ``b``: the ordering key (kept iff key <= theta) and the true prob."""
    u, c = naive.estimate_units(lat, b)
    visible, extra = naive._bias_over_c(lat.inp, b, c)
    if extra is not None:
        u = u + extra
    probs = naive.true_probs(lat.inp, b)
    ninf = -np.inf
    if mode == "safe":
        err = naive.safe_error_units(lat.q8[b], lat.k8[b]) * lat.s_k[b].astype(np.float64)[None, :]
        low_max = np.where(visible, u - err, ninf).max(axis=-1, keepdims=True)
        key = c[:, None] * (low_max - (u + err))
    elif mode == "relative":
        top = np.where(visible, u, ninf).max(axis=-1, keepdims=True)
        key = c[:, None] * (top - u)
    else:  # absolute (and topk by rank): larger estimates first; a row's best is always kept
        top = np.where(visible, u, ninf).max(axis=-1, keepdims=True)
        key = np.where(u == top, ninf, -(c[:, None] * u))
    return key, probs, visible


def calibrate(q, k, *, target_keep=None, target_mass=None, mode="relative", attn_mask=None,
              key_padding_mask=None, is_causal=False, scale=None, spread="even"):
    """Per-head thresholds that keep a target fraction of keys or of attention mass.

    Parameters
    ----------
    q : array, shape ``[..., H, Nq, d]``
    k : array, shape ``[..., H, Nk, d]``
        Calibration data (host arrays or tensors); the last batch dim is the head.
    target_keep : float in (0, 1], optional
        Fraction of the visible (query, key) pairs of each head to keep.
    target_mass : float in (0, 1], optional
        Share of the exact attention mass to keep, averaged over the query rows of
        each head. Give exactly one of the two targets.
    mode : {"relative", "absolute", "topk", "safe"}
        The keep rule the thresholds are for.
    attn_mask, key_padding_mask, is_causal, scale
        As :func:`mcattn.latte.attention`. In self-attention (``Nq == Nk``) the query
        rows at padding positions of ``key_padding_mask`` are left out of the statistics.
    spread : {"even", "mass"}
        How a ``target_keep`` budget is shared by the heads. ``"even"``: every head keeps
        ``target_keep`` of its own pairs. ``"mass"``: the heads keep ``target_keep`` of all
        their pairs together, split so that every head keeps the same share of its
        attention mass (peaked heads give keys to diffuse ones); the smallest common mass
        share that reaches the budget is used. Threshold modes only (not ``topk``).

    Returns
    -------
    numpy.ndarray, shape ``[H]``
        float64 thresholds (int64 keys per query for ``topk``), the smallest that reach
        the target on these data (ties included, so the kept share can exceed it).
        For ``relative`` and ``safe`` the thresholds are >= 0. The rows' mandatory best
        key is counted, so a ``target_keep`` below one key per row is not reachable.

    Notes
    -----
    The whole ``Nq x Nk`` estimate of each head is built: calibration data are meant to
    be a few sequences.
    """
    check_mode(mode)
    if (target_keep is None) == (target_mass is None):
        raise ValueError("give exactly one of target_keep and target_mass")
    target = float(target_keep if target_keep is not None else target_mass)
    if not (0 < target <= 1) or math.isnan(target):
        raise ValueError(f"the target must be in (0, 1]; got {target}")
    if spread not in ("even", "mass"):
        raise ValueError(f"spread must be 'even' or 'mass'; got {spread!r}")
    if spread == "mass" and (target_keep is None or mode == "topk"):
        raise ValueError("spread='mass' shares a target_keep budget among the heads of a "
                         "threshold mode (relative, absolute, safe); "
                         f"got {'topk' if mode == 'topk' else 'target_mass'}")
    _, a = import_arrays({"q": q, "k": k, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask},
                         float_names=("q", "k"))
    host = {name: (None if x is None else host_copy(x)) for name, x in a.items()}
    lat = prepare_latte(host["q"], host["k"], host["k"][..., :1], threshold=0.0, mode="relative",
                        attn_mask=host["attn_mask"], key_padding_mask=host["key_padding_mask"],
                        is_causal=is_causal, scale=scale, exact_scores="int8", check_finite=True,
                        want_mass=False)
    heads = head_count(lat.inp.batch_shape)
    bh = lat.inp.q.shape[0]
    # Query rows at padding positions (self-attention) are not calibration data.
    real_rows = np.ones((bh, lat.inp.nq), dtype=bool)
    kpm = host["key_padding_mask"]
    if kpm is not None and lat.inp.nq == lat.inp.nk:
        kpm = np.asarray(kpm, dtype=bool).reshape(-1, lat.inp.nk)
        per_batch = bh // max(1, lat.inp.batch_shape[0]) if lat.inp.batch_shape else bh
        real_rows = kpm[np.minimum(np.arange(bh) // per_batch, kpm.shape[0] - 1)]
    out = np.zeros(heads, dtype=np.int64 if mode == "topk" else np.float64)
    sorted_keys, kept_mass = {}, {}  # per head: keep-order keys and their cumulative mass
    for h in range(heads):
        keys, masses, ranks, rows, counts = [], [], [], 0, []
        for b in range(h, bh, heads):
            key, probs, visible = _pairs_of_row(lat, b, mode)
            visible = visible & real_rows[b][:, None]
            keys.append(key[visible])
            masses.append(probs[visible])
            rows += int(np.count_nonzero(visible.any(axis=-1)))
            counts.append(visible.sum(axis=-1)[visible.any(axis=-1)])
            if mode == "topk":  # rank of each visible key in its row by estimate
                order = np.argsort(np.where(visible, key, np.inf), axis=-1, kind="stable")
                rank = np.empty_like(order)
                np.put_along_axis(rank, order, np.arange(key.shape[1])[None, :], axis=-1)
                ranks.append(rank[visible])
        key = np.concatenate(keys) if keys else np.zeros(0)
        if key.size == 0:
            out[h] = 1 if mode == "topk" else 0.0
            continue
        mass = np.concatenate(masses)
        if mode == "topk":
            per_row = np.concatenate(counts)
            if target_keep is not None:
                out[h] = max(1, math.ceil(target * per_row.mean() - 1e-9))
            else:
                kept_by_rank = np.cumsum(np.bincount(np.concatenate(ranks), weights=mass)) / rows
                out[h] = int(np.searchsorted(kept_by_rank, target - 1e-12)) + 1
            continue
        order = np.argsort(key, kind="stable")
        sorted_keys[h] = key[order]
        kept_mass[h] = np.cumsum(mass[order]) / rows
    if spread == "mass":
        # Relative and safe thresholds are >= 0, so a head keeps at least its keys at 0.
        floors = {h: (int(np.searchsorted(key, 0.0, side="right")) if mode != "absolute" else 0)
                  for h, key in sorted_keys.items()}
        target = _common_mass(kept_mass, target, floors)
    for h, key in sorted_keys.items():
        if target_keep is not None and spread == "even":
            index = max(0, math.ceil(target * key.size - 1e-9) - 1)
        else:
            index = _mass_index(kept_mass[h], target)
        theta = float(key[index])
        if mode == "absolute":
            out[h] = np.inf if theta == -np.inf else -theta - _NUDGE * max(1.0, abs(theta))
        else:
            out[h] = max(0.0, theta + _NUDGE * max(1.0, abs(theta)))
    return out


def _mass_index(kept_mass, target):
    """Index of the first pair (in keep order) at which a head's kept mass reaches ``target``."""
    return min(int(np.searchsorted(kept_mass, target - 1e-12)), kept_mass.size - 1)


def _common_mass(kept_mass, target_keep, floors=None):
    """The smallest mass share that, kept by every head, keeps ``target_keep`` of all pairs.

    ``kept_mass[h]`` is head ``h``'s kept mass after each pair in its keep order
    (non-decreasing), so the pairs kept for a mass share ``m`` grow with ``m``; a
    bisection on ``m`` finds where their total first reaches the budget. ``floors[h]``:
    the pairs head ``h`` keeps whatever its threshold (counted towards the budget).
    """
    floors = floors or {}
    total = sum(km.size for km in kept_mass.values())
    budget = math.ceil(target_keep * total - 1e-9)

    def kept(m):
        return sum(max(_mass_index(km, m) + 1, floors.get(h, 0)) for h, km in kept_mass.items())

    lo, hi = 0.0, 1.0 + 1e-9
    if kept(hi) < budget:  # every pair is needed
        return hi
    for _ in range(100):  # to float resolution: 2^-100 << the spacing of the masses
        mid = 0.5 * (lo + hi)
        if kept(mid) >= budget:
            hi = mid
        else:
            lo = mid
    return hi

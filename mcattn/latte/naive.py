"""LATTE, the readable reference (NumPy, or CuPy through ``xp``): float64 and exact integers.

Everything here works on the canonical inputs of :class:`LatteInputs` (``q [BH, Nq, d]``,
``k [BH, Nk, d]``, ``v [BH, Nk, dv]``, one threshold per batch row) and is the
definition the fast kernels are tested against.

The keep rule in exact arithmetic
---------------------------------
With ``hh = hi(q8) . hi(k8)`` (an integer) the estimate is ``est_ij = c_i * u_ij`` where
``c_i = scale * s_q[i]`` and ``u_ij = 256 * hh_ij * s_k[j]`` (plus ``bias_ij / c_i`` under
an additive mask). The scales are float32 numbers, so ``u`` is an *exact* float64
product (at most 24 + 22 significant bits), and every rule compares ``u`` with one
per-row float64 number (``max u - theta / c``, ...) computed by one division and one
subtraction. Every backend computes the same IEEE operations in the same order, so the
kept sets are identical on every backend, bit for bit.
"""

import numpy as np

__all__ = [
    "MODES",
    "quantize_rows",
    "nibbles",
    "estimate_units",
    "safe_error_units",
    "keep_rows",
    "kept_mask",
    "true_probs",
    "forward",
    "soft_forward",
    "reference_backward",
    "backward",
]

#: Filter modes and the integer code the kernels take.
MODES = {"relative": 0, "absolute": 1, "topk": 2, "safe": 3}


def quantize_rows(x):
    """Symmetric int8 quantisation per row.

    Parameters
    ----------
    x : array, shape ``[..., N, d]``, float

    Returns
    -------
    x8 : array of int8, shape ``[..., N, d]``
        ``clip(rint(x / scale), -127, 127)``.
    scale : array of float32, shape ``[..., N, 1]``
        ``max|x_row| / 127`` rounded to float32 (as an int8 accelerator stores it); 1 for
        a zero row. ``|x - scale * x8| <= scale / 2`` elementwise.
    """
    xp = _xp(x)
    d = x.shape[-1] if x.ndim else 1
    rows = x.reshape(-1, d)
    x8 = xp.empty(rows.shape, dtype=np.int8)
    scale = xp.empty((rows.shape[0], 1), dtype=np.float32)
    step = max(1, (1 << 18) // max(d, 1))  # rows per chunk: float64 temporaries stay small
    for r0 in range(0, rows.shape[0], step):
        xf = rows[r0:r0 + step].astype(np.float64)
        amax = xp.abs(xf).max(axis=-1, keepdims=True) if d else xp.zeros((xf.shape[0], 1))
        s = (amax / 127.0).astype(np.float32)
        s = xp.where(s > 0, s, np.float32(1.0)).astype(np.float32)
        scale[r0:r0 + step] = s
        x8[r0:r0 + step] = xp.clip(xp.rint(xf / s.astype(np.float64)), -127, 127)
    return x8.reshape(x.shape), scale.reshape(x.shape[:-1] + (1,))


def nibbles(x8):
    """``(hi, lo)`` of int8 values: ``x8 = 16 * hi + lo``, ``hi`` in [-8, 7], ``lo`` in [0, 15]."""
    hi = x8.astype(np.int64) >> 4  # arithmetic shift: the signed high nibble
    lo = x8.astype(np.int64) & 15
    return hi, lo


def _xp(x):
    from .._validate import namespace_of

    return namespace_of(x)


def _bias_over_c(inp, b, c):
    """``bias / c`` of batch row ``b`` as ``[Nq, Nk]`` float64, and the visibility mask."""
    xp = inp.xp
    nq, nk = inp.nq, inp.nk
    visible = xp.ones((nq, nk), dtype=bool)
    extra = None
    mask = inp.mask
    if mask.bias is not None:
        bias = mask.bias[int(mask.mask_index[b])].astype(np.float64)
        bias = xp.broadcast_to(bias, (nq, nk))
        visible = visible & (bias > -np.inf)
        extra = xp.where(visible, bias, 0.0) / c[:, None]
    if mask.is_causal:
        visible = visible & (xp.arange(nk)[None, :] <= xp.arange(nq)[:, None])
    return visible, extra


def _integer_dots(a, b):
    """``a @ b.T`` of small integers, exactly, as a float64 (BLAS) product.

    Every product and partial sum is an integer below ``127^2 d < 2^53``, so float64
    represents it exactly, whatever the summation order: the result equals the int64
    product (which NumPy computes without BLAS, many times slower).
    """
    return a.astype(np.float64) @ b.astype(np.float64).T


def estimate_units(lat, b):
    """``u [Nq, Nk]`` (float64, exact before the bias) and ``c [Nq]`` of batch row ``b``.

    The estimate in logit units is ``c[:, None] * u``.
    """
    hq, _ = nibbles(lat.q8[b])
    hk, _ = nibbles(lat.k8[b])
    hh = _integer_dots(hq, hk)
    c = lat.inp.scale * lat.s_q[b].astype(np.float64)
    u = (256 * hh).astype(np.float64) * lat.s_k[b].astype(np.float64)[None, :]
    return u, c


def safe_error_units(q8, k8):
    """The estimate's error bound in units of ``s_q s_k``: ``[Nq, Nk]`` float64 (multiples of 1/4).

    ``|q.k - s_q s_k 256 hi(q8).hi(k8)| <= s_q s_k E`` with
    ``E = 16 (|hi_q|.lo_k + lo_q.|hi_k|) + lo_q.lo_k + (|q8|_1 + |k8|_1) / 2 + d / 4``:
    the dropped low nibbles (componentwise absolute values) plus the int8 rounding
    (``|q - s_q q8| <= s_q / 2`` per component).
    """
    hq, lq = nibbles(q8)
    hk, lk = nibbles(k8)
    d = q8.shape[-1]
    xp = _xp(q8)
    nibble = 16 * (xp.abs(hq) @ lk.T + lq @ xp.abs(hk).T) + lq @ lk.T
    l1q = xp.abs(q8.astype(np.int64)).sum(-1)
    l1k = xp.abs(k8.astype(np.int64)).sum(-1)
    return nibble.astype(np.float64) + (2 * (l1q[:, None] + l1k[None, :]) + d) / 4.0


def keep_rows(lat, b):
    """The kept set of batch row ``b``: bool ``[Nq, Nk]`` (see the module docstring)."""
    xp = lat.inp.xp
    u, c = estimate_units(lat, b)
    visible, extra = _bias_over_c(lat.inp, b, c)
    if extra is not None:
        u = u + extra
    theta = float(lat.theta[b])
    ninf = -np.inf
    if lat.mode == "safe":
        err = safe_error_units(lat.q8[b], lat.k8[b]) * lat.s_k[b].astype(np.float64)[None, :]
        lower = u - err
        upper = u + err
        low_max = xp.where(visible, lower, ninf).max(axis=-1, keepdims=True)
        return visible & (upper >= low_max - theta / c[:, None])
    top = xp.where(visible, u, ninf).max(axis=-1, keepdims=True)
    if lat.mode == "relative":
        cut = top - theta / c[:, None]
    elif lat.mode == "absolute":
        cut = xp.minimum(theta / c[:, None], top)
    else:  # topk: keep u >= the k-th largest visible value (ties at the cut are all kept)
        kk = int(theta)
        count = visible.sum(axis=-1, keepdims=True)
        ordered = -xp.sort(-xp.where(visible, u, ninf), axis=-1)
        kth = ordered[:, min(kk, u.shape[1]) - 1][:, None] if u.shape[1] else top
        cut = xp.where(count <= kk, ninf, kth)
    return visible & (u >= cut)


def kept_mask(lat):
    """The kept sets of every batch row: bool ``[BH, Nq, Nk]``."""
    xp = lat.inp.xp
    out = xp.zeros((lat.inp.q.shape[0], lat.inp.nq, lat.inp.nk), dtype=bool)
    for b in range(out.shape[0]):
        out[b] = keep_rows(lat, b)
    return out


def _true_scores(inp, b):
    """``scale q k^T + bias`` in float64 with invisible keys at -inf: ``[Nq, Nk]``."""
    xp = inp.xp
    s = inp.scale * (inp.q[b].astype(np.float64) @ inp.k[b].astype(np.float64).T)
    ones = xp.ones(inp.nq, dtype=np.float64)
    visible, _ = _bias_over_c(inp, b, ones)
    if inp.mask.bias is not None:
        bias = xp.broadcast_to(inp.mask.bias[int(inp.mask.mask_index[b])].astype(np.float64), s.shape)
        s = s + xp.where(visible, bias, 0.0)
    return xp.where(visible, s, -np.inf)


def _softmax(s, weight=None):
    xp = _xp(s)
    top = s.max(axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    p = xp.exp(s - top)
    if weight is not None:
        p = p * weight
    total = p.sum(axis=-1, keepdims=True)
    return xp.where(total > 0, p / xp.where(total > 0, total, 1.0), 0.0)


def true_probs(inp, b):
    """Exact attention probabilities of batch row ``b`` (float64 ``[Nq, Nk]``)."""
    return _softmax(_true_scores(inp, b))


def _kept_scores(lat, b, keep):
    xp = lat.inp.xp
    inp = lat.inp
    if lat.exact_scores == "float":
        s = _true_scores(inp, b)
    else:  # int8 scores q8.k8 = 256 hi.hi + 16 (hi.lo + lo.hi) + lo.lo, exact integers
        dots = _integer_dots(lat.q8[b], lat.k8[b])
        c = inp.scale * lat.s_q[b].astype(np.float64)
        s = c[:, None] * lat.s_k[b].astype(np.float64)[None, :] * dots.astype(np.float64)
        if inp.mask.bias is not None:
            bias = xp.broadcast_to(inp.mask.bias[int(inp.mask.mask_index[b])].astype(np.float64), s.shape)
            s = s + xp.where(keep, bias, 0.0)
    return xp.where(keep, s, -np.inf)


def forward(lat):
    """LATTE attention of canonical inputs, with the kept sets and realised dropped mass.

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs

    Returns
    -------
    out : array, shape ``[BH, Nq, dv]`` (compute dtype)
    kept : array of int64, shape ``[BH, Nq]``
        Keys kept per query row.
    dropped : array of float64, shape ``[BH, Nq]`` or None
        Exact attention mass of the dropped keys per row (with ``lat.want_mass``).
    """
    inp = lat.inp
    xp = inp.xp
    bh = inp.q.shape[0]
    out = xp.zeros((bh, inp.nq, inp.value_dim), dtype=inp.dtype)
    kept = xp.zeros((bh, inp.nq), dtype=np.int64)
    dropped = xp.zeros((bh, inp.nq), dtype=np.float64) if lat.want_mass else None
    for b in range(bh):
        keep = keep_rows(lat, b)
        kept[b] = keep.sum(axis=-1)
        p = _softmax(_kept_scores(lat, b, keep))
        out[b] = (p @ inp.v[b].astype(np.float64)).astype(inp.dtype)
        if dropped is not None:
            dropped[b] = xp.where(keep, 0.0, true_probs(inp, b)).sum(axis=-1)
    return out, kept, dropped


def soft_weights(lat, b, temperature):
    """Soft keep weights of batch row ``b``: ``sigmoid((est - (max est - theta)) / temperature)``.

    Returns ``w [Nq, Nk]`` (0 on invisible keys), ``visible [Nq, Nk]`` and ``at_top [Nq, Nk]``
    (the keys where the estimate reaches the row maximum: the backward needs them), float64.
    """
    xp = lat.inp.xp
    u, c = estimate_units(lat, b)
    visible, extra = _bias_over_c(lat.inp, b, c)
    if extra is not None:
        u = u + extra
    est = c[:, None] * u
    top = xp.where(visible, est, -np.inf).max(axis=-1, keepdims=True)
    z = (est - (top - float(lat.theta[b]))) / temperature
    w = xp.where(visible, 0.5 * (1.0 + xp.tanh(0.5 * xp.where(visible, z, 0.0))), 0.0)
    return w, visible, visible & (est == top)


def soft_forward(lat, temperature):
    """The soft-mask forward: weights ``sigmoid((est - (max est - theta)) / temperature) exp(s)``.

    Returns ``out [BH, Nq, dv]`` and the mean soft-mask value per row ``[BH, Nq]`` (the
    soft keep fraction).
    """
    inp = lat.inp
    xp = inp.xp
    bh = inp.q.shape[0]
    out = xp.zeros((bh, inp.nq, inp.value_dim), dtype=inp.dtype)
    frac = xp.zeros((bh, inp.nq), dtype=np.float64)
    for b in range(bh):
        soft, visible, _ = soft_weights(lat, b, temperature)
        p = _softmax(_kept_scores(lat, b, visible), weight=soft)
        out[b] = (p @ inp.v[b].astype(np.float64)).astype(inp.dtype)
        count = visible.sum(axis=-1)
        frac[b] = xp.where(count > 0, soft.sum(axis=-1) / xp.maximum(count, 1), 0.0)
    return out, frac


# ----------------------------------------------------------------------------- backward


def reference_backward(lat, dout, kept=None, soft=False, temperature=1.0):
    """LATTE's gradients on canonical inputs, written with array operations (float64).

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
    dout : array, ``[BH, Nq, dv]``
    kept : array of bool, ``[BH, Nq, Nk]``
        The kept sets (hard mask); ignored with ``soft``.
    soft : bool
    temperature : float

    Returns
    -------
    dq, dk, dv : arrays of float64, ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]``
    dtheta : array of float64, ``[BH]``
        The threshold's gradient per batch row (zero with the hard mask).
    """
    inp = lat.inp
    xp = inp.xp
    f64 = np.float64
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    tau = float(temperature)
    dq = xp.zeros((bh, nq, inp.head_dim), dtype=f64)
    dk = xp.zeros((bh, nk, inp.head_dim), dtype=f64)
    dv = xp.zeros((bh, nk, inp.value_dim), dtype=f64)
    dtheta = xp.zeros(bh, dtype=f64)
    for b in range(bh):
        if soft:
            w, keep, at_top = soft_weights(lat, b, tau)
        else:
            w, keep = None, kept[b]
        p = _softmax(_kept_scores(lat, b, keep), weight=w)
        g = dout[b].astype(f64)
        dp = g @ inp.v[b].astype(f64).T
        ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
        dv[b] = p.T @ g
        if soft:
            dz = ds * (1.0 - w) / tau
            dtheta[b] = dz.sum()
            ties = at_top.sum(axis=-1, keepdims=True)
            ds = ds + dz - at_top * (dz.sum(axis=-1, keepdims=True) / xp.maximum(ties, 1))
        dq[b] = inp.scale * (ds @ inp.k[b].astype(f64))
        dk[b] = inp.scale * (ds.T @ inp.q[b].astype(f64))
    return dq, dk, dv, dtheta


def backward(lat, kept, dout):
    """The hard-mask backward kernel (``numpy`` and ``cupy``): :func:`reference_backward`'s
    ``dq, dk, dv`` for the kept sets ``kept`` ``[BH, Nq, Nk]``."""
    return reference_backward(lat, dout, kept)[:3]

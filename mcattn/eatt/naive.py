"""E-Att, the readable reference (NumPy, or CuPy through ``xp``).

Everything here is the definition the fast kernels are tested against:

* ``binarize(x) = 1[x > 0]``;
* ``pack_bits``: 0/1 codes ``[..., d]`` -> ``uint64`` words ``[..., ceil(d/64)]``, bit
  ``i`` of word ``w`` holding element ``64 w + i`` (padding bits are 0);
* ``selective_projection``: ``b @ w + bias`` as the sum of the rows of ``w`` that ``b``
  selects (additions only);
* ``l1_distance``: ``sum_c |q_ic - k_jc|``; ``hamming_distance``: ``popcount(qb xor kb)``;
* ``forward``: ``softmax(-scale * distance + bias) v`` on canonical inputs.
"""

import math

import numpy as np

from .._validate import namespace_of

__all__ = ["binarize", "pack_bits", "unpack_bits", "popcount64", "selective_projection",
           "l1_distance", "hamming_distance", "forward", "binarize_surrogate", "reference_backward",
           "backward_l1"]

_CHUNK = 1 << 22  # numbers per temporary block


def binarize(x):
    """``x > 0`` as a boolean array of the same shape."""
    return x > 0


def pack_bits(b):
    """Pack 0/1 codes ``[..., d]`` (bool or 0/1 numbers) into ``uint64`` ``[..., ceil(d/64)]``."""
    xp = namespace_of(b)
    d = b.shape[-1]
    words = (d + 63) // 64
    bits = (b != 0).astype(np.uint64)
    pad = words * 64 - d
    if pad:
        bits = xp.concatenate([bits, xp.zeros(bits.shape[:-1] + (pad,), np.uint64)], axis=-1)
    bits = bits.reshape(bits.shape[:-1] + (words, 64))
    # Bits are distinct, so the sum of the shifted bits is their OR.
    return (bits << xp.arange(64, dtype=np.uint64)).sum(axis=-1, dtype=np.uint64)


def unpack_bits(words, d):
    """Inverse of :func:`pack_bits`: ``uint64`` ``[..., W]`` -> bool ``[..., d]``."""
    xp = namespace_of(words)
    bits = (words[..., None] >> xp.arange(64, dtype=np.uint64)) & np.uint64(1)
    return bits.reshape(words.shape[:-1] + (words.shape[-1] * 64,))[..., :d].astype(bool)


def popcount64(x):
    """Set bits of each ``uint64`` (SWAR bit counting, for NumPy and CuPy alike)."""
    x = x.astype(np.uint64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def selective_projection(bits, w, bias=None):
    """Sum of the rows of ``w`` selected by ``bits``, plus ``bias``.

    Parameters
    ----------
    bits : bool array, shape ``[T, d_in]``
    w : array, shape ``[d_in, d_out]``
    bias : array, shape ``[d_out]``, optional

    Returns
    -------
    array, shape ``[T, d_out]``, dtype of ``w``
    """
    xp = namespace_of(w)
    t, d_in = bits.shape
    d_out = w.shape[1]
    out = xp.zeros((t, d_out), dtype=w.dtype)
    step = max(1, _CHUNK // max(1, d_in * d_out))
    zero = w.dtype.type(0)
    for t0 in range(0, t, step):
        chosen = xp.where(bits[t0 : t0 + step, :, None], w[None], zero)  # select, no multiply
        out[t0 : t0 + step] = chosen.sum(axis=1)
    if bias is not None:
        out += bias
    return out


def l1_distance(q, k):
    """``[..., Nq, Nk]`` L1 distances ``sum_c |q_ic - k_jc|`` of ``q [..., Nq, d]``, ``k [..., Nk, d]``."""
    xp = namespace_of(q)
    nq, d = q.shape[-2:]
    nk = k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    out = xp.empty(lead + (nq, nk), dtype=np.result_type(q.dtype, k.dtype))
    step = max(1, _CHUNK // max(1, nk * d * int(np.prod(lead, dtype=np.int64))))
    for i0 in range(0, nq, step):
        diff = q[..., i0 : i0 + step, None, :] - k[..., None, :, :]
        out[..., i0 : i0 + step, :] = xp.abs(diff).sum(axis=-1)
    return out


def hamming_distance(qb, kb):
    """``[..., Nq, Nk]`` int64 ``popcount(qb xor kb)`` of packed codes ``[..., Nq, W]``, ``[..., Nk, W]``."""
    return popcount64(qb[..., :, None, :] ^ kb[..., None, :, :]).sum(axis=-1)


def _score_block(inp, alignment, codes, b, i0, i1):
    """Scores ``-scale * distance + bias`` (causal applied) of rows ``i0:i1`` of batch row ``b``."""
    xp = inp.xp
    if alignment == "l1":
        dist = l1_distance(inp.q[b, i0:i1], inp.k[b])
    else:
        dist = hamming_distance(codes[0][b, i0:i1], codes[1][b]).astype(inp.dtype)
    s = -inp.dtype.type(inp.scale) * dist
    mask = inp.mask
    if mask.bias is not None:
        rows = slice(i0, i1) if mask.bias.shape[1] > 1 else slice(0, 1)
        s = s + mask.bias[int(mask.mask_index[b]), rows]
    if mask.is_causal:
        visible = xp.arange(inp.nk)[None, :] <= xp.arange(i0, i1)[:, None]
        s = xp.where(visible, s, inp.dtype.type(-np.inf))
    return s


def forward(inp, alignment="l1", codes=None):
    """E-Att attention of canonical inputs.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``, mask, scale.
    alignment : {"l1", "hamming"}
    codes : (qb, kb), required for ``"hamming"``
        Packed sign codes ``[BH, Nq, W]`` and ``[BH, Nk, W]`` (``uint64``).

    Returns
    -------
    array, shape ``[BH, Nq, dv]``
        ``softmax(-scale * distance + bias) v``; a row with no visible key is zero.
    """
    xp = inp.xp
    dt = inp.dtype.type
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    out = xp.zeros((bh, nq, inp.value_dim), dtype=inp.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    step = max(1, _CHUNK // max(1, nk * inp.head_dim))
    for b in range(bh):
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            s = _score_block(inp, alignment, codes, b, i0, i1)
            top = s.max(axis=-1, keepdims=True)
            top = xp.where(xp.isfinite(top), top, dt(0))
            p = xp.exp(s - top)
            total = p.sum(axis=-1, keepdims=True)
            p = xp.where(total > 0, p / xp.where(total > 0, total, dt(1)), dt(0))
            out[b, i0:i1] = p @ inp.v[b]
    return out


# ----------------------------------------------------------------------------- backward

_SURROGATE_PEAK = math.sqrt(2.0 / math.pi)


def binarize_surrogate(x):
    """The derivative the backward uses for ``binarize(x) = 1[x > 0]``: ``sqrt(2/pi) exp(-2 x^2)``.

    The straight-through estimator of the design's E-Att spec (``docs/methods/eatt.md``:
    training "uses the surrogate gradient sqrt(2/pi) exp(-2x^2)"; Wan et al., 2022): the
    step is replaced, in the backward only, by the derivative of ``Phi(2 x)`` (``Phi``
    the standard normal CDF), a smooth step of width about 1/2 whose derivative
    integrates to 1 over the line, like the step's.

    Parameters
    ----------
    x : array
        Float (NumPy or CuPy).

    Returns
    -------
    array, same shape and dtype as ``x``
    """
    return _SURROGATE_PEAK * namespace_of(x).exp(-2.0 * x * x)


def _row_block(inp, b, i0, i1):
    """Bias ``[r, Nk]`` (float64, 0 where no mask) and visibility of rows ``i0:i1`` of batch row ``b``."""
    xp = inp.xp
    r, nk = i1 - i0, inp.nk
    bias = xp.zeros((r, nk), dtype=np.float64)
    visible = xp.ones((r, nk), dtype=bool)
    mask = inp.mask
    if mask.bias is not None:
        rows = slice(i0, i1) if mask.bias.shape[1] > 1 else slice(0, 1)
        raw = xp.broadcast_to(mask.bias[int(mask.mask_index[b]), rows].astype(np.float64), (r, nk))
        visible = visible & (raw > -np.inf)
        bias = xp.where(visible, raw, 0.0)
    if mask.is_causal:
        visible = visible & (xp.arange(nk)[None, :] <= xp.arange(i0, i1)[:, None])
    return bias, visible


def _softmax_grad(s, visible, g, vb):
    """``P`` and ``dS`` of score rows ``s`` ``[r, Nk]`` (invisible entries ignored)."""
    xp = namespace_of(s)
    s = xp.where(visible, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    e = xp.exp(s - top)
    total = e.sum(axis=-1, keepdims=True)
    p = xp.where(total > 0, e / xp.where(total > 0, total, 1.0), 0.0)
    dp = g @ vb.T
    return p, p * (dp - (p * dp).sum(axis=-1, keepdims=True))


def reference_backward(inp, dout, alignment="l1"):
    """E-Att's gradients on canonical inputs, written with array operations (float64).

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``, mask, scale.
    dout : array, shape ``[BH, Nq, dv]``
    alignment : {"l1", "hamming"}

    Returns
    -------
    dq, dk, dv : arrays of float64, ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]``
        ``hamming``: through :func:`binarize_surrogate` (see the module docstring).
    """
    xp = inp.xp
    f64 = np.float64
    bh, nq, nk, d = inp.q.shape[0], inp.nq, inp.nk, inp.head_dim
    dq = xp.zeros((bh, nq, d), dtype=f64)
    dk = xp.zeros((bh, nk, d), dtype=f64)
    dv = xp.zeros((bh, nk, inp.value_dim), dtype=f64)
    if bh == 0 or nq == 0 or nk == 0:
        return dq, dk, dv
    scale = float(inp.scale)
    step = max(1, _CHUNK // max(1, nk * (d if alignment == "l1" else 1)))
    for b in range(bh):
        qb, kb, vb = (x[b].astype(f64) for x in (inp.q, inp.k, inp.v))
        gb = dout[b].astype(f64)
        if alignment == "hamming":
            cq, ck = (qb > 0).astype(f64), (kb > 0).astype(f64)
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            bias, visible = _row_block(inp, b, i0, i1)
            if alignment == "l1":
                diff = qb[i0:i1, None, :] - kb[None, :, :]  # [r, Nk, d]
                s = -scale * xp.abs(diff).sum(axis=-1) + bias
            else:
                dist = cq[i0:i1].sum(-1)[:, None] + ck.sum(-1)[None, :] - 2.0 * (cq[i0:i1] @ ck.T)
                s = -scale * dist + bias
            p, ds = _softmax_grad(s, visible, gb[i0:i1], vb)
            dv[b] += p.T @ gb[i0:i1]
            if alignment == "l1":
                sign = xp.sign(diff)
                dq[b, i0:i1] = -scale * xp.einsum("rj,rjc->rc", ds, sign)
                dk[b] += scale * xp.einsum("rj,rjc->jc", ds, sign)
            else:  # d dist / d cq = 1 - 2 ck, d dist / d ck = 1 - 2 cq (multilinear form)
                dq[b, i0:i1] = -scale * (ds.sum(-1)[:, None] - 2.0 * (ds @ ck))
                dk[b] += -scale * (ds.sum(0)[:, None] - 2.0 * (ds.T @ cq[i0:i1]))
        if alignment == "hamming":
            dq[b] *= binarize_surrogate(qb)
            dk[b] *= binarize_surrogate(kb)
    return dq, dk, dv


def backward_l1(inp, dout):
    """The L1 backward kernel (``numpy`` and ``cupy``): :func:`reference_backward` with
    ``alignment="l1"``."""
    return reference_backward(inp, dout, "l1")

"""E-Att for training: gradients of L1 and Hamming alignment, and the binarise surrogate.

The forward is :func:`mcattn.eatt.attention` itself (no residuals). With ``P`` the
attention probabilities and ``dS = P * (dO V^T - rowsum(dO * O))`` the gradient of the
scores, ``dV = P^T dO`` and:

``alignment="l1"`` (the paper)
    ``s_ij = -scale ||q_i - k_j||_1 + bias_ij``, so with the subgradient
    ``sign(q_ic - k_jc)`` (``sign(0) = 0``):
    ``dq_ic = -scale sum_j dS_ij sign(q_ic - k_jc)`` and
    ``dk_jc = scale sum_i dS_ij sign(q_ic - k_jc)``. Exact wherever no ``q_ic == k_jc``.
    Kernels: a NumPy/CuPy reference (:func:`reference_backward`) and a Numba CPU kernel
    (:func:`mcattn.eatt.cpu.backward_l1`) that walks the keys of one query row at a time
    (``O(Nk)`` memory per thread, nothing ``Nq x Nk``).

``alignment="hamming"`` (the paper's binarisation applied to ``q`` and ``k``)
    The forward compares the codes ``b = 1[x > 0]`` of ``q`` and ``k``:
    ``dist_ij = sum_c |bq_ic - bk_jc|``, which on 0/1 codes equals the multilinear form
    ``sum_c bq_ic + bk_jc - 2 bq_ic bk_jc``; the backward differentiates that form
    (``d dist / d bq_ic = 1 - 2 bk_jc``: a code that agrees is pushed apart as well as
    one that differs is pulled together, unlike the L1 subgradient, which is zero on
    agreeing codes) and passes through the binarisation **straight-through** with the
    paper's surrogate derivative (:func:`binarize_surrogate`,
    ``sqrt(2/pi) exp(-2 x^2)``, the density of ``N(0, 1/4)``; the forward keeps the hard
    codes). So ``dq = surrogate(q) * (-scale) (rowsum(dS) - 2 dS bk)`` and likewise for ``k``.
    Array code (NumPy/CuPy), ``O(Nq Nk)`` per block of query rows.

Where binarisation happens in a model. :func:`mcattn.eatt.layer` binarises the hidden
states before selective projections (the paper's block, forward only). Inside a
transformers model (:func:`mcattn.frameworks.torch.use_method`) the model's own ``q`` and
``k`` projections are kept, dense; ``alignment="hamming"`` binarises their outputs, and
the surrogate carries the gradient back through the codes to ``q``, ``k`` and so to the
query/key weights. ``alignment="l1"`` (the default) has no binarisation: the weights
get the L1 subgradient.

Masks (boolean, additive, key padding) and ``is_causal`` as in the forward; masks get no
gradient; gradients of broadcast inputs are summed over the broadcast dims.
"""

import math

import numpy as np

from .._dispatch import Kernel, select_kernel
from .._validate import prepare_attention, sum_to_shape
from . import attention

__all__ = ["forward", "backward", "reference_backward", "binarize_surrogate", "TRAINABLE",
           "BACKWARD_KERNELS"]

#: Knob arrays that receive gradients (none: E-Att's knob is the alignment).
TRAINABLE = ()

_ALL = frozenset({"mask", "causal"})
#: L1 backward kernels: ``(inp, dout [BH, Nq, dv]) -> (dq, dk, dv)`` (float64 for numpy/cupy).
BACKWARD_KERNELS = (
    Kernel("numba", "mcattn.eatt.cpu", "backward_l1", features=_ALL),
    Kernel("numpy", "mcattn.eatt.grad", "_reference_l1", features=_ALL),
    Kernel("cupy", "mcattn.eatt.grad", "_reference_l1", features=_ALL),
)

_CHUNK = 1 << 22  # numbers per temporary block of the reference

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
    return _SURROGATE_PEAK * _xp(x).exp(-2.0 * x * x)


def forward(q, k, v, *, alignment="l1", attn_mask=None, key_padding_mask=None, is_causal=False,
            scale=None, backend=None, check_finite=True):
    """:func:`mcattn.eatt.attention` and no residuals.

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
    residuals : tuple
        Empty.
    """
    out = attention(q, k, v, alignment=alignment, attn_mask=attn_mask,
                    key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                    backend=backend, check_finite=check_finite)
    return out, ()


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
    xp = _xp(s)
    s = xp.where(visible, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    e = xp.exp(s - top)
    total = e.sum(axis=-1, keepdims=True)
    p = xp.where(total > 0, e / xp.where(total > 0, total, 1.0), 0.0)
    dp = g @ vb.T
    return p, p * (dp - (p * dp).sum(axis=-1, keepdims=True))


def _xp(x):
    from .._validate import namespace_of

    return namespace_of(x)


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


def _reference_l1(inp, dout):
    return reference_backward(inp, dout, "l1")


def backward(q, k, v, out, residuals, dout, *, alignment="l1", attn_mask=None, key_padding_mask=None,
             is_causal=False, scale=None, backend=None, check_finite=True):
    """Gradients of E-Att with respect to ``q``, ``k``, ``v`` (see the module docstring).

    Parameters
    ----------
    q, k, v : arrays
        The forward's inputs, ``[..., Nq, d]``, ``[..., Nk, d]``, ``[..., Nk, dv]``.
    out : array, shape ``[..., Nq, dv]``
        The forward's output (not used).
    residuals : tuple
        From :func:`forward` (empty).
    dout : array, shape ``[..., Nq, dv]``
    alignment, attn_mask, key_padding_mask, is_causal, scale
        As in the forward call.
    backend : {None, "numpy", "numba", "cupy"}
        L1: the kernel (Numba on the CPU by default); Hamming: always array code.
    check_finite : bool
        Ignored (the forward checked).

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` in the shapes and dtypes of the inputs.
    """
    inp = prepare_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=False)
    if not inp.scale > 0:
        raise ValueError(f"scale must be positive for a distance alignment; got {inp.scale}")
    xp, bh = inp.xp, inp.q.shape[0]
    g = xp.ascontiguousarray(xp.broadcast_to(dout, inp.out_shape).reshape(bh, inp.nq, inp.value_dim),
                             dtype=inp.dtype)
    if alignment == "l1":
        kernel = select_kernel("eatt backward", BACKWARD_KERNELS, inp.problem(),
                               None if backend == "cuda" else backend)
        dq, dk, dv = kernel(inp, g)
    elif alignment == "hamming":
        dq, dk, dv = reference_backward(inp, g, "hamming")
    else:
        raise ValueError(f"alignment must be 'l1' or 'hamming'; got {alignment!r}")
    batch = tuple(inp.batch_shape)
    return {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
            "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
            "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}

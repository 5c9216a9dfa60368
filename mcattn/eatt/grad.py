"""E-Att for training: gradients of L1 and Hamming alignment, and the binarise surrogate.

The forward is :func:`mcattn.eatt.attention` itself (no residuals). With ``P`` the
attention probabilities and ``dS = P * (dO V^T - rowsum(dO * O))`` the gradient of the
scores, ``dV = P^T dO`` and:

``alignment="l1"`` (the paper)
    ``s_ij = -scale ||q_i - k_j||_1 + bias_ij``, so with the subgradient
    ``sign(q_ic - k_jc)`` (``sign(0) = 0``):
    ``dq_ic = -scale sum_j dS_ij sign(q_ic - k_jc)`` and
    ``dk_jc = scale sum_i dS_ij sign(q_ic - k_jc)``. Exact wherever no ``q_ic == k_jc``.
    Kernels: a NumPy/CuPy reference (:func:`mcattn.eatt.naive.reference_backward`) and a Numba CPU kernel
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


from .._dispatch import Kernel, select_kernel
from .._validate import prepare_attention, sum_to_shape
from . import naive
from .api import attention
from .naive import binarize_surrogate

__all__ = ["forward", "backward", "binarize_surrogate", "TRAINABLE", "BACKWARD_KERNELS"]

#: Knob arrays that receive gradients (none: E-Att's knob is the alignment).
TRAINABLE = ()

_ALL = frozenset({"mask", "causal"})
#: L1 backward kernels: ``(inp, dout [BH, Nq, dv]) -> (dq, dk, dv)`` (float64 for numpy/cupy).
BACKWARD_KERNELS = (
    Kernel("numba", "mcattn.eatt.cpu", "backward_l1", features=_ALL),
    Kernel("numpy", "mcattn.eatt.naive", "backward_l1", features=_ALL),
    Kernel("cupy", "mcattn.eatt.naive", "backward_l1", features=_ALL),
)

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
        dq, dk, dv = naive.reference_backward(inp, g, "hamming")
    else:
        raise ValueError(f"alignment must be 'l1' or 'hamming'; got {alignment!r}")
    batch = tuple(inp.batch_shape)
    return {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
            "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
            "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}

"""Exact attention for training: a forward that keeps what the backward needs, and the backward.

The framework adapters (``mcattn.frameworks.torch`` / ``jax`` / ``tensorflow``) call
these through the method registry; they take and return native arrays (NumPy on the
host, CuPy on a GPU). The residual is the rows' log-sum-exp, so the backward recomputes
the probabilities block by block in ``O(N d)`` memory (the FlashAttention recipe).
"""

from .._dispatch import Kernel, select_kernel
from .._validate import prepare_attention, sum_to_shape

__all__ = ["forward", "backward", "TRAINABLE", "FORWARD_KERNELS", "BACKWARD_KERNELS"]

_ALL = frozenset({"mask", "causal"})

#: Knob arrays that receive gradients (none: exact attention has no parameters).
TRAINABLE = ()

FORWARD_KERNELS = (
    Kernel("numba", "mcattn.exact.cpu", "forward_lse", features=_ALL),
    Kernel("numpy", "mcattn.exact.naive", "forward_lse", features=_ALL),
    # Head dims above 128: the CuPy launcher falls back to the array reference (naive).
    Kernel("cupy", "mcattn.exact.cupy", "forward_lse", features=_ALL),
    Kernel("cuda", "mcattn.exact.cuda", "forward_lse", max_head_dim=128, features=_ALL),
)
BACKWARD_KERNELS = (
    Kernel("numba", "mcattn.exact.cpu", "backward", features=_ALL),
    Kernel("numpy", "mcattn.exact.naive", "backward", features=_ALL),
    Kernel("cupy", "mcattn.exact.cupy", "backward", features=_ALL),
    Kernel("cuda", "mcattn.exact.cuda", "backward", max_head_dim=128, features=_ALL),
)


def forward(q, k, v, *, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None,
            backend=None, check_finite=True):
    """Exact attention and its residuals.

    Parameters
    ----------
    q, k, v : numpy.ndarray or cupy.ndarray
        ``[..., Nq, d]``, ``[..., Nk, d]``, ``[..., Nk, dv]`` (float32 or float64).
    attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As in :func:`mcattn.attention`.

    Returns
    -------
    out : array, shape ``[..., Nq, dv]`` (broadcast batch dims)
    residuals : tuple of arrays
        ``(lse,)``, ``lse`` of shape ``[..., Nq]``: what :func:`backward` needs besides the
        inputs and ``out``.
    """
    inp = prepare_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=check_finite)
    kernel = select_kernel("exact attention (training)", FORWARD_KERNELS, inp.problem(), backend)
    out, lse = kernel(inp)
    return out.reshape(inp.out_shape), (lse.reshape(tuple(inp.batch_shape) + (inp.nq,)),)


def backward(q, k, v, out, residuals, dout, *, attn_mask=None, key_padding_mask=None, is_causal=False,
             scale=None, backend=None, check_finite=True):
    """Gradients of exact attention with respect to ``q``, ``k``, ``v``.

    Parameters
    ----------
    q, k, v : arrays
        The forward's inputs.
    out : array, shape ``[..., Nq, dv]``
        The forward's output.
    residuals : tuple
        From :func:`forward`.
    dout : array, shape ``[..., Nq, dv]``
        Gradient of the loss with respect to ``out``.
    attn_mask, key_padding_mask, is_causal, scale, backend
        As in the forward call. ``check_finite`` is ignored (the forward checked).

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` in the shapes of ``q``, ``k``, ``v`` (gradients of
        broadcast inputs are summed over the broadcast dims).
    """
    inp = prepare_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=False)
    xp, bh = inp.xp, inp.q.shape[0]
    (lse,) = residuals
    out3 = xp.ascontiguousarray(out.reshape(bh, inp.nq, inp.value_dim), dtype=inp.dtype)
    dout3 = xp.ascontiguousarray(xp.broadcast_to(dout, inp.out_shape).reshape(out3.shape), dtype=inp.dtype)
    lse3 = xp.ascontiguousarray(lse.reshape(bh, inp.nq), dtype=inp.dtype)
    kernel = select_kernel("exact attention backward", BACKWARD_KERNELS, inp.problem(), backend)
    dq, dk, dv = kernel(inp, out3, lse3, dout3)
    batch = tuple(inp.batch_shape)
    return {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape),
            "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape),
            "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape)}

"""LATTE for training: gradients of the hard and the soft (trainable-threshold) forms.

The forward is :func:`mcattn.latte.attention` itself (no residuals: the backward
recomputes the kept sets, which every backend computes identically, bit for bit). The
backward's reference is written with array operations (NumPy on the host, CuPy on a
GPU), one batch row at a time, ``O(Nq Nk)`` memory per batch row
(:func:`mcattn.latte.naive.reference_backward`); the hard mask also has a Numba CPU kernel that visits the
kept keys only (:func:`mcattn.latte.cpu.backward`; the kept sets themselves are an
``[BH, Nq, Nk]`` boolean array), and on CuPy with ``config.LATTE_TENSOR_CORES`` tensor-core
kernels that recompute the kept sets per tile and never store them
(:func:`mcattn.latte.cupy.backward`, for the calls :func:`mcattn.latte.cupy.backward_tensor_cores`
accepts).

Hard mask (``soft=False``, every ``mode``)
    The kept set ``K_i`` is fixed by the forward's 4-bit estimate; the gradient is that of
    the softmax over the kept keys: with ``P`` the forward's probabilities,
    ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dq = scale dS k``,
    ``dk = scale dS^T q``. With ``exact_scores="float"`` this is the exact derivative
    wherever the kept set does not change (almost everywhere). With ``exact_scores="int8"``
    the kept scores ``s_q s_k q8.k8`` are piecewise constant in ``q`` and ``k``; the
    gradient is **straight-through**: the quantised score is treated as the float score
    ``scale q.k`` (``P`` is still the forward's, from the int8 scores).
    The threshold gets no gradient: the output is piecewise constant in it (its derivative
    is zero wherever it exists). :func:`backward` returns zeros for it (what the JAX and
    TensorFlow adapters, which cannot tell what is differentiated, receive), and the torch
    adapter refuses a threshold that requires grad with the hard mask
    (:func:`check_trainable`), since it would silently never learn.

Soft mask (``soft=True``, ``mode="relative"``)
    Every visible key ``j`` of query ``i`` is weighted by
    ``w_ij = sigmoid(z_ij)``, ``z_ij = (est_ij - (max_j' est_ij' - theta_h)) / temperature``
    (``est`` the MS4B estimate plus an additive mask), and
    ``out_i = sum_j w_ij exp(s_ij) v_j / sum_j w_ij exp(s_ij)``. With
    ``g = P * (dO V^T - rowsum(dO * O))`` (the gradient of ``log(w exp(s))``):
    ``d s = g``, ``d z = g (1 - w)``, ``d theta_h = sum over its rows of d z / temperature``;
    through the estimate, ``d est_ij = d z_ij / temperature`` minus, on the row's arg-max
    key(s), the row's sum of them (the max's subgradient, split evenly over tied maxima).
    The estimate (4-bit) and the int8 kept scores pass their gradient to ``q`` and ``k``
    straight-through (as ``scale q.k``), so ``dS = g + d est`` above goes to ``q`` and ``k``
    as in the hard case. The threshold's gradient is exact (it enters continuously);
    ``q``/``k`` gradients are those of that surrogate, tested against a float64 torch
    reference of it, not by finite differences of the quantised function.

Masks (boolean, additive, key padding) and ``is_causal`` as in the forward; masks get no
gradient; gradients of broadcast inputs are summed over the broadcast dims.
"""

import numpy as np

from .._array import host_copy, is_cupy
from .._dispatch import Kernel, select_kernel
from .._validate import sum_to_shape
from ..errors import GradientNotSupportedError
from . import naive
from ._inputs import head_count, prepare_latte
from .api import MASK_KERNELS, attention

__all__ = ["forward", "backward", "check_trainable", "TRAINABLE", "BACKWARD_KERNELS"]

#: Knob arrays that receive gradients (only with ``soft=True``).
TRAINABLE = ("threshold",)

_ALL = frozenset({"mask", "causal", "topk"})
#: Hard-mask backward kernels: ``(lat, kept [BH, Nq, Nk], dout [BH, Nq, dv]) -> (dq, dk, dv)``.
BACKWARD_KERNELS = (
    Kernel("numba", "mcattn.latte.cpu", "backward", features=_ALL),
    Kernel("numpy", "mcattn.latte.naive", "backward", features=_ALL),
    Kernel("cupy", "mcattn.latte.naive", "backward", features=_ALL),
)


def check_trainable(names, knobs):
    """Refuse trainable knobs that cannot learn under these settings.

    Called by the torch adapter with the knobs that require grad.

    Raises
    ------
    GradientNotSupportedError
        ``threshold`` requires grad while ``soft`` is False.
    """
    if "threshold" in names and not knobs.get("soft", False):
        raise GradientNotSupportedError(
            "latte's threshold gets a gradient only with the soft mask (soft=True, temperature=...): "
            "the hard kept set is piecewise constant in the threshold, so its derivative is zero "
            "wherever it exists; pass soft=True, or a threshold that does not require grad")


def forward(q, k, v, *, threshold, mode="relative", attn_mask=None, key_padding_mask=None,
            is_causal=False, scale=None, exact_scores="int8", soft=False, temperature=1.0,
            backend=None, check_finite=True):
    """:func:`mcattn.latte.attention` and no residuals (the backward recomputes the kept sets).

    Parameters and result as :func:`mcattn.latte.attention` (``return_info`` aside).

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
    residuals : tuple
        Empty.
    """
    out = attention(q, k, v, threshold=threshold, mode=mode, attn_mask=attn_mask,
                    key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                    exact_scores=exact_scores, soft=soft, temperature=temperature,
                    backend=backend, check_finite=check_finite)
    return out, ()


def backward(q, k, v, out, residuals, dout, *, threshold, mode="relative", attn_mask=None,
             key_padding_mask=None, is_causal=False, scale=None, exact_scores="int8", soft=False,
             temperature=1.0, backend=None, check_finite=True):
    """Gradients with respect to ``q``, ``k``, ``v`` and ``threshold`` (see the module docstring).

    Parameters
    ----------
    q, k, v : arrays
        The forward's inputs, ``[..., Nq, d]``, ``[..., Nk, d]``, ``[..., Nk, dv]``.
    out : array, shape ``[..., Nq, dv]``
        The forward's output (not used: the probabilities are recomputed in float64).
    residuals : tuple
        From :func:`forward` (empty).
    dout : array, shape ``[..., Nq, dv]``
        Gradient of the loss with respect to ``out``.
    threshold, mode, attn_mask, key_padding_mask, is_causal, scale, exact_scores, soft, temperature
        As in the forward call.
    backend : {None, "numpy", "numba", "cupy"}
        Hard mask: the kept-set and backward kernels (Numba on the CPU by default); the
        soft mask always runs the array code.
    check_finite : bool
        Ignored (the forward checked).

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv, "threshold": dtheta}`` in the shapes (and dtypes) of
        the inputs; ``dtheta`` is zero with the hard mask and has the shape of the given
        threshold (a number: a 0-d array), summed over the batch rows of each head.
    """
    if soft and mode != "relative":
        raise GradientNotSupportedError(f"latte's soft mask takes mode='relative'; got {mode!r}")
    lat = prepare_latte(q, k, v, threshold=threshold, mode=mode, attn_mask=attn_mask,
                        key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                        exact_scores=exact_scores, check_finite=False, want_mass=False)
    inp = lat.inp
    xp = inp.xp
    bh = inp.q.shape[0]
    g = xp.ascontiguousarray(xp.broadcast_to(dout, inp.out_shape).reshape(bh, inp.nq, -1))
    if soft:
        dq, dk, dv, dtheta = naive.reference_backward(lat, g, soft=True, temperature=temperature)
    else:
        backend = None if backend == "cuda" else backend
        tiles = None
        if is_cupy(inp.q) and backend in (None, "cupy"):
            from . import cupy as latte_cupy

            tiles = latte_cupy.backward_tensor_cores(lat)
        if tiles is not None:  # config.LATTE_TENSOR_CORES: kept sets recomputed per tile
            dq, dk, dv = latte_cupy.backward(lat, g)
        else:
            dq, dk, dv = _hard_backward(lat, g, mode, backend)
        dtheta = xp.zeros(bh, dtype=np.float64)
    batch = tuple(inp.batch_shape)
    grads = {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
             "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
             "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}
    heads = head_count(batch)
    per_head = dtheta.reshape(-1, heads).sum(axis=0) if bh else xp.zeros(heads, dtype=np.float64)
    grads["threshold"] = _threshold_grad(per_head, threshold)
    return grads


def _hard_backward(lat, g, mode, backend):
    """The hard mask's kept sets ``[BH, Nq, Nk]``, then a :data:`BACKWARD_KERNELS` kernel."""
    problem = lat.inp.problem({"topk"} if mode == "topk" else ())
    kept = select_kernel("latte kept_mask (training)", MASK_KERNELS, problem, backend)(lat)
    kernel = select_kernel("latte backward", BACKWARD_KERNELS, problem, backend)
    return kernel(lat, kept, g)


def _threshold_grad(per_head, threshold):
    """``per_head [H]`` reduced to the threshold's shape, on its device, in its float dtype."""
    shape = tuple(getattr(threshold, "shape", ()))
    dtype = getattr(threshold, "dtype", np.dtype(np.float64))
    if np.dtype(dtype).kind != "f":
        dtype = np.dtype(np.float64)
    grad = per_head.sum() if not shape else sum_to_shape(per_head, shape)
    if is_cupy(threshold):
        return grad.astype(dtype).reshape(shape)
    return np.asarray(host_copy(grad), dtype=dtype).reshape(shape)

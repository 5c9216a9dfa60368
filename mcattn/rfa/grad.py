"""Random feature attention for training: gradients of the drop-in estimator and its gate.

The forward is :func:`mcattn.rfa.attention` itself (no residuals: the backward
recomputes the features). The backward never forms the ``Nq x Nk`` matrix of feature
products: non-causal gradients go through the state ``S = F_k^T V``, ``z = F_k^T 1``;
causal and gated ones run the chunked form, a forward sweep over chunks carrying the
state and a reverse sweep carrying its gradient (:mod:`mcattn.rfa.naive` spells
the formulas out). Memory ``O(N m)`` per batch row (the features and their gradients),
time ``O(N C (m + dv) + N m dv)``.

Kernels: ``numba`` (:func:`mcattn.rfa.cpu.backward`, one task per batch row),
``numpy`` and ``cupy`` (:func:`mcattn.rfa.naive.backward`, array operations). The
``O(N^2)`` float64 reference is :func:`reference_backward` (formulas in
:func:`mcattn.rfa.naive.reference_backward`).

The gate ``g_t`` enters as ``log(1 - g_t)`` in key ``t``'s weight and as the decay
``D_ij = prod_{j < t <= i} g_t``. Since ``out`` is a ratio, scaling query ``i``'s row of
``A`` leaves it unchanged, so ``sum_j dA_ij A_ij = 0`` and the gradient of the cumulative
log-gate ``b_i`` is minus key ``i``'s share, ``-sum_i' dA_i'i A_i'i = -u_i`` with
``u_i = F_k[i] . dF_k[i]``; hence ``d log g_t = -sum_{i >= t} u_i`` and
``d log(1 - g_t) = u_t``.

Supported: positive features (``kind="positive"``), the drop-in form (``normalize=None``),
key masks (padding or per-key ``attn_mask``), causal with ``Nq == Nk``, the gate. The
denominator floor of the forward (``eps``) is treated as inactive.
"""

from .._dispatch import Kernel, select_kernel
from .._validate import sum_to_shape
from ..errors import GradientNotSupportedError
from . import attention, naive
from ._inputs import prepare_rfa, resolve_training_features

__all__ = ["forward", "backward", "reference_backward", "TRAINABLE", "BACKWARD_KERNELS"]

#: Knob arrays that receive gradients.
TRAINABLE = ("gate",)

_ALL = frozenset({"mask", "causal", "gate"})

#: The backward kernels, by backend.
BACKWARD_KERNELS = (
    Kernel("numba", "mcattn.rfa.cpu", "backward", features=_ALL),
    Kernel("numpy", "mcattn.rfa.naive", "backward", features=_ALL),
    Kernel("cupy", "mcattn.rfa.naive", "backward", features=_ALL),
)


def forward(q, k, v, *, features=None, num_features=None, kind="positive", seed=None, gate=None,
            normalize=None, chunk_size=None, eps=None, attn_mask=None, key_padding_mask=None,
            is_causal=False, scale=None, backend=None, check_finite=True):
    """:func:`mcattn.rfa.attention` and no residuals (the backward recomputes the features).

    Parameters and result as :func:`mcattn.rfa.attention`; ``seed`` or ``features`` is
    required (the backward must use the same features).
    """
    if normalize is not None:
        raise GradientNotSupportedError('rfa gradients are implemented for normalize=None only')
    feats = resolve_training_features(q, features, num_features, kind, seed)
    out = attention(q, k, v, features=feats, gate=gate, attn_mask=attn_mask,
                    key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                    chunk_size=chunk_size, eps=eps, backend=backend, check_finite=check_finite)
    return out, ()


def backward(q, k, v, out, residuals, dout, *, features=None, num_features=None, kind="positive",
             seed=None, gate=None, normalize=None, chunk_size=None, eps=None, attn_mask=None,
             key_padding_mask=None, is_causal=False, scale=None, backend=None, check_finite=True):
    """Gradients with respect to ``q``, ``k``, ``v`` and (when given) ``gate``.

    Parameters
    ----------
    q, k, v : arrays
        The forward's inputs, ``[..., Nq, d]``, ``[..., Nk, d]``, ``[..., Nk, dv]``.
    out : array ``[..., Nq, dv]``
        The forward's output.
    residuals : tuple
        From :func:`forward` (empty).
    dout : array ``[..., Nq, dv]``
        Gradient of the loss with respect to ``out``.
    features, num_features, kind, seed, gate, normalize, chunk_size, eps, attn_mask, \
key_padding_mask, is_causal, scale, backend
        As in the forward call (``chunk_size`` also sets the backward's chunks).
        ``check_finite`` is ignored (the forward checked).

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` (and ``"gate"``) in the shapes and dtypes of the
        inputs (gradients of broadcast inputs summed over the broadcast dims).
    """
    feats, rinp, inp = _prepare(q, k, v, features, num_features, kind, seed, gate, normalize,
                                chunk_size, eps, attn_mask, key_padding_mask, is_causal, scale)
    xp = rinp.xp
    nq, nk = q.shape[-2], k.shape[-2]
    if is_causal and nq != nk:
        raise GradientNotSupportedError("rfa gradients of causal attention need Nq == Nk")
    bh = rinp.q.shape[0]
    shape3 = (bh, nq, rinp.value_dim)
    o3 = xp.ascontiguousarray(xp.broadcast_to(out, inp.out_shape).reshape(shape3), dtype=rinp.dtype)
    g3 = xp.ascontiguousarray(xp.broadcast_to(dout, inp.out_shape).reshape(shape3), dtype=rinp.dtype)
    problem = inp.problem(extra_features=("gate",) if gate is not None else ())
    kernel = select_kernel("random feature attention backward", BACKWARD_KERNELS, problem, backend)
    if bh == 0 or nq == 0 or nk == 0:
        dq, dk = xp.zeros_like(rinp.q), xp.zeros_like(rinp.k)
        dv, key_u = xp.zeros_like(rinp.v), xp.zeros(rinp.k.shape[:2], rinp.dtype)
    else:
        dq, dk, dv, key_u = kernel(rinp, o3, g3)
    batch = tuple(inp.batch_shape)
    grads = {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
             "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
             "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}
    if gate is not None:
        # d log g_t = -sum_{i >= t} u_i (the decays), d log(1 - g_t) = u_t (key t's weight).
        dlog_g = -xp.flip(xp.cumsum(xp.flip(key_u, -1), -1), -1)
        log_g = rinp.log_gate
        g = xp.exp(log_g)
        masked = log_g == 0  # padding neither adds nor decays: no gradient
        one_minus = xp.where(masked, 1, 1 - g)
        dg = xp.where(masked, 0, dlog_g / g - key_u / one_minus)
        grads["gate"] = sum_to_shape(dg.reshape(batch + (nk,)), gate.shape).astype(gate.dtype)
    return grads


def reference_backward(q, k, v, out, residuals, dout, *, features=None, num_features=None,
                       kind="positive", seed=None, gate=None, normalize=None, chunk_size=None,
                       eps=None, attn_mask=None, key_padding_mask=None, is_causal=False,
                       scale=None, backend=None, check_finite=True):
    """The ``O(N^2)`` float64 reference of :func:`backward`, with the same arguments.

    Prepares the inputs as the forward did and calls :func:`mcattn.rfa.naive.reference_backward`
    (the formulas are there). ``backend`` and ``check_finite`` are ignored.

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` (and ``"gate"``) in the shapes of the inputs.
    """
    feats, rinp, inp = _prepare(q, k, v, features, num_features, kind, seed, gate, normalize,
                                chunk_size, eps, attn_mask, key_padding_mask, is_causal, scale)
    return naive.reference_backward(rinp, inp, feats, q, k, v, out, dout, gate=gate,
                                    is_causal=is_causal)


def _prepare(q, k, v, features, num_features, kind, seed, gate, normalize, chunk_size, eps,
             attn_mask, key_padding_mask, is_causal, scale):
    """The features and prepared inputs the forward used (the backward's checks first)."""
    if normalize is not None:
        raise GradientNotSupportedError('rfa gradients are implemented for normalize=None only')
    feats = resolve_training_features(q, features, num_features, kind, seed)
    rinp, inp = prepare_rfa(feats, q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            gate=gate, is_causal=is_causal, normalize=None, scale=scale,
                            chunk_size=chunk_size, eps=eps, check_finite=False)
    return feats, rinp, inp

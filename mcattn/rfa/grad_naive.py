"""Random feature attention for training: the ``O(N^2)`` reference backward.

Kept as the readable definition beside the chunked kernels of :mod:`mcattn.rfa.grad`
(which the adapters use); tests compare them. It forms, per batch row, the ``Nq x Nk``
matrix of feature products ``A_ij = phi(q_i) . phi(k_j) D_ij`` (``D`` the causal and gate
decays) in float64: ``O(N^2)`` memory and time.

With ``out = A V / A 1``: ``dV = A^T (dout / den)``, ``dA = (dout / den) V^T - (dout . out /
den) 1^T``; the features' gradients follow from ``dA * D``; through the positive feature
map ``phi(x) = exp(W x' - |x'|^2 / 2)`` (``x' = sqrt(scale) x``),
``dx' = W^T (dphi * phi) - x' sum(dphi * phi)`` for keys (queries lose the second term:
a factor common to a query's row cancels in the ratio). The shifts used for stability
(row maxima, a per-row key constant) cancel in the ratio too, so they carry no gradient.
The gate ``g_t`` enters as ``(1 - g_t)`` on key ``t`` and as the decay
``D_ij = prod_{j < t <= i} g_t``.

Supported: positive features (``kind="positive"``), the drop-in form (``normalize=None``),
key masks (padding or per-key ``attn_mask``), causal with ``Nq == Nk``, the gate. The
denominator floor of the forward (``eps``) is treated as inactive.
"""

import numpy as np

from .._validate import sum_to_shape
from ..errors import GradientNotSupportedError
from . import _resolve_features
from ._inputs import prepare_rfa
from .naive import project

__all__ = ["backward", "resolve_training_features"]


def resolve_training_features(q, features, num_features, kind, seed):
    if features is None and seed is None:
        raise GradientNotSupportedError(
            "training with random features needs the same features in the forward and the "
            "backward: give seed= (or features=)")
    feats = _resolve_features(features, num_features, kind, seed, q)
    if feats.kind != "positive":
        raise GradientNotSupportedError(f"rfa gradients are implemented for kind='positive'; got "
                                        f"{feats.kind!r}")
    return feats


def backward(q, k, v, out, residuals, dout, *, features=None, num_features=None, kind="positive",
             seed=None, gate=None, normalize=None, chunk_size=None, eps=None, attn_mask=None,
             key_padding_mask=None, is_causal=False, scale=None, backend=None, check_finite=True):
    """Gradients with respect to ``q``, ``k``, ``v`` and (when given) ``gate`` (reference).

    Same arguments as :func:`mcattn.rfa.grad.backward`; computes in float64.

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` (and ``"gate"``) in the shapes of the inputs.
    """
    feats = resolve_training_features(q, features, num_features, kind, seed)
    rinp, inp = prepare_rfa(feats, q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            gate=gate, is_causal=is_causal, normalize=None, scale=scale,
                            chunk_size=chunk_size, eps=eps, check_finite=False)
    xp = rinp.xp
    nq, nk = q.shape[-2], k.shape[-2]
    if is_causal and nq != nk:
        raise GradientNotSupportedError("rfa gradients of causal attention need Nq == Nk")
    f64 = np.float64
    bh = rinp.q.shape[0]
    omega = xp.asarray(feats.omega_for(f64, xp))
    qs = rinp.q.astype(f64) * rinp.q_scale
    ks = rinp.k[:, :nk].astype(f64) * rinp.k_scale
    vv = rinp.v[:, :nk].astype(f64)
    g_out = xp.broadcast_to(dout, inp.out_shape).reshape(bh, nq, -1).astype(f64)
    o = xp.broadcast_to(out, inp.out_shape).reshape(bh, nq, -1).astype(f64)

    u_q = project(qs, omega, xp)
    fq = xp.exp(u_q - u_q.max(axis=-1, keepdims=True))  # row shift: cancels in the ratio
    log_k = project(ks, omega, xp) - 0.5 * (ks * ks).sum(-1, keepdims=True)
    if rinp.key_bias is not None:
        log_k = log_k + rinp.key_bias[:, :nk, None].astype(f64)
    finite = xp.isfinite(log_k)
    top = xp.where(finite, log_k, -np.inf).max(axis=(-1, -2), keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    fk = xp.where(finite, xp.exp(xp.where(finite, log_k, 0.0) - top), 0.0)  # per-row constant

    decay = None
    if is_causal:
        i, j = xp.arange(nq)[:, None], xp.arange(nk)[None, :]
        if rinp.log_gate is not None:
            cum = xp.cumsum(rinp.log_gate[:, :nk].astype(f64), axis=-1)  # [BH, N]
            diff = cum[:, :, None] - cum[:, None, :]
            decay = xp.where(j <= i, xp.exp(xp.minimum(diff, 0.0)), 0.0)
        else:
            decay = xp.broadcast_to((j <= i).astype(f64), (bh, nq, nk))
    kern = xp.matmul(fq, fk.transpose(0, 2, 1))  # [BH, Nq, Nk]
    a = kern if decay is None else kern * decay
    den = a.sum(-1)
    live = den > 0
    safe = xp.where(live, den, 1.0)
    dnum = xp.where(live[..., None], g_out / safe[..., None], 0.0)
    dden = xp.where(live, -(g_out * o).sum(-1) / safe, 0.0)
    da = xp.matmul(dnum, vv.transpose(0, 2, 1)) + dden[..., None]
    dv = xp.matmul(a.transpose(0, 2, 1), dnum)
    dkern = da if decay is None else da * decay
    dfq = xp.matmul(dkern, fk)
    dfk = xp.matmul(dkern.transpose(0, 2, 1), fq)

    heads = omega.shape[0]
    w_rows = omega[xp.arange(bh) % heads] if heads > 1 else omega[:1]
    du_q = dfq * fq
    dq = xp.matmul(du_q, w_rows) * rinp.q_scale
    du_k = dfk * fk
    dk = (xp.matmul(du_k, w_rows) - ks * du_k.sum(-1, keepdims=True)) * rinp.k_scale

    batch = tuple(inp.batch_shape)
    grads = {"q": sum_to_shape(dq.reshape(batch + dq.shape[1:]), q.shape).astype(q.dtype),
             "k": sum_to_shape(dk.reshape(batch + dk.shape[1:]), k.shape).astype(k.dtype),
             "v": sum_to_shape(dv.reshape(batch + dv.shape[1:]), v.shape).astype(v.dtype)}
    if gate is not None:
        # d/d log g: through the decays, d cum_i = sum_j W_ij - sum_i' W_i'i with
        # W = dA * A, then d log g_t = sum_{i >= t} d cum_i; through (1 - g_t) on key t:
        # d log(1 - g_t) = sum_r du_k[t, r].
        w = da * a
        dcum = w.sum(-1) - w.sum(-2)
        dlog_g = xp.flip(xp.cumsum(xp.flip(dcum, -1), -1), -1)
        g = xp.exp(rinp.log_gate[:, :nk].astype(f64))
        masked = rinp.log_gate[:, :nk] == 0  # padding neither adds nor decays: no gradient
        one_minus = xp.where(masked, 1.0, 1.0 - g)
        dg = xp.where(masked, 0.0, dlog_g / g - du_k.sum(-1) / one_minus)
        grads["gate"] = sum_to_shape(dg.reshape(batch + (nk,)), gate.shape).astype(gate.dtype)
    return grads

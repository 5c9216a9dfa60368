"""RFA backward with array operations (NumPy on the host, CuPy on a GPU), ``O(N m)`` memory.

The kernel behind :func:`mcattn.rfa.grad.backward` for the ``numpy`` and ``cupy``
backends (the ``numba`` one, :mod:`mcattn.rfa.grad_cpu`, runs the same sweeps per batch
row). Batched over the batch rows, a Python loop over chunks; no ``N x N`` matrix.

Notation per batch row: features ``F_q [Nq, m]``, ``F_k [Nk, m]`` (positive features,
key weights and masks folded into ``F_k``), ``num = A V``, ``den = A 1`` with
``A_ij = F_q[i] . F_k[j] D_ij``, ``dnum = dout / den``, ``dden = -(dout . out) / den``.

* Non-causal: ``S = F_k^T V``, ``z = F_k^T 1``; ``dF_q = dnum S^T + dden z^T``,
  ``dS = F_q^T dnum``, ``dz = F_q^T dden``, ``dF_k = V dS^T + 1 dz^T``, ``dV = F_k dS``.
* Causal / gated, chunks of ``L <= C`` tokens with local cumulative log-gates ``b``
  (``into_t = e^{b_t}``, ``tail_s = e^{b_L - b_s}``, decays ``D_ts = e^{b_t - b_s}``):
  a forward sweep carries ``(S, z)`` (the state before the chunk) and computes the
  intra-chunk terms (``A = (F_q F_k^T) * D``, ``dA = dnum V^T + dden 1^T``,
  ``dV += A^T dnum``, ``dF_q += (dA * D) F_k``, ``dF_k += (dA * D)^T F_q``) and the
  queries' read of the state (``dF_q += into (dnum S^T + dden z^T)``); a reverse sweep
  carries the state's gradient ``(G, g)`` (of the state after the chunk) backwards:
  ``dF_k += tail (V G^T + 1 g^T)``, ``dV += (tail F_k) G``, then
  ``G <- e^{b_L} G + (into F_q)^T dnum``, ``g <- e^{b_L} g + (into F_q)^T dden``.

The states are recomputed per chunk and never stored per position.
"""

import numpy as np

from .naive import project

__all__ = ["backward", "training_features", "feature_gradients"]


def _weights(omega, bh, xp):
    """``W`` per batch row, ``[BH or 1, D, d]``."""
    heads = omega.shape[0]
    return omega[:1] if heads == 1 else omega[xp.arange(bh) % heads]


def training_features(rinp):
    """Query and key features of positive RFA, shifted for range.

    Returns
    -------
    fq : array ``[BH, Nq, m]``
        ``exp(u - max u)`` per row (a row factor cancels in the ratio).
    fk : array ``[BH, Nk, m]``
        ``exp(W k' - |k'|^2 / 2 + key_bias - c)`` with one constant ``c`` per batch row;
        masked keys are 0.
    ks : array ``[BH, Nk, d]``
        The scaled keys ``k'``.
    """
    xp = rinp.xp
    dt = rinp.dtype.type
    qs = rinp.q * dt(rinp.q_scale)
    ks = rinp.k * dt(rinp.k_scale)
    u_q = project(qs, rinp.omega, xp)
    fq = xp.exp(u_q - u_q.max(axis=-1, keepdims=True))
    log_k = project(ks, rinp.omega, xp) - dt(0.5) * (ks * ks).sum(-1, keepdims=True)
    if rinp.key_bias is not None:
        log_k = log_k + rinp.key_bias[..., None]
    top = log_k.max(axis=(-1, -2), keepdims=True)
    top = xp.where(xp.isfinite(top), top, dt(0))  # a row whose keys are all masked
    fk = xp.exp(log_k - top)  # exp(-inf) = 0 at masked keys
    return fq, fk, ks


def feature_gradients(rinp, fq, fk, ks, dfq, dfk):
    """``(dq, dk, key_u)`` from the features' gradients.

    Through ``phi = exp(u + ...)``: ``du = dphi * phi``; ``dq = du_q W q_scale``,
    ``dk = (du_k W - k' sum(du_k)) k_scale``; ``key_u = sum(du_k)`` ``[BH, Nk]`` is also
    the gradient of each key's log-weight (the gate's ``log(1 - g)``).
    """
    xp = rinp.xp
    dt = rinp.dtype.type
    w = _weights(rinp.omega, fq.shape[0], xp)
    du_q = dfq * fq
    du_k = dfk * fk
    key_u = du_k.sum(-1)
    dq = xp.matmul(du_q, w) * dt(rinp.q_scale)
    dk = (xp.matmul(du_k, w) - ks * key_u[..., None]) * dt(rinp.k_scale)
    return dq, dk, key_u


def _read_gradients(den, g_out, out, xp):
    """``dnum = dout / den`` and ``dden = -(dout . out) / den`` (0 where nothing is visible)."""
    live = den > 0
    inv = xp.where(live, 1 / xp.where(live, den, 1), 0)
    return g_out * inv[..., None], -(g_out * out).sum(-1) * inv


def _chunk_decays(rinp, t0, t1, xp):
    """``(decay [BH|1, L, L], into [BH|1, L], tail [BH|1, L], last [BH|1])`` of one chunk."""
    dt = rinp.dtype.type
    n = t1 - t0
    lower = xp.tril(xp.ones((n, n), dtype=bool))
    if rinp.log_gate is None:
        ones = xp.ones((1, n), rinp.dtype)
        return lower[None].astype(rinp.dtype), ones, ones, ones[:, 0]
    b = xp.cumsum(rinp.log_gate[:, t0:t1], axis=1)
    decay = xp.exp(xp.where(lower, b[:, :, None] - b[:, None, :], dt(-np.inf)))
    into = xp.exp(b)
    return decay, into, xp.exp(b[:, -1:] - b), into[:, -1]


def backward(rinp, out, dout):
    """Gradients of positive drop-in RFA for canonical inputs.

    Parameters
    ----------
    rinp : mcattn.rfa._inputs.RFAInputs
        ``Nq == Nk`` when causal.
    out, dout : arrays ``[BH, Nq, dv]``
        The forward's output and its gradient, in the compute dtype.

    Returns
    -------
    dq : array ``[BH, Nq, d]``
    dk : array ``[BH, Nk, d]``
    dv : array ``[BH, Nk, dv]``
    key_u : array ``[BH, Nk]``
        Gradient of each key's log-weight (see :func:`feature_gradients`).
    """
    xp = rinp.xp
    fq, fk, ks = training_features(rinp)
    v = rinp.v
    tr = (0, 2, 1)
    if not rinp.is_causal:
        S = xp.matmul(fk.transpose(tr), v)
        z = fk.sum(1)
        den = xp.matmul(fq, z[..., None])[..., 0]
        dnum, dden = _read_gradients(den, dout, out, xp)
        dfq = xp.matmul(dnum, S.transpose(tr)) + dden[..., None] * z[:, None, :]
        dS = xp.matmul(fq.transpose(tr), dnum)
        dz = xp.matmul(fq.transpose(tr), dden[..., None])[..., 0]
        dfk = xp.matmul(v, dS.transpose(tr)) + dz[:, None, :]
        dv = xp.matmul(fk, dS)
        dq, dk, key_u = feature_gradients(rinp, fq, fk, ks, dfq, dfk)
        return dq, dk, dv, key_u
    bh, n, m = fk.shape
    chunk = max(1, min(int(rinp.chunk_size), n))
    starts = list(range(0, n, chunk))
    dfq, dfk, dv = xp.empty_like(fq), xp.empty_like(fk), xp.empty_like(v)
    dnum_all, dden_all = xp.empty_like(dout), xp.empty(dout.shape[:2], dout.dtype)
    S = xp.zeros((bh, m, v.shape[2]), rinp.dtype)
    z = xp.zeros((bh, m), rinp.dtype)
    for t0 in starts:  # forward sweep: intra-chunk terms and the queries' read of the state
        t1 = min(n, t0 + chunk)
        q_c, k_c, v_c = fq[:, t0:t1], fk[:, t0:t1], v[:, t0:t1]
        decay, into, tail, last = _chunk_decays(rinp, t0, t1, xp)
        a = xp.matmul(q_c, k_c.transpose(tr)) * decay
        den = a.sum(-1) + into * xp.matmul(q_c, z[..., None])[..., 0]
        dnum, dden = _read_gradients(den, dout[:, t0:t1], out[:, t0:t1], xp)
        dnum_all[:, t0:t1], dden_all[:, t0:t1] = dnum, dden
        da = (xp.matmul(dnum, v_c.transpose(tr)) + dden[..., None]) * decay
        dv[:, t0:t1] = xp.matmul(a.transpose(tr), dnum)
        dfq[:, t0:t1] = xp.matmul(da, k_c) + into[..., None] * (
            xp.matmul(dnum, S.transpose(tr)) + dden[..., None] * z[:, None, :])
        dfk[:, t0:t1] = xp.matmul(da.transpose(tr), q_c)
        k_tail = k_c * tail[..., None]
        S = last[:, None, None] * S + xp.matmul(k_tail.transpose(tr), v_c)
        z = last[:, None] * z + k_tail.sum(1)
    G = xp.zeros_like(S)
    g = xp.zeros_like(z)
    for t0 in reversed(starts):  # reverse sweep: the state's gradient flows to earlier keys
        t1 = min(n, t0 + chunk)
        q_c, k_c, v_c = fq[:, t0:t1], fk[:, t0:t1], v[:, t0:t1]
        _, into, tail, last = _chunk_decays(rinp, t0, t1, xp)
        dfk[:, t0:t1] += tail[..., None] * (xp.matmul(v_c, G.transpose(tr)) + g[:, None, :])
        dv[:, t0:t1] += xp.matmul(k_c * tail[..., None], G)
        q_into = (q_c * into[..., None]).transpose(tr)
        G = last[:, None, None] * G + xp.matmul(q_into, dnum_all[:, t0:t1])
        g = last[:, None] * g + xp.matmul(q_into, dden_all[:, t0:t1, None])[..., 0]
    dq, dk, key_u = feature_gradients(rinp, fq, fk, ks, dfq, dfk)
    return dq, dk, dv, key_u

"""Random feature attention, the readable reference (NumPy, or CuPy through ``xp``).

The definition, for rows ``q'`` and ``k'`` prepared by the caller (``sqrt(scale) q``, or
unit-norm rows over ``sigma``; see :mod:`mcattn.rfa`):

* a feature map gives every row a feature vector ``f(x)`` ``[m]`` and a log-weight
  ``l(x)``, with ``phi(x) = exp(l(x)) f(x)``. A query uses ``f(q')`` alone (its weight is
  the same for every key and cancels in the ratio); a key's weight
  ``w_j = exp(l(k'_j) + bias_j - c)`` carries the key factor of the drop-in estimator,
  the per-key mask and ``1 - g_j`` of the gate (``bias_j``), shifted by the largest
  log-weight ``c`` so that it never overflows;
* non-causal: ``S = sum_j w_j f(k_j) v_j^T`` ``[m, dv]``, ``z = sum_j w_j f(k_j)`` ``[m]``,
  ``out_i = f(q_i)^T S / (f(q_i) . z)``;
* causal and gated: the same with prefix sums, ``S_t = g_t S_{t-1} + w_t f(k_t) v_t^T``;
* the denominator ``f(q_i) . z_i`` is floored at ``eps * |f(q_i)| * sum_j w_j |f(k_j)|``
  (a fraction of its Cauchy-Schwarz bound; sin/cos features can make it negative); the
  rows floored are counted. A row with no visible key is zero.

Three forms compute it: :func:`parallel` (non-causal), :func:`recurrent` (causal, one
token at a time: the plain recurrence) and :func:`chunked` (causal and gated: exact
products inside chunks of ``C`` tokens, a carried state between chunks, gates through
cumulative log-gates). They agree to rounding; the fast backends implement
:func:`chunked` and :func:`parallel`.

Backward (:func:`backward`, the ``numpy`` and ``cupy`` kernel of :func:`mcattn.rfa.grad.backward`):
The kernel behind :func:`mcattn.rfa.grad.backward` for the ``numpy`` and ``cupy``
backends (the ``numba`` one, :func:`mcattn.rfa.cpu.backward`, runs the same sweeps per batch
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

:func:`reference_backward` is the ``O(N^2)`` float64 backward the kernels are tested against.
"""

import math
from dataclasses import dataclass

import numpy as np

from .._array import host_copy
from .._validate import sum_to_shape
from ..errors import GradientNotSupportedError

__all__ = [
    "KINDS",
    "log_kernel_matrix",
    "feature_map",
    "row_features",
    "RFAState",
    "empty_state",
    "accumulate",
    "readout",
    "step",
    "parallel",
    "recurrent",
    "chunked",
    "forward",
    "target_attention",
    "backward",
    "reference_backward",
    "training_features",
    "feature_gradients",
]

#: The feature maps: ``positive`` and ``sincos`` estimate softmax attention, ``arccos`` the
#: arc-cosine kernel.
KINDS = ("positive", "sincos", "arccos")


def feature_map(u, sqnorm, kind, xp):
    """Feature vectors and log-weights of rows from their projections.

    Parameters
    ----------
    u : array ``[..., D]``
        Projections ``W x`` of rows ``x``.
    sqnorm : array ``[...]``
        ``|x|^2``.
    kind : {"positive", "sincos", "arccos"}
    xp : module

    Returns
    -------
    f : array ``[..., m]``
        ``positive``: ``exp(u - max(u)) / sqrt(D)``; ``sincos``: ``[sin u, cos u] / sqrt(D)``;
        ``arccos``: ``max(u, 0) / sqrt(D)``.
    log_weight : array ``[...]``
        ``l`` such that ``exp(l) f`` is the feature map of :class:`RandomFeatures`
        (``positive``: ``max(u) - |x|^2/2``) and, for ``sincos``, the key factor of the
        drop-in estimator (``|x|^2 / 2``, from
        ``exp(x.y) = exp(|x|^2/2) exp(|y|^2/2) exp(-|x-y|^2/2)``); 0 for ``arccos``.
    """
    inv = u.dtype.type(1.0 / math.sqrt(u.shape[-1]))
    half = u.dtype.type(0.5)
    if kind == "positive":
        top = u.max(axis=-1, keepdims=True) if u.shape[-1] else xp.zeros(u.shape[:-1] + (1,), u.dtype)
        return xp.exp(u - top) * inv, top[..., 0] - half * sqnorm
    if kind == "sincos":
        return xp.concatenate([xp.sin(u), xp.cos(u)], axis=-1) * inv, half * sqnorm
    if kind == "arccos":
        return xp.maximum(u, u.dtype.type(0)) * inv, xp.zeros_like(sqnorm)
    raise ValueError(f"unknown feature kind {kind!r}")


def scaled_rows(x, factor, unit, xp):
    """Rows fed to the feature map, ``[BH, N, d]``, and their squared norms ``[BH, N]``."""
    if unit:
        norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))
        x = x / xp.where(norm > 0, norm, x.dtype.type(1))
    x = x * x.dtype.type(factor)
    return x, (x * x).sum(axis=-1)


def project(x, omega, xp):
    """``u = x W^T`` per batch row: ``[BH, N, d] -> [BH, N, D]`` (row ``b`` uses ``omega[b % H]``)."""
    heads = omega.shape[0]
    if heads == 1:
        return xp.matmul(x, omega[0].T)
    index = xp.arange(x.shape[0]) % heads
    return xp.matmul(x, omega[index].transpose(0, 2, 1))


def side_features(x, factor, rinp):
    """Feature vectors ``[BH, N, m]`` and log-weights ``[BH, N]`` of rows ``x`` ``[BH, N, d]``."""
    xp = rinp.xp
    xs, sq = scaled_rows(x, factor, rinp.unit, xp)
    return feature_map(project(xs, rinp.omega, xp), sq, rinp.kind, xp)


def row_features(rinp):
    """Query features ``[BH, Nq, m]``, key features ``[BH, Nk, m]``, key log-weights ``[BH, Nk]``.

    The key log-weights include ``key_bias`` (masks, ``log(1 - g)``) but not the shift.
    """
    fq, _ = side_features(rinp.q, rinp.q_scale, rinp)
    fk, lk = side_features(rinp.k, rinp.k_scale, rinp)
    if rinp.key_bias is not None:
        lk = lk + rinp.key_bias
    return fq, fk, lk


@dataclass
class RFAState:
    """The constant-size state of causal RFA after some tokens (one per batch row).

    Attributes
    ----------
    S : array ``[BH, m, dv]``
        ``sum_j (gates) w_j f(k_j) v_j^T``, in units of ``exp(shift)``.
    z : array ``[BH, m]``
        ``sum_j (gates) w_j f(k_j)``.
    mass : array ``[BH]``
        ``sum_j (gates) w_j |f(k_j)|`` (the denominator floor's scale).
    shift : array ``[BH]``
        Log-scale ``c`` of the weights (largest key log-weight so far; ``-inf`` before any key).
    """

    S: object
    z: object
    mass: object
    shift: object


def empty_state(bh, m, dv, dtype, xp):
    """The state before any token."""
    return RFAState(xp.zeros((bh, m, dv), dtype), xp.zeros((bh, m), dtype), xp.zeros(bh, dtype),
                    xp.full(bh, -np.inf, dtype))


def shift_weights(log_weight, state, xp):
    """Rescale ``state`` to the new shift ``c' = max(c, max log_weight)``; return ``exp(log_weight - c')``.

    ``log_weight`` ``[BH, n]``; the state is updated in place. Rows that have seen no
    visible key keep ``c = -inf`` and get zero weights.
    """
    dt = log_weight.dtype.type
    if log_weight.shape[-1]:
        top = log_weight.max(axis=-1)
    else:
        top = xp.full(log_weight.shape[0], -np.inf, log_weight.dtype)
    new = xp.maximum(state.shift, top)
    finite = xp.isfinite(new)
    safe = xp.where(finite, new, dt(0))
    rescale = xp.where(xp.isfinite(state.shift), xp.exp(state.shift - safe), dt(0))
    state.S *= rescale[:, None, None]
    state.z *= rescale[:, None]
    state.mass *= rescale
    state.shift = new
    return xp.exp(log_weight - safe[:, None])


def finish(num, den, ref, eps, xp):
    """``num / den`` with the denominator floored at ``eps * ref``; rows with ``ref = 0`` are 0.

    Returns the output ``[BH, n, dv]`` and the number of floored rows per batch row ``[BH]``.
    """
    dt = den.dtype.type
    has = ref > 0
    low = has & (den <= dt(eps) * ref)
    den = xp.where(low, dt(eps) * ref, den)
    out = xp.where(has[..., None], num / xp.where(has, den, dt(1))[..., None], dt(0))
    return out, low.sum(axis=-1)


def _norms(f, xp):
    return xp.sqrt((f * f).sum(axis=-1))


def accumulate(state, fk, lk, v, xp):
    """Add keys to a non-causal state: ``S += sum_j w_j f(k_j) v_j^T``, ``z``, mass (in place).

    ``fk`` ``[BH, n, m]``, ``lk`` ``[BH, n]`` (log-weights), ``v`` ``[BH, n, dv]``.
    """
    w = shift_weights(lk, state, xp)
    kw = fk * w[..., None]
    state.S += xp.matmul(kw.transpose(0, 2, 1), v)
    state.z += kw.sum(axis=1)
    state.mass += (w * _norms(fk, xp)).sum(axis=1)
    return state


def readout(fq, state, eps, xp):
    """Outputs of queries ``fq`` ``[BH, n, m]`` against a state: ``f(q)^T S / (f(q) . z)``, floored.

    Returns the output ``[BH, n, dv]`` and the floored rows per batch row ``[BH]``.
    """
    num = xp.matmul(fq, state.S)
    den = xp.matmul(fq, state.z[..., None])[..., 0]
    return finish(num, den, _norms(fq, xp) * state.mass[:, None], eps, xp)


def parallel(rinp):
    """Non-causal RFA: ``out_i = f(q_i)^T S / (f(q_i) . z)`` with ``S, z`` summed over every key.

    Returns
    -------
    out : array ``[BH, Nq, dv]``
    clamped : array of int ``[BH]``
        Rows whose denominator was floored.
    """
    xp = rinp.xp
    fq, fk, lk = row_features(rinp)
    state = empty_state(rinp.q.shape[0], rinp.feature_dim, rinp.value_dim, rinp.dtype, xp)
    accumulate(state, fk, lk, rinp.v, xp)
    return readout(fq, state, rinp.eps, xp)


def step(state, fq, fk, lk, v, log_gate, eps, xp):
    """One token of the recurrence (in place): decay by ``g``, add the key, read the query out.

    ``fq``, ``fk`` ``[BH, m]``; ``lk`` ``[BH]``; ``v`` ``[BH, dv]``; ``log_gate`` ``[BH]``
    or None. Costs ``O(m dv)`` per batch row whatever the position.

    Returns the output ``[BH, dv]`` and the floored flags ``[BH]``.
    """
    if log_gate is not None:
        g = xp.exp(log_gate)
        state.S *= g[:, None, None]
        state.z *= g[:, None]
        state.mass *= g
    w = shift_weights(lk[:, None], state, xp)[:, 0]
    kw = fk * w[:, None]
    state.S += kw[:, :, None] * v[:, None, :]
    state.z += kw
    state.mass += w * _norms(fk, xp)
    out, low = readout(fq[:, None], state, eps, xp)
    return out[:, 0], low


def recurrent(rinp, state=None):
    """Causal (and gated) RFA as the plain recurrence, one token at a time.

    ``S_t = g_t S_{t-1} + w_t f(k_t) v_t^T`` (``g_t = 1`` without a gate; ``w_t`` carries
    ``1 - g_t``), ``z_t`` and the mass alike, ``out_t = f(q_t)^T S_t / (f(q_t) . z_t)``.
    The weight shift is updated token by token (an online maximum).

    Parameters
    ----------
    rinp : RFAInputs
        Causal, ``Nq == Nk``.
    state : RFAState, optional
        Start from this state (updated in place); default the empty state.

    Returns
    -------
    out : array ``[BH, N, dv]``
    clamped : array of int ``[BH]``
    state : RFAState
        After the last token.
    """
    xp = rinp.xp
    fq, fk, lk = row_features(rinp)
    bh, n = lk.shape
    if state is None:
        state = empty_state(bh, rinp.feature_dim, rinp.value_dim, rinp.dtype, xp)
    out = xp.zeros((bh, n, rinp.value_dim), rinp.dtype)
    clamped = xp.zeros(bh, np.int64)
    for t in range(n):
        gate_t = None if rinp.log_gate is None else rinp.log_gate[:, t]
        out[:, t], low = step(state, fq[:, t], fk[:, t], lk[:, t], rinp.v[:, t], gate_t, rinp.eps, xp)
        clamped += low
    return out, clamped, state


def chunked(rinp, chunk_size=None, state=None):
    """Causal (and gated) RFA in the chunked parallel form.

    For a chunk of ``L <= C`` tokens with cumulative log-gates ``b_t`` (from the chunk
    start, inclusive), state ``(S, z)`` at the chunk start, query features ``Q`` and
    weighted key features ``K`` ``[L, m]``:

    * ``A = (Q K^T) * D`` with ``D_ts = exp(b_t - b_s)`` for ``s <= t``, else 0 (exact
      intra-chunk products, ``L x L``);
    * ``num = exp(b) * (Q S) + A V``, ``den = exp(b) * (Q z) + A 1``;
    * ``S <- exp(b_L) S + (K * exp(b_L - b))^T V`` (and ``z``, the mass, alike).

    Cost ``O(N C m + N m dv)``; memory ``O(C^2 + m dv)`` per batch row beyond the
    features: no ``T x m x dv`` prefix sum is ever formed.

    Parameters
    ----------
    rinp : RFAInputs
    chunk_size : int, optional
        Default ``rinp.chunk_size``.
    state : RFAState, optional
        Start from this state (updated in place).

    Returns
    -------
    out, clamped, state
        As :func:`recurrent`.
    """
    xp = rinp.xp
    dt = rinp.dtype.type
    chunk = rinp.chunk_size if chunk_size is None else int(chunk_size)
    fq, fk, lk = row_features(rinp)
    bh, n = lk.shape
    if state is None:
        state = empty_state(bh, rinp.feature_dim, rinp.value_dim, rinp.dtype, xp)
    w = shift_weights(lk, state, xp)  # one shift for the whole call
    kw = fk * w[..., None]
    knorm = w * _norms(fk, xp)
    qnorm = _norms(fq, xp)
    out = xp.zeros((bh, n, rinp.value_dim), rinp.dtype)
    clamped = xp.zeros(bh, np.int64)
    for t0 in range(0, n, chunk):
        t1 = min(n, t0 + chunk)
        q_c, k_c, v_c = fq[:, t0:t1], kw[:, t0:t1], rinp.v[:, t0:t1]
        lower = xp.tril(xp.ones((t1 - t0, t1 - t0), dtype=bool))
        if rinp.log_gate is not None:
            b = xp.cumsum(rinp.log_gate[:, t0:t1], axis=1)  # [BH, L], decreasing
            diff = b[:, :, None] - b[:, None, :]
            decay = xp.exp(xp.where(lower, diff, dt(-np.inf)))  # exp(b_t - b_s), s <= t
            into = xp.exp(b)  # state's weight at token t
            tail = xp.exp(b[:, -1:] - b)  # key s's weight at the chunk end
            total = into[:, -1]
        else:
            decay = xp.broadcast_to(lower.astype(rinp.dtype), (bh, t1 - t0, t1 - t0))
            into = xp.ones((bh, t1 - t0), rinp.dtype)
            tail = into
            total = xp.ones(bh, rinp.dtype)
        a = xp.matmul(q_c, k_c.transpose(0, 2, 1)) * decay
        num = into[..., None] * xp.matmul(q_c, state.S) + xp.matmul(a, v_c)
        den = into * xp.matmul(q_c, state.z[..., None])[..., 0] + a.sum(axis=-1)
        ref = qnorm[:, t0:t1] * (into * state.mass[:, None] + xp.matmul(decay, knorm[:, t0:t1, None])[..., 0])
        out[:, t0:t1], low = finish(num, den, ref, rinp.eps, xp)
        clamped += low
        k_tail = k_c * tail[..., None]
        state.S = total[:, None, None] * state.S + xp.matmul(k_tail.transpose(0, 2, 1), v_c)
        state.z = total[:, None] * state.z + k_tail.sum(axis=1)
        state.mass = total * state.mass + (knorm[:, t0:t1] * tail).sum(axis=1)
    return out, clamped, state


def forward(rinp):
    """The ``numpy`` backend: :func:`parallel` (non-causal) or :func:`chunked` (causal).

    Returns
    -------
    out : array ``[BH, Nq, dv]``
    clamped : array of int ``[BH]``
    """
    if rinp.nq == 0 or rinp.nk == 0 or rinp.q.shape[0] == 0:
        return (rinp.xp.zeros((rinp.q.shape[0], rinp.nq, rinp.value_dim), rinp.dtype),
                rinp.xp.zeros(rinp.q.shape[0], np.int64))
    if rinp.is_causal:
        out, clamped, _ = chunked(rinp)
        return out, clamped
    return parallel(rinp)


def log_kernel_matrix(kind, xq, xk):
    """``log kappa(q'_i, k'_j)`` ``[..., Nq, Nk]`` as attention weights (up to a per-query constant).

    ``positive`` and ``sincos``: ``q' . k'`` (both estimate softmax attention: the sin/cos
    query factor cancels in the ratio); ``arccos``: the log arc-cosine kernel.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    dots = xq @ np.swapaxes(xk, -1, -2)
    if kind in ("positive", "sincos"):
        return dots
    nq = np.linalg.norm(xq, axis=-1)[..., :, None]
    nk = np.linalg.norm(xk, axis=-1)[..., None, :]
    denom = nq * nk
    cos = np.clip(np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 1.0), -1.0, 1.0)
    theta = np.arccos(cos)
    value = denom * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(value, 0.0))


def target_attention(rinp):
    """What RFA estimates, computed exactly (float64 NumPy, ``O(Nq Nk)``; for tests and bounds).

    ``out_i = sum_j kappa_ij v_j / sum_j kappa_ij`` with ``kappa_ij`` the kernel of the
    feature map between ``q'_i`` and ``k'_j`` (``exp(q'.k')`` for ``positive`` and
    ``sincos`` — softmax attention — and the arc-cosine kernel for ``arccos``), times
    ``exp(bias_j)``, the gate decay ``prod_{j < s <= i} g_s`` and the causal mask.

    Returns
    -------
    numpy.ndarray ``[BH, Nq, dv]``
    """
    host = {name: np.asarray(_host(getattr(rinp, name)), dtype=np.float64)
            for name in ("q", "k", "v")}
    xq, _ = scaled_rows(host["q"], rinp.q_scale, rinp.unit, np)
    xk, _ = scaled_rows(host["k"], rinp.k_scale, rinp.unit, np)
    logk = log_kernel_matrix(rinp.kind, xq, xk)  # [BH, Nq, Nk]
    if rinp.key_bias is not None:
        logk = logk + np.asarray(_host(rinp.key_bias), np.float64)[:, None, :]
    nq, nk = logk.shape[-2:]
    if rinp.log_gate is not None:
        cum = np.cumsum(np.asarray(_host(rinp.log_gate), np.float64), axis=1)
        logk = logk + cum[:, :, None] - cum[:, None, :]
    if rinp.is_causal:
        logk = np.where(np.tril(np.ones((nq, nk), dtype=bool)), logk, -np.inf)
    top = logk.max(axis=-1, keepdims=True) if nk else np.zeros(logk.shape[:-1] + (1,))
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(logk - top)
    total = p.sum(axis=-1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    return p @ host["v"]


def _host(x):
    return host_copy(x)


# ----------------------------------------------------------------------------- backward
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


def reference_backward(rinp, inp, feats, q, k, v, out, dout, gate=None, is_causal=False):
    """Gradients with respect to ``q``, ``k``, ``v`` and (when given) ``gate``: the ``O(N^2)`` reference.

    Kept as the readable definition beside the chunked kernels (:func:`backward`,
    :func:`mcattn.rfa.cpu.backward`
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

    Takes the prepared inputs (``rinp, inp`` from :func:`mcattn.rfa._inputs.prepare_rfa`, ``feats``
    the features) and the raw ``q, k, v, out, dout, gate`` for their shapes;
    :func:`mcattn.rfa.grad.reference_backward` prepares them from the forward's arguments.
    Computes in float64.

    Returns
    -------
    dict
        ``{"q": dq, "k": dk, "v": dv}`` (and ``"gate"``) in the shapes of the inputs.
    """
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

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
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
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
]


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
    from .bounds import log_kernel_matrix

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
    from .._array import host_copy

    return host_copy(x)

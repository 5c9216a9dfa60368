"""The GPU algorithm of random feature attention, shared by the numba.cuda and CuPy backends.

Four kernels, the same in ``cuda.py`` (numba.cuda) and ``kernels/rfa.cu`` (CUDA C), and
a little array code between them (``xp``: CuPy on a GPU, NumPy under the simulator):

1. ``features`` — one thread per row of ``q`` or ``k``: feature vector ``f [m]``,
   log-weight and feature norm (see :func:`mcattn.rfa.naive.feature_map`);
2. (array code) key weights ``w = exp(l + bias - c)`` with ``c`` the largest log-weight
   of the batch row, weighted key features ``w f`` and norms, cumulative log-gates ``b``
   within each chunk and each chunk's total decay;
3. ``states`` — one thread per (batch row, chunk, entry of ``[S | z]`` or the mass): the
   chunk's own sum ``sum_s exp(b_L - b_s) w_s f_s [v_s, 1]``. Non-causal attention is one
   chunk holding every key;
4. ``scan`` (causal) — one thread per (batch row, entry): turns the
   chunk sums into the state at each chunk's start, ``S_c = e^{b_L} S_{c-1} + sum_{c-1}``;
5. ``output`` — one thread per query row: ``e^{b_i} f(q_i) [S | z]_c`` plus, when causal,
   the exact products with the chunk's earlier keys, the floored denominator, the output.

Memory is ``O(N m)`` for the features and ``O((N / C) m dv)`` for the chunk states: linear
in ``N``; there is no ``T x m x dv`` prefix sum.
"""

import numpy as np

__all__ = ["run"]

KIND_CODE = {"positive": 0, "sincos": 1, "arccos": 2}


def run(rinp, launch):
    """Random feature attention of canonical inputs through a backend's four launches.

    Parameters
    ----------
    rinp : RFAInputs
    launch : object
        With methods ``features(x, factor, f, logw, fnorm)``,
        ``states(kw, v, knorm, cum, has_gate, states, mass, chunk)``,
        ``scan(states, mass, chunk_decay)`` and
        ``output(fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk, causal)``,
        taking and filling arrays of ``rinp.xp``.

    Returns
    -------
    out : array ``[BH, Nq, dv]``
    clamped : array of int ``[BH]``
    """
    xp = rinp.xp
    dt = rinp.dtype
    bh, nq, nk = rinp.q.shape[0], rinp.nq, rinp.nk
    m, dv = rinp.feature_dim, rinp.value_dim
    fq = xp.empty((bh, nq, m), dt)
    qnorm = xp.empty((bh, nq), dt)
    fk = xp.empty((bh, nk, m), dt)
    logw = xp.empty((bh, nk), dt)
    knorm = xp.empty((bh, nk), dt)
    launch.features(rinp.q, rinp.q_scale, fq, xp.empty((bh, nq), dt), qnorm)
    launch.features(rinp.k, rinp.k_scale, fk, logw, knorm)
    if rinp.key_bias is not None:
        logw = logw + rinp.key_bias
    top = logw.max(axis=1)
    top = xp.where(xp.isfinite(top), top, dt.type(0))
    w = xp.exp(logw - top[:, None])
    kw = xp.ascontiguousarray(fk * w[..., None])
    knorm = xp.ascontiguousarray(knorm * w)
    if rinp.is_causal:
        chunk = max(1, min(int(rinp.chunk_size), nq))
        n_chunks = -(-nq // chunk)
    else:
        chunk, n_chunks = nk, 1
    has_gate = rinp.is_causal and rinp.log_gate is not None
    if has_gate:
        padded = xp.zeros((bh, n_chunks * chunk), dt)
        padded[:, :nk] = rinp.log_gate
        cum_chunks = xp.cumsum(padded.reshape(bh, n_chunks, chunk), axis=2)
        last = np.minimum(np.arange(1, n_chunks + 1) * chunk, nk) - 1 - np.arange(n_chunks) * chunk
        chunk_decay = xp.ascontiguousarray(xp.exp(cum_chunks[:, np.arange(n_chunks), last]))
        cum = xp.ascontiguousarray(cum_chunks.reshape(bh, -1)[:, :nk])
    else:
        chunk_decay = xp.ones((bh, n_chunks), dt)
        cum = xp.zeros((1, 1), dt)
    states = xp.empty((bh, n_chunks, m, dv + 1), dt)
    mass = xp.empty((bh, n_chunks), dt)
    launch.states(kw, rinp.v, knorm, cum, has_gate, states, mass, chunk)
    if rinp.is_causal:  # one chunk too: the state before it is zero, not its own sum
        launch.scan(states, mass, chunk_decay)
    out = xp.empty((bh, nq, dv), dt)
    flags = xp.zeros((bh, nq), np.int32)
    launch.output(fq, qnorm, kw, rinp.v, knorm, cum, has_gate, states, mass, out, flags, chunk,
                  rinp.is_causal)
    return out, flags.sum(axis=1, dtype=np.int64)

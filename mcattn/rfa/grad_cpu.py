"""RFA backward on the CPU: Numba kernels, one task per batch row, ``O(N m)`` memory.

The same sweeps as :mod:`mcattn.rfa.grad_chunked` (the formulas are there), run per
batch row on :func:`mcattn._cpu.run_tasks`'s threads with BLAS on small blocks:

1. features of the whole row, ``F_q``, ``F_k`` ``[N, m]`` (the forward's feature map,
   :func:`mcattn.rfa.cpu._features`; keys weighted by ``exp(log-weight - max)``, masked
   keys 0);
2. non-causal: ``S``, ``z``, then ``dF_q``, ``dS``, ``dz``, ``dF_k``, ``dV`` (five
   products); causal / gated: the forward sweep (per chunk ``A = F_q F_k^T * D``,
   ``dA = dnum V^T + dden``, ``A^T dnum``, ``dA F_k``, ``dA^T F_q``, ``dnum S^T``, the
   state's update) and the reverse sweep (``V G^T``, ``(tail F_k) G``,
   ``(into F_q)^T dnum``);
3. ``dq = (dF_q * F_q) W q_scale``, ``dk = ((dF_k * F_k) W - k' u) k_scale``.

Scratch per thread: ``O(N (D + m + dv) + C^2 + m dv)``. float32 uses the vectorisable
exp of :mod:`mcattn._cpu_math` for the decays (arguments ``<= 0``).
"""

import math

import numpy as np

from .._cpu import run_tasks
from .._cpu_math import bits_dtype as _bits_dtype
from .._cpu_math import exp_block as _exp_block
from .._jit import njit
from .cpu import _features

__all__ = ["backward"]

_FLAGS = {"nsz", "contract", "reassoc"}  # order of sums only; no finite-math assumptions


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _row_features(q, k, omega_t, q_scale, k_scale, key_bias, has_bias, bh, u, fq, fk, logw, fnorm,
                  bits):
    """Features of one batch row: ``fq = exp(u - max u)``, ``fk`` times ``exp(log-weight - max)``."""
    _features(q, omega_t, q_scale, False, 0, u[: q.shape[0]], fq, logw, fnorm, bits)
    nk = k.shape[0]
    _features(k, omega_t, k_scale, False, 0, u[:nk], fk, logw, fnorm, bits)
    top = -np.inf
    for r in range(nk):
        if has_bias:
            logw[r] += key_bias[bh, r]
        top = max(top, logw[r])
    for r in range(nk):
        w = math.exp(logw[r] - top) if logw[r] > -np.inf else 0.0
        for a in range(fk.shape[1]):
            fk[r, a] *= w


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _read_gradients(den, g, o, dnum, dden, r):
    """Row ``r``'s ``dnum = g / den`` and ``dden = -(g . o) / den`` (0 with nothing visible)."""
    dv = g.shape[1]
    if den > 0:
        inv = 1.0 / den
        acc = g[r, 0] * 0
        for c in range(dv):
            acc += g[r, c] * o[r, c]
            dnum[r, c] = g[r, c] * inv
        dden[r] = -acc * inv
    else:
        for c in range(dv):
            dnum[r, c] = 0.0
        dden[r] = 0.0


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _input_gradients(k, w_rows, q_scale, k_scale, fq, fk, dfq, dfk, dq, dk, key_u):
    """``dq``, ``dk``, ``key_u`` of one batch row from the features' gradients (overwrites dfq, dfk)."""
    m = fq.shape[1]
    for r in range(fq.shape[0]):
        for a in range(m):
            dfq[r, a] *= fq[r, a]
    np.dot(dfq, w_rows, dq)
    for r in range(fq.shape[0]):
        for c in range(dq.shape[1]):
            dq[r, c] *= q_scale
    for r in range(fk.shape[0]):
        acc = fk[r, 0] * 0
        for a in range(m):
            dfk[r, a] *= fk[r, a]
            acc += dfk[r, a]
        key_u[r] = acc
    np.dot(dfk, w_rows, dk)
    for r in range(fk.shape[0]):
        for c in range(dk.shape[1]):
            dk[r, c] = k_scale * (dk[r, c] - k_scale * k[r, c] * key_u[r])


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _plain_tasks(q, k, v, omega, heads, q_scale, k_scale, key_bias, has_bias, out, dout, dq, dk, dv,
                 key_u, bits_dtype, t0, t1):
    """Non-causal gradients of batch rows ``[t0, t1)``."""
    nq, nk = q.shape[1], k.shape[1]
    width = omega.shape[1]
    dvd = v.shape[2]
    dt = q.dtype
    rows = max(nq, nk)
    u = np.empty((rows, width), dt)
    bits = np.empty((rows, width), bits_dtype)
    logw = np.empty(rows, dt)
    fnorm = np.empty(rows, dt)
    fq, dfq = np.empty((nq, width), dt), np.empty((nq, width), dt)
    fk, dfk = np.empty((nk, width), dt), np.empty((nk, width), dt)
    dnum, dden = np.empty((nq, dvd), dt), np.empty(nq, dt)
    S, dS = np.empty((width, dvd), dt), np.empty((width, dvd), dt)
    z, dz = np.empty(width, dt), np.empty(width, dt)
    for bh in range(t0, t1):
        w_rows = omega[bh % heads]
        _row_features(q[bh], k[bh], w_rows.T, q_scale, k_scale, key_bias, has_bias, bh, u, fq, fk,
                      logw, fnorm, bits)
        np.dot(fk.T, v[bh], S)
        for a in range(width):
            acc = fk[0, a] * 0
            for r in range(nk):
                acc += fk[r, a]
            z[a] = acc
        for r in range(nq):
            den = fq[r, 0] * 0
            for a in range(width):
                den += fq[r, a] * z[a]
            _read_gradients(den, dout[bh], out[bh], dnum, dden, r)
        np.dot(dnum, S.T, dfq)
        for r in range(nq):
            for a in range(width):
                dfq[r, a] += dden[r] * z[a]
        np.dot(fq.T, dnum, dS)
        for a in range(width):
            acc = fq[0, a] * 0
            for r in range(nq):
                acc += fq[r, a] * dden[r]
            dz[a] = acc
        np.dot(v[bh], dS.T, dfk)
        for r in range(nk):
            for a in range(width):
                dfk[r, a] += dz[a]
        np.dot(fk, dS, dv[bh])
        _input_gradients(k[bh], w_rows, q_scale, k_scale, fq, fk, dfq, dfk, dq[bh], dk[bh], key_u[bh])


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _chunk_decays(log_gate, bh, has_gate, c0, L, with_matrix, dec, cum, into, tail, bits):
    """Decays of chunk ``[c0, c0 + L)``: ``dec [L, L]`` (when ``with_matrix``), ``into``, ``tail``;
    returns the chunk's total decay ``exp(b_L)``."""
    if not has_gate:
        for t in range(L):
            into[t] = 1.0
            tail[t] = 1.0
            if with_matrix:
                for s in range(L):
                    dec[t, s] = 1.0 if s <= t else 0.0
        return 1.0
    acc = 0.0
    for r in range(L):
        acc += log_gate[bh, c0 + r]
        cum[r] = acc
    if with_matrix:
        for t in range(L):
            for s in range(L):
                dec[t, s] = cum[t] - cum[s] if s <= t else -np.inf
        _exp_block(dec, bits, L, L)
    for t in range(L):
        into[t] = math.exp(cum[t])
        tail[t] = math.exp(cum[L - 1] - cum[t])
    return into[L - 1]


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _causal_tasks(q, k, v, omega, heads, q_scale, k_scale, key_bias, has_bias, log_gate, has_gate,
                  chunk, out, dout, dq, dk, dv, key_u, bits_dtype, t0, t1):
    """Causal / gated gradients of batch rows ``[t0, t1)``: forward sweep, then reverse sweep."""
    n = q.shape[1]
    width = omega.shape[1]
    m = width
    dvd = v.shape[2]
    dt = q.dtype
    u = np.empty((n, width), dt)
    bits = np.empty((n, max(width, chunk)), bits_dtype)
    logw = np.empty(n, dt)
    fnorm = np.empty(n, dt)
    fq, fk = np.empty((n, m), dt), np.empty((n, m), dt)
    dfq, dfk = np.empty((n, m), dt), np.empty((n, m), dt)
    dnum, dden = np.empty((n, dvd), dt), np.empty(n, dt)
    scores = np.empty(chunk * chunk, dt)  # flat: contiguous L x L views for BLAS
    dscores = np.empty(chunk * chunk, dt)
    dec = np.empty((chunk, chunk), dt)
    cum, into, tail = np.empty(chunk, dt), np.empty(chunk, dt), np.empty(chunk, dt)
    scaled = np.empty((chunk, m), dt)
    prod = np.empty((chunk, m), dt)
    prod_v = np.empty((chunk, dvd), dt)
    S, G, upd = np.empty((m, dvd), dt), np.empty((m, dvd), dt), np.empty((m, dvd), dt)
    z, gz = np.empty(m, dt), np.empty(m, dt)
    n_chunks = (n + chunk - 1) // chunk
    for bh in range(t0, t1):
        w_rows = omega[bh % heads]
        _row_features(q[bh], k[bh], w_rows.T, q_scale, k_scale, key_bias, has_bias, bh, u, fq, fk,
                      logw, fnorm, bits)
        vb, ob, gb, dvb = v[bh], out[bh], dout[bh], dv[bh]
        S[:, :] = 0.0
        z[:] = 0.0
        for ci in range(n_chunks):  # forward sweep
            c0 = ci * chunk
            c1 = min(n, c0 + chunk)
            L = c1 - c0
            last = _chunk_decays(log_gate, bh, has_gate, c0, L, True, dec, cum, into, tail, bits)
            fqc, fkc, vc = fq[c0:c1], fk[c0:c1], vb[c0:c1]
            a_ = scores[: L * L].reshape((L, L))
            np.dot(fqc, fkc.T, a_)
            for t in range(L):
                acc = a_[t, 0] * 0
                for s in range(L):
                    a_[t, s] *= dec[t, s]
                    acc += a_[t, s]
                zq = fqc[t, 0] * 0
                for x in range(m):
                    zq += fqc[t, x] * z[x]
                _read_gradients(acc + into[t] * zq, gb, ob, dnum, dden, c0 + t)
            dnc = dnum[c0:c1]
            da = dscores[: L * L].reshape((L, L))
            np.dot(dnc, vc.T, da)
            for t in range(L):
                for s in range(L):
                    da[t, s] = (da[t, s] + dden[c0 + t]) * dec[t, s]
            np.dot(a_.T, dnc, dvb[c0:c1])
            np.dot(da, fkc, dfq[c0:c1])
            np.dot(da.T, fqc, dfk[c0:c1])
            pr = prod[:L]
            np.dot(dnc, S.T, pr)  # the queries' read of the state
            for t in range(L):
                e = into[t]
                for x in range(m):
                    dfq[c0 + t, x] += e * (pr[t, x] + dden[c0 + t] * z[x])
            kt = scaled[:L]
            for s in range(L):
                for x in range(m):
                    kt[s, x] = fkc[s, x] * tail[s]
            np.dot(kt.T, vc, upd)
            for x in range(m):
                acc = z[x] * last
                for s in range(L):
                    acc += kt[s, x]
                z[x] = acc
                for c in range(dvd):
                    S[x, c] = S[x, c] * last + upd[x, c]
        G[:, :] = 0.0
        gz[:] = 0.0
        for ci in range(n_chunks - 1, -1, -1):  # reverse sweep
            c0 = ci * chunk
            c1 = min(n, c0 + chunk)
            L = c1 - c0
            last = _chunk_decays(log_gate, bh, has_gate, c0, L, False, dec, cum, into, tail, bits)
            fqc, fkc, vc = fq[c0:c1], fk[c0:c1], vb[c0:c1]
            if ci < n_chunks - 1:  # G = 0 after the last chunk
                pr = prod[:L]
                np.dot(vc, G.T, pr)
                kt = scaled[:L]
                for s in range(L):
                    for x in range(m):
                        dfk[c0 + s, x] += tail[s] * (pr[s, x] + gz[x])
                        kt[s, x] = fkc[s, x] * tail[s]
                pv = prod_v[:L]
                np.dot(kt, G, pv)
                for s in range(L):
                    for c in range(dvd):
                        dvb[c0 + s, c] += pv[s, c]
            if ci == 0:
                break
            qi = scaled[:L]
            for t in range(L):
                for x in range(m):
                    qi[t, x] = fqc[t, x] * into[t]
            np.dot(qi.T, dnum[c0:c1], upd)
            for x in range(m):
                acc = gz[x] * last
                for t in range(L):
                    acc += qi[t, x] * dden[c0 + t]
                gz[x] = acc
                for c in range(dvd):
                    G[x, c] = G[x, c] * last + upd[x, c]
        _input_gradients(k[bh], w_rows, q_scale, k_scale, fq, fk, dfq, dfk, dq[bh], dk[bh], key_u[bh])


def backward(rinp, out, dout):
    """Gradients of positive drop-in RFA for canonical NumPy inputs on the CPU threads.

    Parameters and results as :func:`mcattn.rfa.grad_chunked.backward`.
    """
    q, k, v = rinp.q, rinp.k, rinp.v
    dt = q.dtype.type
    bh = q.shape[0]
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    key_u = np.empty(k.shape[:2], q.dtype)
    has_bias = rinp.key_bias is not None
    key_bias = rinp.key_bias if has_bias else np.zeros((1, 1), q.dtype)
    omega = np.ascontiguousarray(rinp.omega)
    heads = omega.shape[0]
    bits = _bits_dtype(q.dtype)
    common = (q, k, v, omega, heads, dt(rinp.q_scale), dt(rinp.k_scale), key_bias, has_bias)
    if rinp.is_causal:
        has_gate = rinp.log_gate is not None
        log_gate = rinp.log_gate if has_gate else np.zeros((1, 1), q.dtype)
        chunk = max(1, min(int(rinp.chunk_size), q.shape[1]))
        run_tasks(_causal_tasks, bh, *common, log_gate, has_gate, chunk, out, dout, dq, dk, dv, key_u,
                  bits, chunks_per_thread=1)
    else:
        run_tasks(_plain_tasks, bh, *common, out, dout, dq, dk, dv, key_u, bits, chunks_per_thread=1)
    return dq, dk, dv, key_u

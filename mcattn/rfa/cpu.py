"""Random feature attention on the CPU: Numba kernels, features computed a block at a time.

Non-causal (two launches of :func:`mcattn._cpu.run_tasks`):

1. one task per batch row walks over blocks of keys: projections ``U = K W^T`` (BLAS),
   the feature map, the key weights with an online shift (a running maximum of the
   log-weights; the state is rescaled when it grows), ``S += (w f)^T V`` (BLAS), ``z``,
   the mass;
2. one task per block of query rows: projections, features, ``num = F S`` (BLAS), the
   floored denominators, the output.

Causal and gated (one task per batch row, chunks in order): the chunked form of
:func:`mcattn.rfa.naive.chunked` — ``A = F_q F_k^T`` (BLAS, ``C x C``) masked by the
causal triangle (times ``exp(b_t - b_s)`` with a gate), ``num = A V + e^b (F_q S)``,
then ``S <- e^{b_L} S + (F_k e^{b_L - b})^T V``. Memory beyond the inputs and the output is
``O(C (d + D + m + dv) + C^2 + m dv)`` per thread: no feature matrix of the whole
sequence, no ``T x m x dv`` prefix sum.

Transcendentals: without SVML a libm call per feature would cost more than the matrix
products, so float32 uses the vectorisable exp of :mod:`mcattn.exact.cpu` (all
arguments are ``<= 0``: features ``exp(u - max u)``, weights, decays) and a vectorisable
sin/cos (Cody-Waite reduction by ``pi/2`` in three parts, Taylor polynomials of degree
9 and 10 on ``|r| <= pi/4``, truncation error below 2e-9; accurate for ``|u| < 1e4``).
float64 uses libm.

Backward (:func:`backward`): Numba kernels, one task per batch row, ``O(N m)`` memory.

The same sweeps as :func:`mcattn.rfa.naive.backward` (the formulas are there), run per
batch row on :func:`mcattn._cpu.run_tasks`'s threads with BLAS on small blocks:

1. features of the whole row, ``F_q``, ``F_k`` ``[N, m]`` (the forward's feature map,
   :func:`_features`; keys weighted by ``exp(log-weight - max)``, masked
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
from numba import types
from numba.extending import overload

from .. import config
from .._cpu import run_tasks
from .._cpu_math import bits_dtype as _bits_dtype
from .._cpu_math import exp_block as _exp_block
from .._jit import njit

__all__ = ["forward", "step", "backward"]

_FLAGS = {"nsz", "contract", "reassoc"}  # order of sums only; no finite-math assumptions
_KIND_CODE = {"positive": 0, "sincos": 1, "arccos": 2}

_TWO_OVER_PI = np.float32(2.0 / math.pi)
_HALF = np.float32(0.5)
# pi/2 = P1 + P2 + P3, P1 and P2 with few mantissa bits so that n * P1, n * P2 are exact.
_P1 = np.float32(1.5703125)
_P2 = np.float32(4.837512969970703125e-4)
_P3 = np.float32(7.54978995489188216e-8)
_S3, _S5, _S7, _S9 = (np.float32(c) for c in (-1 / 6, 1 / 120, -1 / 5040, 1 / 362880))
_C2, _C4, _C6, _C8, _C10 = (np.float32(c) for c in (-1 / 2, 1 / 24, -1 / 720, 1 / 40320, -1 / 3628800))
_ONE = np.float32(1.0)


@njit(nogil=True, cache=True, fastmath={"contract"})
def _sincos_block_f32(u, f, rows, width, inv):
    """``f[:, :width] = sin(u) * inv``, ``f[:, width:2 width] = cos(u) * inv`` (float32)."""
    for r in range(rows):
        for c in range(width):
            x = u[r, c]
            n = np.floor(x * _TWO_OVER_PI + _HALF)
            y = ((x - n * _P1) - n * _P2) - n * _P3
            y2 = y * y
            s = y * (_ONE + y2 * (_S3 + y2 * (_S5 + y2 * (_S7 + y2 * _S9))))
            co = _ONE + y2 * (_C2 + y2 * (_C4 + y2 * (_C6 + y2 * (_C8 + y2 * _C10))))
            j = np.int32(n) & 3
            sv = co if (j & 1) else s
            cv = s if (j & 1) else co
            if j & 2:
                sv = -sv
            if (j + 1) & 2:
                cv = -cv
            f[r, c] = sv * inv
            f[r, width + c] = cv * inv


@njit(nogil=True, cache=True)
def _sincos_block_f64(u, f, rows, width, inv):
    """``f[:, :width] = sin(u) * inv``, ``f[:, width:2 width] = cos(u) * inv`` (float64, libm)."""
    for r in range(rows):
        for c in range(width):
            f[r, width + c] = math.cos(u[r, c]) * inv
            f[r, c] = math.sin(u[r, c]) * inv


def _sincos_block(u, f, rows, width, inv):
    """``f = [sin u, cos u] * inv`` (typed by dtype: see the overload)."""
    raise NotImplementedError("only callable from Numba-compiled code")


# Chosen at typing time from the dtype, so the kernels take no function arguments: a
# function-typed argument would make Numba's on-disk cache miss in every new process.
@overload(_sincos_block, jit_options={"nogil": True})
def _sincos_block_typed(u, f, rows, width, inv):
    if u.dtype == types.float32:
        return lambda u, f, rows, width, inv: _sincos_block_f32(u, f, rows, width, inv)
    return lambda u, f, rows, width, inv: _sincos_block_f64(u, f, rows, width, inv)


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _features(x, omega_t, factor, unit, kind, u, f, logw, fnorm, bits):
    """Features ``f [L, m]``, log-weights ``logw [L]`` and feature norms ``fnorm [L]`` of rows ``x [L, d]``.

    ``omega_t`` is ``W^T`` ``[d, D]``; ``u`` ``[L, D]`` and ``bits`` are scratch. The rows
    fed to the map are ``factor * x`` (``factor * x / |x|`` when ``unit``); since the
    projection is linear the factor is applied to ``u``.
    """
    rows, d = x.shape
    width = omega_t.shape[1]
    inv = 1.0 / math.sqrt(width)
    np.dot(x, omega_t, u)
    for r in range(rows):
        sq = x[r, 0] * x[r, 0] * 0
        for c in range(d):
            sq += x[r, c] * x[r, c]
        scale = factor
        if unit:
            scale = factor / math.sqrt(sq) if sq > 0 else factor * 0
        for c in range(width):
            u[r, c] *= scale
        logw[r] = 0.5 * scale * scale * sq  # |x'|^2 / 2
    if kind == 0:  # positive: exp(u - max u) / sqrt(D), log-weight max u - |x'|^2 / 2
        for r in range(rows):
            top = u[r, 0]
            for c in range(1, width):
                top = max(top, u[r, c])
            for c in range(width):
                u[r, c] -= top
            logw[r] = top - logw[r]
        _exp_block(u, bits, rows, width)
        for r in range(rows):
            for c in range(width):
                f[r, c] = u[r, c] * inv
    elif kind == 1:  # sincos: [sin u, cos u] / sqrt(D), log-weight |x'|^2 / 2 (the key factor)
        _sincos_block(u, f, rows, width, inv)
    else:  # arccos: max(u, 0) / sqrt(D)
        for r in range(rows):
            logw[r] = 0.0
            for c in range(width):
                f[r, c] = max(u[r, c], 0.0) * inv
    m = f.shape[1]
    for r in range(rows):
        acc = f[r, 0] * f[r, 0] * 0
        for c in range(m):
            acc += f[r, c] * f[r, c]
        fnorm[r] = math.sqrt(acc)


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _finish_rows(num, den, ref, eps, out_rows, rows, dv):
    """``out_rows = num / den`` with ``den`` floored at ``eps * ref``; returns the floored count."""
    low = 0
    for r in range(rows):
        if ref[r] > 0:
            d_r = den[r]
            if d_r <= eps * ref[r]:
                d_r = eps * ref[r]
                low += 1
            inv = 1.0 / d_r
            for c in range(dv):
                out_rows[r, c] = num[r, c] * inv
        else:
            for c in range(dv):
                out_rows[r, c] = 0.0
    return low


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _state_tasks(k, v, omega, heads, kind, unit, k_scale, key_bias, has_bias, block, S, z, mass,
                 bits_dtype, t0, t1):
    """Non-causal phase 1: the state ``S [BH, m, dv]``, ``z``, mass of every batch row in ``[t0, t1)``."""
    nk = k.shape[1]
    width = omega.shape[1]
    m, dv = S.shape[1], S.shape[2]
    u = np.empty((block, width), k.dtype)
    f = np.empty((block, m), k.dtype)
    bits = np.empty((block, width), bits_dtype)
    logw = np.empty(block, k.dtype)
    fnorm = np.empty(block, k.dtype)
    prod = np.empty((m, dv), k.dtype)
    for bh in range(t0, t1):
        omega_t = omega[bh % heads].T
        Sb = S[bh]
        zb = z[bh]
        Sb[:, :] = 0.0
        zb[:] = 0.0
        total = 0.0
        shift = -np.inf
        for j0 in range(0, nk, block):
            j1 = min(nk, j0 + block)
            rows = j1 - j0
            fr = f[:rows]
            _features(k[bh, j0:j1], omega_t, k_scale, unit, kind, u[:rows], fr, logw, fnorm, bits)
            top = -np.inf
            for r in range(rows):
                if has_bias:
                    logw[r] += key_bias[bh, j0 + r]
                top = max(top, logw[r])
            if top == -np.inf:  # every key of the block is masked
                continue
            if top > shift:  # rescale the state to the new shift (0 before any key)
                rescale = math.exp(shift - top)
                for a in range(m):
                    zb[a] *= rescale
                    for c in range(dv):
                        Sb[a, c] *= rescale
                total *= rescale
                shift = top
            for r in range(rows):
                w = math.exp(logw[r] - shift)
                total += w * fnorm[r]
                for a in range(m):
                    fr[r, a] *= w
                    zb[a] += fr[r, a]
            np.dot(fr.T, v[bh, j0:j1], prod)
            for a in range(m):
                for c in range(dv):
                    Sb[a, c] += prod[a, c]
        mass[bh] = total


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _readout_tasks(q, omega, heads, kind, unit, q_scale, S, z, mass, eps, block, out, clamped,
                   bits_dtype, t0, t1):
    """Non-causal phase 2: outputs of query block ``task`` (``n_blocks`` per batch row)."""
    nq = q.shape[1]
    width = omega.shape[1]
    m, dv = S.shape[1], S.shape[2]
    n_blocks = (nq + block - 1) // block
    u = np.empty((block, width), q.dtype)
    f = np.empty((block, m), q.dtype)
    bits = np.empty((block, width), bits_dtype)
    logw = np.empty(block, q.dtype)
    fnorm = np.empty(block, q.dtype)
    num = np.empty((block, dv), q.dtype)
    den = np.empty(block, q.dtype)
    ref = np.empty(block, q.dtype)
    for task in range(t0, t1):
        bh = task // n_blocks
        i0 = (task % n_blocks) * block
        i1 = min(nq, i0 + block)
        rows = i1 - i0
        fr = f[:rows]
        _features(q[bh, i0:i1], omega[bh % heads].T, q_scale, unit, kind, u[:rows], fr, logw, fnorm,
                  bits)
        np.dot(fr, S[bh], num[:rows])
        zb = z[bh]
        for r in range(rows):
            acc = fr[r, 0] * 0
            for a in range(m):
                acc += fr[r, a] * zb[a]
            den[r] = acc
            ref[r] = fnorm[r] * mass[bh]
        clamped[task] = _finish_rows(num, den, ref, eps, out[bh, i0:i1], rows, dv)


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _chunked_tasks(q, k, v, omega, heads, kind, unit, q_scale, k_scale, key_bias, has_bias,
                   log_gate, has_gate, chunk, block, eps, out, clamped, bits_dtype, t0, t1):
    """Causal / gated RFA of batch rows ``[t0, t1)``, chunk after chunk (see the module docstring).

    Features are computed for ``block`` rows (a multiple of ``chunk``) at once: BLAS is
    about twice as fast on 256-row projections as on 64-row ones.
    """
    n = q.shape[1]
    width = omega.shape[1]
    dv = v.shape[2]
    m = 2 * width if kind == 1 else width
    dt = q.dtype
    u = np.empty((block, width), dt)
    fq = np.empty((block, m), dt)
    fk = np.empty((block, m), dt)
    bits = np.empty((block, max(width, chunk)), bits_dtype)
    logw_q = np.empty(block, dt)
    logw = np.empty(block, dt)
    qnorm = np.empty(block, dt)
    knorm = np.empty(block, dt)
    scores = np.empty(chunk * chunk, dt)  # flat: a contiguous L x L view for BLAS
    decay = np.empty((chunk, chunk), dt)
    cum = np.empty(chunk, dt)
    into = np.empty(chunk, dt)
    num = np.empty((chunk, dv), dt)
    prod = np.empty((chunk, dv), dt)
    den = np.empty(chunk, dt)
    ref = np.empty(chunk, dt)
    S = np.empty((m, dv), dt)
    upd = np.empty((m, dv), dt)
    z = np.empty(m, dt)
    for bh in range(t0, t1):
        omega_t = omega[bh % heads].T
        S[:, :] = 0.0
        z[:] = 0.0
        mass = 0.0
        shift = -np.inf
        low = 0
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            R = b1 - b0
            _features(q[bh, b0:b1], omega_t, q_scale, unit, kind, u[:R], fq[:R], logw_q, qnorm, bits)
            _features(k[bh, b0:b1], omega_t, k_scale, unit, kind, u[:R], fk[:R], logw, knorm, bits)
            top = -np.inf
            for r in range(R):
                if has_bias:
                    logw[r] += key_bias[bh, b0 + r]
                top = max(top, logw[r])
            if top > shift:  # rescale the carried state to the new shift
                rescale = math.exp(shift - top)
                for a in range(m):
                    z[a] *= rescale
                    for c in range(dv):
                        S[a, c] *= rescale
                mass *= rescale
                shift = top
            for r in range(R):  # weighted key features (weight 0 while nothing is visible)
                w = math.exp(logw[r] - shift) if shift > -np.inf else 0.0
                knorm[r] *= w
                for a in range(m):
                    fk[r, a] *= w
            for c0 in range(b0, b1, chunk):
                c1 = min(b1, c0 + chunk)
                L = c1 - c0
                o = c0 - b0
                mass, chunk_low = _chunk_step(
                    fq[o : o + L], fk[o : o + L], qnorm[o : o + L], knorm[o : o + L], v[bh, c0:c1],
                    log_gate[bh, c0:c1] if has_gate else log_gate[0, :0], has_gate, S, z, mass, eps,
                    out[bh, c0:c1], scores, decay, cum, into, num, prod, den, ref, upd, bits)
                low += chunk_low
        clamped[bh] = low


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _chunk_step(fqc, fkc, qnorm, knorm, vc, log_gate, has_gate, S, z, mass, eps, out_rows, scores,
                decay, cum, into, num, prod, den, ref, upd, bits):
    """One chunk of ``L`` tokens: outputs from intra-chunk products plus the carried state, then
    the state carried to the chunk end. ``fkc`` holds weighted key features (scaled here by
    their decay to the chunk end). Returns the new mass and the floored rows."""
    L, m = fqc.shape
    dv = vc.shape[1]
    sc = scores[: L * L].reshape((L, L))
    np.dot(fqc, fkc.T, sc)
    dec = decay[:L, :L]
    key_mass = mass * 0
    if has_gate:
        # Cumulative log-gates b_t (inclusive) and the decay matrix exp(b_t - b_s), s <= t.
        acc = 0.0
        for r in range(L):
            acc += log_gate[r]
            cum[r] = acc
        for t in range(L):
            for s in range(L):
                dec[t, s] = cum[t] - cum[s] if s <= t else -np.inf
            into[t] = cum[t]
        _exp_block(dec, bits, L, L)
        _exp_block(into[:L].reshape((1, L)), bits[:1, :L], 1, L)
        for t in range(L):
            acc_den = sc[t, 0] * 0
            acc_ref = sc[t, 0] * 0
            for s in range(L):
                sc[t, s] *= dec[t, s]
                acc_den += sc[t, s]
                acc_ref += dec[t, s] * knorm[s]
            den[t] = acc_den
            ref[t] = acc_ref
    else:  # causal mask only: zero the upper triangle, prefix sums of the key norms
        run = knorm[0] * 0
        for t in range(L):
            acc_den = sc[t, 0] * 0
            for s in range(t + 1):
                acc_den += sc[t, s]
            for s in range(t + 1, L):
                sc[t, s] = 0.0
            run += knorm[t]
            den[t] = acc_den
            ref[t] = run
            into[t] = 1.0
        key_mass = run
    nm = num[:L]
    np.dot(sc, vc, nm)
    # Queries read the carried state, decayed by exp(b_t) within the chunk.
    pr = prod[:L]
    np.dot(fqc, S, pr)
    for t in range(L):
        e = into[t]
        acc = fqc[t, 0] * 0
        for a in range(m):
            acc += fqc[t, a] * z[a]
        den[t] += e * acc
        ref[t] = qnorm[t] * (ref[t] + e * mass)
        for c in range(dv):
            nm[t, c] += e * pr[t, c]
    low = _finish_rows(nm, den, ref, eps, out_rows, L, dv)
    # Carry the state to the chunk end: key s decays by exp(b_L - b_s) = dec[L-1, s].
    last = into[L - 1]
    tail_mass = mass * 0
    if has_gate:
        for s in range(L):
            tail = dec[L - 1, s]
            tail_mass += tail * knorm[s]
            for a in range(m):
                fkc[s, a] *= tail
    else:
        tail_mass += key_mass
    np.dot(fkc.T, vc, upd)
    for a in range(m):
        acc = z[a] * last
        for s in range(L):
            acc += fkc[s, a]
        z[a] = acc
        for c in range(dv):
            S[a, c] = S[a, c] * last + upd[a, c]
    return mass * last + tail_mass, low


@njit(nogil=True, cache=True, fastmath=_FLAGS)
def _step_rows(q, k, v, omega, heads, kind, unit, q_scale, k_scale, key_bias, has_bias, log_gate,
               has_gate, eps, S, z, mass, shift, out, flags, bits_dtype):
    """One decoding token for every batch row (see :func:`mcattn.rfa.naive.step`), in place."""
    width = omega.shape[1]
    m, dv = S.shape[1], S.shape[2]
    dt = q.dtype
    u = np.empty((1, width), dt)
    fq = np.empty((1, m), dt)
    fk = np.empty((1, m), dt)
    bits = np.empty((1, width), bits_dtype)
    logw_q = np.empty(1, dt)
    logw_k = np.empty(1, dt)
    qnorm = np.empty(1, dt)
    knorm = np.empty(1, dt)
    num = np.empty((1, dv), dt)
    den = np.empty(1, dt)
    ref = np.empty(1, dt)
    for bh in range(q.shape[0]):
        omega_t = omega[bh % heads].T
        _features(q[bh], omega_t, q_scale, unit, kind, u, fq, logw_q, qnorm, bits)
        _features(k[bh], omega_t, k_scale, unit, kind, u, fk, logw_k, knorm, bits)
        Sb, zb = S[bh], z[bh]
        rescale = 1.0
        if has_gate:
            rescale = math.exp(log_gate[bh, 0])
        lw = logw_k[0] + key_bias[bh, 0] if has_bias else logw_k[0]
        if lw > shift[bh]:  # a new largest log-weight: move the state to it
            rescale *= math.exp(shift[bh] - lw)
            shift[bh] = lw
        w = math.exp(lw - shift[bh]) if shift[bh] > -np.inf else 0.0
        mass[bh] = mass[bh] * rescale + w * knorm[0]
        acc_den = fq[0, 0] * 0
        for a in range(m):
            wk = w * fk[0, a]
            zb[a] = zb[a] * rescale + wk
            acc_den += fq[0, a] * zb[a]
            for c in range(dv):
                Sb[a, c] = Sb[a, c] * rescale + wk * v[bh, 0, c]
        np.dot(fq, Sb, num)
        den[0] = acc_den
        ref[0] = qnorm[0] * mass[bh]
        flags[bh] = _finish_rows(num, den, ref, eps, out[bh : bh + 1], 1, dv)


def step(state, rinp):
    """One decoding token (``Nq = Nk = 1``) on the CPU; the state is updated in place.

    Parameters
    ----------
    state : mcattn.rfa.naive.RFAState
        NumPy arrays.
    rinp : mcattn.rfa._inputs.RFAInputs
        The token's canonical inputs.

    Returns
    -------
    out : numpy.ndarray ``[BH, dv]``
    clamped : numpy.ndarray of int64 ``[BH]``
    """
    q = rinp.q
    bh = q.shape[0]
    dt = q.dtype.type
    out = np.empty((bh, rinp.value_dim), q.dtype)
    flags = np.zeros(bh, np.int64)
    has_bias, has_gate = rinp.key_bias is not None, rinp.log_gate is not None
    dummy = np.zeros((1, 1), q.dtype)
    _step_rows(q, rinp.k, rinp.v, rinp.omega, rinp.omega.shape[0], _KIND_CODE[rinp.kind], rinp.unit,
               dt(rinp.q_scale), dt(rinp.k_scale), rinp.key_bias if has_bias else dummy, has_bias,
               rinp.log_gate if has_gate else dummy, has_gate, dt(rinp.eps), state.S, state.z, state.mass,
               state.shift, out, flags, np.int32 if q.dtype == np.float32 else np.int64)
    return out, flags


def forward(rinp):
    """Random feature attention of canonical inputs on the CPU threads.

    Parameters
    ----------
    rinp : mcattn.rfa._inputs.RFAInputs
        NumPy arrays.

    Returns
    -------
    out : numpy.ndarray ``[BH, Nq, dv]``
    clamped : numpy.ndarray of int64 ``[BH]`` (or per task; only the sum is meaningful)
    """
    q, k, v = rinp.q, rinp.k, rinp.v
    bh, nq, _ = q.shape
    dv, m = rinp.value_dim, rinp.feature_dim
    dt = q.dtype.type
    out = np.zeros((bh, nq, dv), q.dtype)
    kind = _KIND_CODE[rinp.kind]
    bits_dtype = np.int32 if q.dtype == np.float32 else np.int64
    has_bias = rinp.key_bias is not None
    key_bias = rinp.key_bias if has_bias else np.zeros((1, 1), q.dtype)
    omega = rinp.omega
    heads = omega.shape[0]
    if rinp.is_causal:
        has_gate = rinp.log_gate is not None
        log_gate = rinp.log_gate if has_gate else np.zeros((1, 1), q.dtype)
        chunk = max(1, min(int(rinp.chunk_size), nq))
        block = chunk * max(1, int(config.RFA_CPU_BLOCK) // chunk)
        clamped = np.zeros(bh, np.int64)
        run_tasks(_chunked_tasks, bh, q, k, v, omega, heads, kind, rinp.unit, dt(rinp.q_scale),
                  dt(rinp.k_scale), key_bias, has_bias, log_gate, has_gate, chunk, block, dt(rinp.eps), out,
                  clamped, bits_dtype, chunks_per_thread=1)
        return out, clamped
    block = max(1, int(config.RFA_CPU_BLOCK))
    S = np.empty((bh, m, dv), q.dtype)
    z = np.empty((bh, m), q.dtype)
    mass = np.empty(bh, q.dtype)
    run_tasks(_state_tasks, bh, k, v, omega, heads, kind, rinp.unit, dt(rinp.k_scale), key_bias,
              has_bias, max(1, min(block, rinp.nk)), S, z, mass, bits_dtype, chunks_per_thread=1)
    qblock = max(1, min(block, nq))
    n_tasks = bh * ((nq + qblock - 1) // qblock)
    clamped = np.zeros(n_tasks, np.int64)
    run_tasks(_readout_tasks, n_tasks, q, omega, heads, kind, rinp.unit, dt(rinp.q_scale), S, z, mass,
              dt(rinp.eps), qblock, out, clamped, bits_dtype)
    return out, clamped


# ----------------------------------------------------------------------------- backward
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

    Parameters and results as :func:`mcattn.rfa.naive.backward`.
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

"""Hybrid attention on the CPU: LATTE's estimate picks the kept keys, a Numba kernel per row.

Per batch row, the MS4B estimate ``hi(q8) . hi(k8)`` is one float32 BLAS product of the
nibble matrices (small integers: exact). Then per query row (threads over rows):

1. the keep rule in exact float64 arithmetic, the same operations as
   :func:`mcattn.latte.naive.keep_rows` (so the kept sets are the reference's);
2. the kept keys' exact scores ``scale q.k``, their softmax weights and ``sum w v``;
3. ``pooled``: per key block the estimated mass of its dropped keys and their value sum,
   the block's value sum (once per batch row) minus its kept keys' values.

Masks (a float bias, key padding) enter the estimate and the scores as in
:mod:`mcattn.latte.naive`; masked keys are neither kept nor pooled.
"""

import math

import numpy as np

from .._cpu import run_tasks
from .._jit import njit
from ..latte.naive import MODES, nibbles

__all__ = ["forward"]


@njit(nogil=True, cache=True)
def _rows(hh, sk256, c_rows, theta, mode, causal, bias, has_bias, q, k, v, vsum, block, pooled, out,
          kept, share, t0, t1):
    nk, d = k.shape
    dv = v.shape[1]
    u = np.empty(nk, np.float64)
    s = np.empty(nk, np.float64)
    keep = np.empty(nk, np.bool_)
    acc = np.empty(dv, np.float64)
    dsum = np.empty(dv, np.float64)
    for i in range(t0, t1):
        rend = min(i + 1, nk) if causal else nk
        if rend == 0:
            continue
        c = c_rows[i]
        r = i if bias.shape[0] > 1 else 0
        top = -np.inf
        count = 0
        for j in range(rend):
            u[j] = np.float64(hh[i, j]) * sk256[j]
            if has_bias:  # as latte's rule: the estimate in units of c, plus bias / c
                bj = bias[r, j]
                u[j] = -np.inf if bj == -np.inf else u[j] + np.float64(bj) / c
            if u[j] > -np.inf:
                count += 1
            if u[j] > top:
                top = u[j]
        if count == 0:
            continue  # no visible key: a zero row
        if mode == 0:
            cut = top - theta / c
        elif mode == 1:
            cut = min(theta / c, top)
        else:
            kk = int(theta)
            if count <= kk:
                cut = -np.inf
            else:
                cut = np.partition(u[:rend].copy(), rend - kk)[rend - kk]
        m = -np.inf
        n = 0
        for j in range(rend):
            keep[j] = u[j] >= cut and u[j] > -np.inf
            if keep[j]:
                x = 0.0
                for t in range(d):
                    x += q[i, t] * k[j, t]
                if has_bias:
                    x += np.float64(bias[r, j])
                s[j] = x
                n += 1
                if x > m:
                    m = x
        kept[i] = n
        total = 0.0
        for t in range(dv):
            acc[t] = 0.0
        for j in range(rend):
            if keep[j]:
                w = math.exp(s[j] - m)
                total += w
                for t in range(dv):
                    acc[t] += w * v[j, t]
        rem = 0.0
        if pooled:
            for j0 in range(0, rend, block):
                j1 = min(j0 + block, rend)
                mass = 0.0
                cnt = 0
                full = j1 - j0 == block or j1 == nk
                if full:
                    for t in range(dv):
                        dsum[t] = vsum[j0 // block, t]
                else:
                    for t in range(dv):
                        dsum[t] = 0.0
                for j in range(j0, j1):
                    if keep[j] or u[j] == -np.inf:  # kept, or masked: not pooled
                        if full:
                            for t in range(dv):
                                dsum[t] -= v[j, t]
                    else:
                        est = c * (np.float64(hh[i, j]) * sk256[j])  # as the reference: c u + bias
                        if has_bias:
                            est += np.float64(bias[r, j])
                        mass += math.exp(est - m)
                        cnt += 1
                        if not full:
                            for t in range(dv):
                                dsum[t] += v[j, t]
                if cnt:
                    f = mass / cnt
                    rem += mass
                    for t in range(dv):
                        acc[t] += f * dsum[t]
        total += rem
        share[i] = rem / total
        for t in range(dv):
            out[i, t] = acc[t] / total


def forward(lat, remainder, block):
    """Hybrid attention of canonical LATTE inputs; as :func:`mcattn.hybrid.naive.forward`."""
    inp = lat.inp
    bh, nq, nk, dv = inp.q.shape[0], inp.nq, inp.nk, inp.value_dim
    out = np.zeros((bh, nq, dv), np.float64)
    kept = np.zeros((bh, nq), np.int64)
    share = np.zeros((bh, nq), np.float64)
    pooled = remainder == "pooled"
    mask = inp.mask
    has_bias = mask.bias is not None
    none = np.zeros((1, 1), np.float64)
    nblocks = -(-nk // block)
    for b in range(bh):
        hq = nibbles(lat.q8[b])[0].astype(np.float32)
        hk = nibbles(lat.k8[b])[0].astype(np.float32)
        hh = hq @ hk.T  # integers below 2^24: exact in float32
        sk256 = 256.0 * np.asarray(lat.s_k[b], np.float64)
        c_rows = inp.scale * np.asarray(lat.s_q[b], np.float64)
        q = np.ascontiguousarray(inp.q[b], np.float64) * inp.scale
        k = np.ascontiguousarray(inp.k[b], np.float64)
        v = np.ascontiguousarray(inp.v[b], np.float64)
        vpad = np.zeros((nblocks * block, dv))
        vpad[:nk] = v
        vsum = vpad.reshape(nblocks, block, dv).sum(1)
        bias = (np.ascontiguousarray(mask.bias[int(mask.mask_index[b])], np.float64) if has_bias
                else none)
        run_tasks(_rows, nq, hh, sk256, c_rows, float(lat.theta[b]), MODES[lat.mode],
                  bool(mask.is_causal), bias, has_bias, q, k, v, vsum, int(block), pooled, out[b], kept[b],
                  share[b], work=nq * nk * (inp.head_dim + dv))
    return out.astype(inp.dtype), kept, share

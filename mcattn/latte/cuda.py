"""LATTE on CUDA GPUs with numba.cuda (same algorithm as ``kernels/latte.cu``).

One thread per query row, blocks of ``config.CUDA_THREADS_PER_BLOCK`` rows. A thread
walks over the keys twice:

1. the MS4B estimate ``hh = hi(q8) . hi(k8)`` in integers and ``u = hh * 256 s_k``
   (plus ``bias / c``) in float64 -- an exact product -- for the row maximum (``safe``:
   of ``u - err``, with the error bound ``err`` from the nibbles in integers);
2. again, keeping the keys the rule keeps: the kept score (``q8 . k8`` in integers, or
   ``q . k``), an online softmax over them and ``sum p v``; with ``want_mass`` the exact
   scores of every visible key too, for the dropped mass.

The rule is evaluated with the same IEEE operations as :mod:`mcattn.latte.cpu`, so the
kept sets are the CPU kernel's, key for key. ``topk`` finds each row's cut without
storing the row: a bisection in value space snapped to the row's values
(:func:`kth_largest`; a few dozen extra passes over the keys, so it is the slow mode on
the GPU). Memory O(N d).
"""

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .. import config
from .._array import is_cupy

__all__ = ["forward", "kept_mask", "make_kernel", "MAX_HEAD_DIM", "ptx_signatures"]

MAX_HEAD_DIM = 128
_MAX_GRID_Y = 65535
#: The keep rule is evaluated in float64 on purpose (exact products of the int8 nibble
#: dot and the float32 scales, docs/design.md item 17), so the float32 kernel keeps the
#: same keys as the CPU kernel bit for bit; its softmax sums run in float64 as well. The
#: float32-purity test of tests/cuda/test_cuda_compile.py exempts it for that reason.
FLOAT64_ACCUMULATION = True


@functools.cache
def make_kernel(dtype_name):
    """The numba.cuda kernel for one compute dtype (``"float32"`` or ``"float64"``)."""
    from numba import float32, float64, int32, int64

    nb_type = float32 if dtype_name == "float32" else float64
    maxd = MAX_HEAD_DIM

    @cuda.jit(device=True, inline=True)
    def unit(qh, k8, bh, j, d, sk256, bias, slot, r, has_bias, c):
        """``u`` of key ``j`` (as the CPU kernel computes it), -inf if masked."""
        b = 0.0
        if has_bias:
            b = float64(bias[slot, r, j])
            if b == -math.inf:
                return -math.inf
        hh = 0
        for cc in range(d):
            hh += qh[cc] * (int32(k8[bh, j, cc]) >> 4)
        val = float64(hh) * sk256[bh, j]
        if has_bias:
            val = val + b / c
        return val

    @cuda.jit(device=True, inline=True)
    def kth_largest(qh, k8, bh, rend, d, sk256, bias, slot, r, has_bias, c, kk, top):
        """The ``kk``-th largest visible ``u`` of the row (a value of the row, ties counted).

        Bisection in value space between a value ``lo`` with at least ``kk`` values
        ``>= lo`` and a bound ``hb`` with fewer than ``kk`` values ``>= hb``, each step
        snapped to a value of the row; it ends when no value lies strictly between them,
        and then ``lo`` is the answer (the CPU kernel's partition gives the same value).
        """
        lo = math.inf
        count_top = 0
        for j in range(rend):
            x = unit(qh, k8, bh, j, d, sk256, bias, slot, r, has_bias, c)
            if x != -math.inf:
                lo = min(lo, x)
                if x == top:
                    count_top += 1
        if count_top >= kk:
            return top
        hb = top
        for _ in range(4096):  # halving a double interval ends well before this
            between = 0
            first = math.inf
            for j in range(rend):
                x = unit(qh, k8, bh, j, d, sk256, bias, slot, r, has_bias, c)
                if x > lo and x < hb:
                    between += 1
                    first = min(first, x)
            if between == 0:
                return lo
            mid = lo + (hb - lo) * 0.5
            if not (mid > lo and mid < hb):
                mid = first
            above = 0
            snap = math.inf
            for j in range(rend):
                x = unit(qh, k8, bh, j, d, sk256, bias, slot, r, has_bias, c)
                if x >= mid:
                    above += 1
                    snap = min(snap, x)
            if above >= kk:
                lo = snap
            else:
                hb = mid
        return lo

    @cuda.jit
    def latte_forward(q8, k8, qf, kf, v, s_q, s_k, sk256, theta, bias, mask_index, out, kept_out,
                      dropped_out, mask_out, scale, mode, int8_scores, has_bias, is_causal,
                      want_mass, write_mask, do_output):
        qh = cuda.local.array(maxd, int32)
        ql = cuda.local.array(maxd, int32)
        qrow = cuda.local.array(maxd, nb_type)
        acc = cuda.local.array(maxd, nb_type)
        bh = cuda.blockIdx.y
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        nq = q8.shape[1]
        nk = k8.shape[1]
        d = q8.shape[2]
        dv = v.shape[2]
        if i >= nq:
            return
        l1q = 0
        for cc in range(d):
            x = int32(q8[bh, i, cc])
            qh[cc] = x >> 4
            ql[cc] = x & 15
            l1q += abs(x)
            qrow[cc] = qf[bh, i, cc]
        ninf = -math.inf
        slot = mask_index[bh] if has_bias else 0
        r = i if bias.shape[1] > 1 else 0
        c = scale * float64(s_q[bh, i])
        rend = min(nk, i + 1) if is_causal else nk
        th = theta[bh]
        # Pass 1: the row maximum of the (lower) estimate.
        top = ninf
        visible = 0
        for j in range(rend):
            b = 0.0
            if has_bias:
                b = float64(bias[slot, r, j])
                if b == ninf:
                    continue
            hh = 0
            nib = 0
            l1k = 0
            for cc in range(d):
                y = int32(k8[bh, j, cc])
                yh = y >> 4
                hh += qh[cc] * yh
                if mode == 3:
                    yl = y & 15
                    nib += 16 * (abs(qh[cc]) * yl + ql[cc] * abs(yh)) + ql[cc] * yl
                    l1k += abs(y)
            val = float64(hh) * sk256[bh, j]
            if has_bias:
                val = val + b / c
            if mode == 3:
                e = (float64(nib) + (2.0 * (float64(l1q) + float64(l1k)) + d) / 4.0) * float64(s_k[bh, j])
                val = val - e
            top = max(top, val)
            visible += 1
        n = 0
        if top != ninf:
            if mode == 1:
                cut = min(th / c, top)
            elif mode == 2:
                kk = int64(th)
                if visible <= kk:
                    cut = ninf
                else:
                    cut = kth_largest(qh, k8, bh, rend, d, sk256, bias, slot, r, has_bias, c, kk, top)
            else:
                cut = top - th / c
            # Pass 2: keep, score, online softmax; exact scores of all keys for the dropped mass.
            m = ninf
            tot = 0.0
            for cc in range(dv):
                acc[cc] = 0.0
            tm = ninf
            t_all = 0.0
            t_drop = 0.0
            for j in range(rend):
                b = 0.0
                if has_bias:
                    b = float64(bias[slot, r, j])
                    if b == ninf:
                        continue
                hh = 0
                nib = 0
                l1k = 0
                dot8 = 0
                for cc in range(d):
                    y = int32(k8[bh, j, cc])
                    yh = y >> 4
                    hh += qh[cc] * yh
                    dot8 += (16 * qh[cc] + ql[cc]) * y
                    if mode == 3:
                        yl = y & 15
                        nib += 16 * (abs(qh[cc]) * yl + ql[cc] * abs(yh)) + ql[cc] * yl
                        l1k += abs(y)
                val = float64(hh) * sk256[bh, j]
                if has_bias:
                    val = val + b / c
                if mode == 3:
                    e = (float64(nib) + (2.0 * (float64(l1q) + float64(l1k)) + d) / 4.0) \
                        * float64(s_k[bh, j])
                    val = val + e
                keep = val >= cut
                fdot = 0.0
                if want_mass or (keep and not int8_scores):
                    for cc in range(d):
                        fdot += qrow[cc] * kf[bh, j, cc]
                if want_mass:
                    ts = fdot * scale + b
                    if ts > tm:
                        scale_old = math.exp(tm - ts)
                        t_all *= scale_old
                        t_drop *= scale_old
                        tm = ts
                    w = math.exp(ts - tm)
                    t_all += w
                    if not keep:
                        t_drop += w
                if not keep:
                    continue
                if write_mask:
                    mask_out[bh, i, j] = True
                n += 1
                if not do_output:
                    continue
                if int8_scores:
                    s = c * float64(s_k[bh, j]) * float64(dot8) + b
                else:
                    s = fdot * scale + b
                s = nb_type(s)
                if s > m:
                    rescale = math.exp(m - s)
                    tot *= rescale
                    for cc in range(dv):
                        acc[cc] *= rescale
                    m = s
                p = math.exp(s - m)
                tot += p
                for cc in range(dv):
                    acc[cc] += p * v[bh, j, cc]
            if want_mass:
                dropped_out[bh, i] = t_drop / t_all if t_all > 0 else 0.0
            if do_output:
                inv = 1.0 / tot
                for cc in range(dv):
                    out[bh, i, cc] = acc[cc] * inv
        kept_out[bh, i] = n

    return latte_forward


def ptx_signatures():
    """``(name, python function, argument types)`` of every kernel, for compile_ptx tests."""
    from numba import boolean, float32, float64, int8, int64

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        a3 = nb[:, :, ::1]
        args = (int8[:, :, ::1], int8[:, :, ::1], a3, a3, a3, float32[:, ::1], float32[:, ::1],
                float64[:, ::1], float64[::1], a3, int64[::1], a3, int64[:, ::1], float64[:, ::1],
                boolean[:, :, ::1], float64, int64, boolean, boolean, boolean, boolean, boolean,
                boolean)
        sigs.append((f"latte_forward_{name}", make_kernel(name).py_func, args))
    return sigs


def _run(lat, *, do_output, write_mask):
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    nk, dv = inp.nk, inp.value_dim
    on_device = is_cupy(q)
    xp = inp.xp
    out = xp.zeros((bh, nq, dv), dtype=q.dtype)
    kept = xp.zeros((bh, nq), dtype=np.int64)
    dropped = xp.zeros((bh, nq), dtype=np.float64)
    mask_out = xp.zeros((bh, nq, nk) if write_mask else (1, 1, 1), dtype=np.bool_)
    if bh == 0 or nq == 0 or nk == 0:
        return out, kept, dropped, mask_out
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else xp.zeros((1, 1, 1), q.dtype)
    mask_index = xp.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    theta = xp.asarray(lat.theta)
    sk256 = 256.0 * lat.s_k.astype(np.float64)
    if on_device:
        bring = cuda.as_cuda_array
    else:
        bring = cuda.to_device
    from .naive import MODES

    kernel = make_kernel(q.dtype.name)
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    d_bias = bring(bias)
    outputs = (out, kept, dropped, mask_out)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        m_slice = mask_out[b0:b1] if write_mask else mask_out
        dev = [bring(a) for a in (out[b0:b1], kept[b0:b1], dropped[b0:b1], m_slice)]
        kernel[((nq + threads - 1) // threads, b1 - b0), threads](
            bring(lat.q8[b0:b1]), bring(lat.k8[b0:b1]), bring(q[b0:b1]), bring(k[b0:b1]),
            bring(v[b0:b1]), bring(lat.s_q[b0:b1]), bring(lat.s_k[b0:b1]), bring(sk256[b0:b1]),
            bring(theta[b0:b1]), d_bias, bring(mask_index[b0:b1]), *dev, float(inp.scale),
            MODES[lat.mode], lat.exact_scores == "int8", has_bias, bool(inp.mask.is_causal),
            bool(lat.want_mass), write_mask, do_output,
        )
        if not on_device:
            for host, d in zip((out[b0:b1], kept[b0:b1], dropped[b0:b1], m_slice), dev):
                host[...] = d.copy_to_host()
    return outputs


def forward(lat):
    """LATTE attention of canonical inputs with numba.cuda; as :func:`mcattn.latte.cpu.forward`."""
    out, kept, dropped, _ = _run(lat, do_output=True, write_mask=False)
    return out, kept, dropped if lat.want_mass else None


def kept_mask(lat):
    """The kept sets, bool ``[BH, Nq, Nk]``."""
    return _run(lat, do_output=False, write_mask=True)[3]

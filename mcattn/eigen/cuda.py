"""Eigen reconstruction attention with numba.cuda (the algorithm of ``kernels/eigen.cu``).

One thread per query row: fixed columns, reconstruction, mask, the ``per_query`` largest
visible reconstructed scores computed exactly (repeated arg-max, ties to the lower
index), softmax and ``P V``, with the row in local memory (``n <= MAX_N``). Takes CuPy
arrays, or NumPy arrays under the simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .. import config
from .._array import is_cupy
from ._gpu import plan_arrays

__all__ = ["forward", "make_kernel", "MAX_HEAD_DIM", "MAX_N", "MAX_M", "ptx_signatures"]

# Per-thread local arrays: these limits keep the stack under 4 KiB in float64
# (tests/cuda/test_cuda_compile.py); longer windows run on the CPU backends.
MAX_HEAD_DIM, MAX_N, MAX_M = 64, 256, 64
_MAX_GRID_Y = 65535


@functools.cache
def make_kernel(dtype_name):
    """The numba.cuda kernel for one compute dtype (``"float32"`` or ``"float64"``)."""
    from numba import float32, float64, uint8

    nb_type = float32 if dtype_name == "float32" else float64
    maxd, maxn, maxm = MAX_HEAD_DIM, MAX_N, MAX_M
    # Typed constants: a bare 0.0 or -math.inf would promote the float32 kernel to float64.
    zero, one, neg_inf = nb_type(0.0), nb_type(1.0), nb_type(-math.inf)

    @cuda.jit
    def eigen_forward(q, k, v, out, cols, weights, base, per_query, bias, mask_index, scale,
                      has_bias, is_causal, head_offset):
        qs = cuda.local.array(maxd, nb_type)
        acc = cuda.local.array(maxd, nb_type)
        a_s = cuda.local.array(maxm, nb_type)
        s = cuda.local.array(maxn, nb_type)
        taken = cuda.local.array(maxn, uint8)
        b = cuda.blockIdx.y
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        nq = q.shape[1]
        if i >= nq:
            return
        nk = k.shape[1]
        d = q.shape[2]
        dv = v.shape[2]
        heads = cols.shape[0]
        m = cols.shape[1]
        h = (b + head_offset) % heads
        for c in range(d):
            qs[c] = q[b, i, c] * scale
        for t in range(m):
            dot = zero
            for c in range(d):
                dot += qs[c] * k[b, cols[h, t], c]
            a_s[t] = dot
        pos = i if base.shape[1] > 1 else 0
        for j in range(nk):
            r = base[h, pos, j]
            for t in range(m):
                r += a_s[t] * weights[h, t, j]
            s[j] = r
            taken[j] = 0
        for t in range(m):
            s[cols[h, t]] = a_s[t]
            taken[cols[h, t]] = 1
        slot = mask_index[b] if has_bias else 0
        row = i if bias.shape[1] > 1 else 0
        if has_bias:
            for j in range(nk):
                s[j] += bias[slot, row, j]
        if is_causal:
            for j in range(i + 1, nk):
                s[j] = neg_inf
        for _ in range(per_query):
            best = -1
            for j in range(nk):
                if taken[j] == 0 and s[j] > neg_inf and (best < 0 or s[j] > s[best]):
                    best = j
            if best < 0:
                break
            taken[best] = 1
            dot = zero
            for c in range(d):
                dot += qs[c] * k[b, best, c]
            if has_bias:
                dot += bias[slot, row, best]
            s[best] = dot
        top = neg_inf
        for j in range(nk):
            top = max(top, s[j])
        for c in range(dv):
            acc[c] = zero
        total = zero
        if top != neg_inf:
            for j in range(nk):
                p = math.exp(s[j] - top)
                total += p
                for c in range(dv):
                    acc[c] += p * v[b, j, c]
        inv = one / total if total > zero else zero
        for c in range(dv):
            out[b, i, c] = acc[c] * inv

    return eigen_forward


def ptx_signatures():
    """``(name, python function, argument types)`` of every kernel, for compile_ptx tests."""
    from numba import float32, float64, int64, types

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        arr3 = nb[:, :, ::1]
        args = (arr3, arr3, arr3, arr3, int64[:, ::1], arr3, arr3, int64, arr3, int64[::1], nb,
                types.boolean, types.boolean, int64)
        sigs.append((f"eigen_forward_{name}", make_kernel(name).py_func, args))
    return sigs


def forward(inp, plan):
    """Eigen reconstruction attention of canonical inputs with numba.cuda.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays (or NumPy arrays under the simulator); ``n <= 1024``, ``m <= 256``.
    plan : mcattn.eigen.plan.Plan

    Returns
    -------
    array, shape ``[BH, Nq, dv]`` (CuPy for CuPy inputs, NumPy under the simulator)
    """
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    dv = inp.value_dim
    on_device = is_cupy(q)
    if on_device:
        import cupy

        xp, bring = cupy, cuda.as_cuda_array
        out = cupy.zeros((bh, nq, dv), dtype=q.dtype)
    else:
        xp, bring = np, cuda.to_device
        out = np.zeros((bh, nq, dv), dtype=q.dtype)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out
    cols, weights, base, bias, index, has_bias = plan_arrays(inp, plan, xp)
    kernel = make_kernel(q.dtype.name)
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    args = [bring(a) for a in (cols, weights, base)]
    d_bias = bring(bias)
    for b0 in range(0, bh, _MAX_GRID_Y):
        b1 = min(bh, b0 + _MAX_GRID_Y)
        d_out = bring(out[b0:b1]) if on_device else cuda.device_array((b1 - b0, nq, dv), q.dtype)
        kernel[((nq + threads - 1) // threads, b1 - b0), threads](
            bring(q[b0:b1]), bring(k[b0:b1]), bring(v[b0:b1]), d_out, *args, int(plan.per_query),
            d_bias, bring(index[b0:b1]), q.dtype.type(inp.scale), has_bias,
            bool(inp.mask.is_causal), b0,
        )
        if not on_device:
            out[b0:b1] = d_out.copy_to_host()
    return out

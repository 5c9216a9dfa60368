"""Monte-Carlo value projection with numba.cuda (same draws as ``naive.py`` and ``cpu.py``).

One thread per (batch row, head, token): the thread number is the token's random stream.
Weight sampling uses the host-built alias tables (integer arithmetic, so the indices are
bit-identical to the CPU's); optimal sampling builds the token's CDF in a global scratch
``[d_in, chunk]`` (one column per thread; see ``_gpu.scratch_plan``) and searches it. A
per-thread local array would reserve ``8 d_in`` bytes of stack for every resident
thread. Accumulation in float64.

Shared draws (``shared_draws=True``): the plan of the compiled host planner
(:func:`mcattn.mca.shared_cpu.make_plan`) applied in one launch of
:func:`make_shared_kernel`, one thread per output element, accumulating in the input
precision (as the CPU version and ``kernels/mca_shared.cu``).
"""

import functools

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .. import random as mrandom
from .._array import is_cupy
from .._cupy import block_threads, numba_stream
from ._gpu import device_tables, scratch_plan, shared_device_args, shared_grid, shared_plan, split_shared_plan
from .cpu import weight_tables

__all__ = ["value_projection", "shared_projection", "make_kernel", "make_shared_kernel", "MAX_HEAD_DIM",
           "ptx_signatures"]

MAX_HEAD_DIM = 128
THREADS_PER_BLOCK = 128
#: The per-draw float32 kernels accumulate in float64 by design (as the CPU kernel and
#: mca.cu), which exempts them from the "no float64 arithmetic in float32 kernels" test;
#: the shared-draw kernel computes in the input precision and is checked.
FLOAT64_ACCUMULATION = ("mca_projection_weight_float32", "mca_projection_optimal_float32")


@functools.cache
def make_kernel(optimal):
    """The kernel for weight (``optimal=False``) or per-token optimal sampling."""
    from numba import float64

    _, _, _, sample_bits = mrandom.cuda_device_functions()
    maxd = MAX_HEAD_DIM
    shift11 = np.uint64(11)
    two_m53 = 2.0**-53

    @cuda.jit
    def mca_projection(x, wh, bias, has_bias, budgets, threshold, alias, shift, p_weight,
                       row_norms, k0, k1, out, cdf, task0, chunk):
        slot = cuda.grid(1)
        task = task0 + slot
        n_batch, n, d_in = x.shape
        heads = budgets.shape[1]
        dh = out.shape[3]
        if slot >= chunk or task >= n_batch * heads * n:
            return
        b = task // (heads * n)
        h = (task // n) % heads
        j = task % n
        r = budgets[b, h, j]
        acc = cuda.local.array(maxd, float64)
        for c in range(dh):
            acc[c] = 0.0
        zero_row = True
        for k in range(d_in):
            if x[b, j, k] != 0:
                zero_row = False
        if r >= d_in or (r > 0 and zero_row):  # exact (a zero row gives the bias only)
            for k in range(d_in):
                xv = float64(x[b, j, k])
                for c in range(dh):
                    acc[c] += xv * wh[h, k, c]
        elif r > 0:
            stream = np.uint64(task)
            total = 0.0
            if optimal:
                for k in range(d_in):
                    total += abs(float64(x[b, j, k])) * row_norms[h, k]
                running = 0.0
                for k in range(d_in):
                    running += abs(float64(x[b, j, k])) * row_norms[h, k] / total
                    cdf[k, slot] = running
                cdf[d_in - 1, slot] = 1.0
            for t in range(r):
                bits = sample_bits(k0, k1, stream, np.uint64(t))
                if optimal:
                    u = float64(bits >> shift11) * two_m53
                    lo = 0
                    hi = d_in - 1
                    while lo < hi:
                        mid = (lo + hi) >> 1
                        if u < cdf[mid, slot]:
                            hi = mid
                        else:
                            lo = mid + 1
                    k = lo
                    p = abs(float64(x[b, j, k])) * row_norms[h, k] / total
                else:
                    low = np.uint64(64 - shift)
                    scaled = (bits >> np.uint64(shift)) * np.uint64(d_in)
                    k = np.int64(scaled >> low)
                    if (scaled & ((np.uint64(1) << low) - np.uint64(1))) >= threshold[h, k]:
                        k = alias[h, k]
                    p = p_weight[h, k]
                coef = float64(x[b, j, k]) / p
                for c in range(dh):
                    acc[c] += coef * wh[h, k, c]
            for c in range(dh):
                acc[c] /= r
        for c in range(dh):
            value = acc[c]
            if has_bias:
                value += bias[h * dh + c]
            out[b, h, j, c] = value

    return mca_projection


@functools.cache
def make_shared_kernel(dtype_name):
    """The shared-draw kernel for ``"float32"`` or ``"float64"`` inputs.

    One thread per output element ``(b, h, j, c)`` (a grid-stride loop), consecutive
    threads = consecutive ``c`` (coalesced rows of ``W_h``). Token ``j`` of ``bh = b * H +
    h`` with ``g = group_of[bh * N + j]``: ``-2`` gives the bias, ``-1`` ``x[b, j] @ W_h +
    bias``, else group ``G = group_ptr[bh] + g`` gives ``bias + sum_m (x[b, j, R[m]] w[m])
    W_h[R[m], c]`` over its ``width[G]`` rows ``R = rows[row_base[bh]:]`` and weights ``w =
    weights[weight_ptr[G]:]``. Arguments: ``x [B, N, d_in]``, ``wh [H, d_in, dh]``, ``bias
    [H * dh]`` (zeros without one), the plan's int64 arrays (``group_of`` flattened),
    ``weights``, ``out [B, H, N, dh]``; all floats in the input dtype.
    """
    from numba import float32, float64

    nb_type = float32 if dtype_name == "float32" else float64
    zero = nb_type(0.0)  # typed: a bare 0.0 would make the float32 kernel accumulate in float64

    @cuda.jit
    def mca_shared_apply(x, wh, bias, group_of, group_ptr, row_base, rows, width, weight_ptr,
                         weights, out):
        n_batch, n, d_in = x.shape
        heads = wh.shape[0]
        dh = out.shape[3]
        total = n_batch * heads * n * dh
        for e in range(cuda.grid(1), total, cuda.gridsize(1)):
            token = e // dh  # (b * H + h) * N + j
            c = e - token * dh
            bh = token // n
            j = token - bh * n
            b = bh // heads
            h = bh - b * heads
            g = group_of[token]
            acc = zero
            if g == -1:  # exact
                for k in range(d_in):
                    acc += x[b, j, k] * wh[h, k, c]
            elif g >= 0:  # sampled: the group's merged rows
                group = group_ptr[bh] + g
                base = row_base[bh]
                w0 = weight_ptr[group]
                for m in range(width[group]):
                    k = rows[base + m]
                    acc += (x[b, j, k] * weights[w0 + m]) * wh[h, k, c]
            out[b, h, j, c] = acc + bias[h * dh + c]

    return mca_shared_apply


def ptx_signatures():
    """``(name, python function, argument types)`` of the kernels, for compile_ptx tests."""
    from numba import float32, float64, int64, types, uint64

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        args = (nb[:, :, ::1], nb[:, :, ::1], nb[::1], int64[::1], int64[::1], int64[::1], int64[::1],
                int64[::1], int64[::1], nb[::1], nb[:, :, :, ::1])
        sigs.append((f"mca_shared_apply_{name}", make_shared_kernel(name).py_func, args))
    for optimal in (False, True):
        for name, nb in (("float32", float32), ("float64", float64)):
            args = (nb[:, :, ::1], float64[:, :, ::1], float64[::1], types.boolean,
                    int64[:, :, ::1], uint64[:, ::1], int64[:, ::1], int64, float64[:, ::1],
                    float64[:, ::1], uint64, uint64, nb[:, :, :, ::1], float64[:, ::1], int64, int64)
            label = "optimal" if optimal else "weight"
            sigs.append((f"mca_projection_{label}_{name}", make_kernel(optimal).py_func, args))
    return sigs


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", shared_draws=False,
                     tables=None):
    """numba.cuda version of :func:`mcattn.mca.naive.value_projection` (same draws).

    Takes CuPy arrays, or NumPy arrays under the simulator; returns the same kind.
    ``shared_draws=True`` (weight sampling) goes to :func:`shared_projection`.
    """
    if shared_draws:
        if sampling != "weight":
            raise ValueError("shared_draws=True needs sampling='weight'")
        return shared_projection(x, w, bias, num_heads, budgets, seed, tables)
    on_device = is_cupy(x)
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    k0, k1 = mrandom.seed_to_key(seed)
    stream = numba_stream()
    total = batch * num_heads * n
    optimal = sampling == "optimal"
    chunk, starts = scratch_plan(total, d_in, optimal)
    if on_device:  # everything on the device, on CuPy's stream; tables cached per weight
        import cupy

        t, dev = device_tables(w, num_heads, tables)
        out = cupy.empty((batch, num_heads, n, dh), dtype=x.dtype)
        bias64 = cupy.zeros(1) if bias is None else cupy.ascontiguousarray(bias, dtype=np.float64)
        arrays = (cupy.ascontiguousarray(x), dev["wh"], bias64,
                  cupy.ascontiguousarray(budgets, dtype=np.int64), dev["threshold"], dev["alias"],
                  dev["p_weight"], dev["row_norms"], out,
                  cupy.empty((d_in, chunk) if optimal else (1, 1), np.float64))
        d = [cuda.as_cuda_array(a) for a in arrays]
    else:  # the simulator: host arrays
        t = weight_tables(np.asarray(w), num_heads) if tables is None else tables
        out = np.empty((batch, num_heads, n, dh), dtype=x.dtype)
        bias64 = np.zeros(1) if bias is None else np.asarray(bias, dtype=np.float64)
        arrays = (np.ascontiguousarray(x), t.wh, bias64, np.ascontiguousarray(budgets, dtype=np.int64),
                  t.threshold, t.alias, t.p_weight, t.row_norms, out,
                  np.empty((d_in, chunk) if optimal else (1, 1)))
        d = [cuda.to_device(a) for a in arrays]
    if total:
        kernel = make_kernel(optimal)
        threads = block_threads(kernel, THREADS_PER_BLOCK)
        args = (d[0], d[1], d[2], bias is not None, d[3], d[4], d[5], np.int64(t.shift), d[6], d[7],
                k0, k1, d[8], d[9])
        for task0 in starts:
            count = min(chunk, total - task0)
            kernel[(count + threads - 1) // threads, threads, stream](*args, np.int64(task0),
                                                                      np.int64(chunk))
    if not on_device:
        out[...] = d[8].copy_to_host()
    return out


def shared_projection(x, w, bias, num_heads, budgets, seed, tables=None):
    """Shared-draw value projection: the host plan applied by one numba.cuda launch.

    The same estimate as :func:`mcattn.mca.shared_cpu.value_projection` (same draws, same
    groups; accumulated in the input precision). The budgets are brought to the host, the
    plan is built there by the compiled planner and uploaded (two transfers), then one
    launch of :func:`make_shared_kernel`.

    Parameters
    ----------
    x : cupy.ndarray (or numpy.ndarray under the simulator), shape ``[B, N, d_in]``
    w : array, shape ``[d_in, H * dh]``
    bias : array, shape ``[H * dh]``, or None
    num_heads : int
    budgets : array of int, shape ``[B, H, N]``
        Used as given (rounded or not).
    seed : int
    tables : WeightTables, optional

    Returns
    -------
    array of the kind of ``x``, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    on_device = is_cupy(x)
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    if on_device:  # everything on the device, on CuPy's stream; tables cached per weight
        import cupy

        out = cupy.empty((batch, num_heads, n, dh), dtype=x.dtype)
        if out.size == 0:
            return out
        d = [cuda.as_cuda_array(a) for a in
             shared_device_args(x, w, bias, num_heads, budgets, seed, tables) + (out,)]
    else:  # the simulator: host arrays
        out = np.empty((batch, num_heads, n, dh), dtype=x.dtype)
        if out.size == 0:
            return out
        t = weight_tables(np.asarray(w), num_heads) if tables is None else tables
        ints, weights, bounds = shared_plan(np.asarray(budgets), seed, t, x.dtype)
        bias_row = (np.zeros(num_heads * dh, x.dtype) if bias is None
                    else np.ascontiguousarray(bias, dtype=x.dtype))
        d = [cuda.to_device(a) for a in (np.ascontiguousarray(x), t.wh_as(x.dtype), bias_row)]
        d += split_shared_plan(cuda.to_device(ints), bounds)
        d += [cuda.to_device(weights), cuda.to_device(out)]
    kernel = make_shared_kernel(np.dtype(x.dtype).name)
    threads = block_threads(kernel, THREADS_PER_BLOCK)
    kernel[shared_grid(out.size, threads), threads, numba_stream()](*d)
    if not on_device:
        out[...] = d[-1].copy_to_host()
    return out

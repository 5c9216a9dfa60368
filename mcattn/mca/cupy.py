"""Monte-Carlo value projection on CUDA GPUs through CuPy RawKernels.

Independent draws: ``kernels/mca.cu`` (one thread per token draws its samples). Shared
draws: ``kernels/mca_shared.cu`` applies the plan of the compiled host planner
(:func:`mcattn.mca.shared_cpu.make_plan`) in one launch.
"""

import numpy as np

from .. import random as mrandom
from .._cupy import block_threads, raw_module
from ._gpu import device_tables, scratch_plan, shared_device_args, shared_grid

__all__ = ["value_projection"]

_SOURCE = "mca/kernels/mca.cu"
_SHARED_SOURCE = "mca/kernels/mca_shared.cu"
THREADS_PER_BLOCK = 128


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", shared_draws=False,
                     tables=None):
    """CuPy version of :func:`mcattn.mca.naive.value_projection` (same draws).

    Parameters and result as there, with CuPy arrays; ``d_head <= 128`` and ``d_in <=
    4096`` (checked by :func:`mcattn.mca.value_projection`). ``shared_draws=True`` (weight
    sampling) goes to :func:`shared_projection`.
    """
    import cupy

    if shared_draws:
        if sampling != "weight":
            raise ValueError("shared_draws=True needs sampling='weight'")
        return shared_projection(x, w, bias, num_heads, budgets, seed, tables)
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    t, dev = device_tables(w, num_heads, tables)  # no host round trip per call
    bias64 = cupy.zeros(1) if bias is None else cupy.ascontiguousarray(bias, dtype=np.float64)
    k0, k1 = mrandom.seed_to_key(seed)
    out = cupy.empty((batch, num_heads, n, dh), dtype=x.dtype)
    total = batch * num_heads * n
    if total == 0:
        return out
    suffix = "f32" if x.dtype == np.float32 else "f64"
    kernel = raw_module(_SOURCE).get_function(f"mcattn_mca_projection_{sampling}_{suffix}")
    threads = block_threads(kernel, THREADS_PER_BLOCK)
    chunk, starts = scratch_plan(total, d_in, sampling == "optimal")
    cdf = cupy.empty((d_in, chunk) if sampling == "optimal" else (1,), dtype=np.float64)
    args = (cupy.ascontiguousarray(x), dev["wh"], bias64, np.int32(bias is not None),
            cupy.ascontiguousarray(budgets, dtype=np.int64), dev["threshold"], dev["alias"],
            np.int32(t.shift), dev["p_weight"], dev["row_norms"], np.uint32(k0), np.uint32(k1), out,
            np.int32(batch), np.int32(num_heads), np.int32(n), np.int32(d_in), np.int32(dh), cdf)
    for task0 in starts:
        count = min(chunk, total - task0)
        kernel(((count + threads - 1) // threads,), (threads,),
               args + (np.int64(task0), np.int64(chunk)))
    return out


def shared_projection(x, w, bias, num_heads, budgets, seed, tables=None):
    """Shared-draw value projection: the host plan applied by one RawKernel launch.

    The same estimate as :func:`mcattn.mca.shared_cpu.value_projection` (same draws, same
    groups; accumulated in the input precision). The budgets are brought to the host, the
    plan is built there by the compiled planner and uploaded (two transfers); then one
    thread per output element (``kernels/mca_shared.cu``).

    Parameters
    ----------
    x : cupy.ndarray, shape ``[B, N, d_in]``
    w : cupy.ndarray, shape ``[d_in, H * dh]``
    bias : cupy.ndarray, shape ``[H * dh]``, or None
    num_heads : int
    budgets : array of int, shape ``[B, H, N]`` (CuPy or NumPy)
        Used as given (rounded or not).
    seed : int
    tables : WeightTables, optional

    Returns
    -------
    cupy.ndarray, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    import cupy

    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    out = cupy.empty((batch, num_heads, n, dh), dtype=x.dtype)
    if out.size == 0:
        return out
    args = shared_device_args(x, w, bias, num_heads, budgets, seed, tables)
    suffix = "f32" if x.dtype == np.float32 else "f64"
    kernel = raw_module(_SHARED_SOURCE).get_function(f"mcattn_mca_shared_apply_{suffix}")
    threads = block_threads(kernel, THREADS_PER_BLOCK)
    total = out.size
    kernel((shared_grid(total, threads),), (threads,),
           args + (out, np.int64(num_heads), np.int64(n), np.int64(d_in), np.int64(dh), np.int64(total)))
    return out

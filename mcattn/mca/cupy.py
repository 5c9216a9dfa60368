"""Monte-Carlo value projection on CUDA GPUs through a CuPy RawKernel (``kernels/mca.cu``)."""

import numpy as np

from .. import random as mrandom
from .._cupy import block_threads, raw_module
from ._gpu import device_tables, scratch_plan

__all__ = ["value_projection"]

_SOURCE = "mca/kernels/mca.cu"
THREADS_PER_BLOCK = 128


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", shared_draws=False,
                     tables=None):
    """CuPy version of :func:`mcattn.mca.naive.value_projection` (same draws).

    Parameters and result as there, with CuPy arrays; ``d_head <= 128``; independent
    draws only.
    """
    import cupy

    if shared_draws:  # reduced GEMMs on cuBLAS (mcattn.mca.shared)
        from .shared import value_projection as shared_projection

        return shared_projection(x, w, bias, num_heads, budgets, seed, sampling, True, tables)
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

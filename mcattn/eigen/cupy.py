"""Eigen reconstruction attention on CUDA GPUs through a CuPy RawKernel (``kernels/eigen.cu``)."""

import numpy as np

from .. import config
from .._cupy import raw_module
from ._gpu import plan_arrays

__all__ = ["forward"]

_SOURCE = "eigen/kernels/eigen.cu"
_MAX_GRID_Y = 65535


def forward(inp, plan):
    """Eigen reconstruction attention of canonical CuPy inputs (n <= 256, m <= 64, d, dv <= 64).

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    plan : mcattn.eigen.plan.Plan

    Returns
    -------
    cupy.ndarray, shape ``[BH, Nq, dv]``
    """
    import cupy

    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    out = cupy.zeros((bh, nq, dv), dtype=q.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    cols, weights, base, bias, index, has_bias = plan_arrays(inp, plan, cupy)
    suffix = "f32" if q.dtype == np.float32 else "f64"
    kernel = raw_module(_SOURCE).get_function(f"mcattn_eigen_forward_{suffix}")
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    for b0 in range(0, bh, _MAX_GRID_Y):
        b1 = min(bh, b0 + _MAX_GRID_Y)
        # The kernel takes heads from the batch row index: shift it for later chunks.
        shift = b0 % plan.num_heads
        c, w, bs = cols, weights, base
        if shift:
            c, w, bs = (cupy.roll(a, -shift, axis=0) for a in (cols, weights, base))
        kernel(
            ((nq + threads - 1) // threads, b1 - b0), (threads,),
            (q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], c, w, bs, bias, index[b0:b1], np.int32(nq),
             np.int32(nk), np.int32(d), np.int32(dv), np.int32(plan.num_heads), np.int32(plan.num_fixed),
             np.int32(base.shape[1]), np.int32(plan.per_query), q.dtype.type(inp.scale),
             np.int32(has_bias), np.int32(bias.shape[1]), np.int32(inp.mask.is_causal)),
        )
    return out

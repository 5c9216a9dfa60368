"""Exact attention on CUDA GPUs through a CuPy RawKernel (``kernels/exact.cu``)."""

import numpy as np

from .._cupy import block_threads, raw_module

__all__ = ["forward"]

_SOURCE = "exact/kernels/exact.cu"
_MAX_GRID_Y = 65535


def forward(inp):
    """Exact attention of canonical CuPy inputs.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``, d, dv <= 128.

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
    suffix = "f32" if q.dtype == np.float32 else "f64"
    kernel = raw_module(_SOURCE).get_function(f"mcattn_exact_forward_{suffix}")
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else cupy.zeros((1, 1, 1), q.dtype)
    mask_index = cupy.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    threads = block_threads(kernel)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        kernel(
            ((nq + threads - 1) // threads, b1 - b0),
            (threads,),
            (q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], bias, mask_index[b0:b1], np.int32(nq),
             np.int32(nk), np.int32(d), np.int32(dv), q.dtype.type(inp.scale), np.int32(has_bias),
             np.int32(bias.shape[1]), np.int32(inp.mask.is_causal)),
        )
    return out

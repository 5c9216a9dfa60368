"""E-Att attention on CUDA GPUs through a CuPy RawKernel (``kernels/eatt.cu``)."""

import numpy as np

from .. import config
from .._cupy import raw_module
from ._gpu import kernel_arrays

__all__ = ["forward"]

_SOURCE = "eatt/kernels/eatt.cu"
_MAX_GRID_Y = 65535


def forward(inp, alignment="l1", codes=None):
    """E-Att attention of canonical CuPy inputs.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``, d, dv <= 128.
    alignment : {"l1", "hamming"}
    codes : (qb, kb), for ``"hamming"``
        Packed sign codes ``[BH, Nq, W]``, ``[BH, Nk, W]`` (CuPy uint64).

    Returns
    -------
    cupy.ndarray, shape ``[BH, Nq, dv]``
    """
    import cupy

    bh, nq, d = inp.q.shape
    nk, dv = inp.nk, inp.value_dim
    out = cupy.zeros((bh, nq, dv), dtype=inp.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    q, k, qc, kc, table = kernel_arrays(inp, alignment, codes, cupy)
    words = (d + 63) // 64
    suffix = "f32" if inp.dtype == np.float32 else "f64"
    kernel = raw_module(_SOURCE).get_function(f"mcattn_eatt_forward_{suffix}")
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else cupy.zeros((1, 1, 1), inp.dtype)
    mask_index = cupy.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    hamming = alignment == "hamming"
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        rows = slice(b0, b1)
        kernel(
            ((nq + threads - 1) // threads, b1 - b0),
            (threads,),
            (q if hamming else q[rows], k if hamming else k[rows],
             qc[rows] if hamming else qc, kc[rows] if hamming else kc, table, inp.v[rows],
             out[rows], bias, mask_index[rows], np.int32(nq), np.int32(nk), np.int32(d),
             np.int32(words), np.int32(dv), np.int32(has_bias), np.int32(bias.shape[1]),
             np.int32(inp.mask.is_causal), np.int32(hamming)),
        )
    return out

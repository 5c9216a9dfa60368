"""E-Att attention on CUDA GPUs through CuPy RawKernels (``kernels/eatt.cu``, ``kernels/eatt_mma.cu``).

With ``config.EATT_TENSOR_CORES`` set (``"float16"`` or ``"bfloat16"``), float32 calls run
on ``eatt_mma.cu`` (:func:`tensor_cores`): the Hamming alignment with a value dim of 32, 64
or 128 (XOR + popcount scores per 64 x 64 tile), the L1 alignment with the (head dim, value
dim) pairs of :data:`MMA_L1_SIZES` (scores on CUDA cores from shared-memory tiles); ``P V``
on 16-bit mma for both.
"""

import numpy as np

from .. import config
from .._cupy import raw_module
from ..errors import ConfigError
from ._gpu import MAX_WORDS, kernel_arrays

__all__ = ["forward", "tensor_cores", "MMA_VALUE_DIMS", "MMA_L1_SIZES"]

_SOURCE = "eatt/kernels/eatt.cu"
_MMA_SOURCE = "eatt/kernels/eatt_mma.cu"
_MAX_GRID_Y = 65535
#: Value dims of the tensor-core kernel; its blocks: 128 threads, 64 query rows.
MMA_VALUE_DIMS = (32, 64, 128)
#: L1 kernels: (head dim bucket D, value dim); a call with head dim <= D takes the smallest
#: D (its query rows and key tile in float32 fit 48 KiB of shared memory beside V^T).
MMA_L1_SIZES = ((32, 32), (32, 64), (32, 128), (64, 32), (64, 64))
_MMA_ROWS, _MMA_THREADS = 64, 128
_MMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}


def tensor_cores(inp, alignment):
    """The 16-bit type ``eatt_mma.cu`` runs these inputs in, or None (``eatt.cu`` then)."""
    precision = config.EATT_TENSOR_CORES
    if precision is None:
        return None
    if precision not in _MMA_TYPES:
        raise ConfigError(f"EATT_TENSOR_CORES must be None, 'float16' or 'bfloat16'; got {precision!r}")
    if inp.q.dtype != np.float32:
        return None
    if alignment == "hamming":
        fits = inp.value_dim in MMA_VALUE_DIMS and (inp.head_dim + 63) // 64 <= MAX_WORDS
    else:
        fits = _l1_bucket(inp) is not None
    return precision if fits else None


def _l1_bucket(inp):
    """The L1 kernel's head-dim bucket for these inputs, or None."""
    for bucket, dv in MMA_L1_SIZES:
        if inp.head_dim <= bucket and inp.value_dim == dv:
            return bucket
    return None


def _forward_mma(inp, alignment, codes, precision):
    import cupy

    bh, nq, d = inp.q.shape
    nk, dv = inp.nk, inp.value_dim
    out = cupy.zeros((bh, nq, dv), dtype=inp.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    q, k, qc, kc, table = kernel_arrays(inp, alignment, codes, cupy)
    tag = _MMA_TYPES[precision]
    module = raw_module(_MMA_SOURCE)
    if alignment == "hamming":
        kernel = module.get_function(f"mcattn_eatt_mma_hamming_{tag}_dv{dv}")
    else:
        kernel = module.get_function(f"mcattn_eatt_mma_l1_{tag}_d{_l1_bucket(inp)}_dv{dv}")
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else cupy.zeros((1, 1, 1), inp.dtype)
    mask_index = cupy.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    v = cupy.ascontiguousarray(inp.v)
    masks = (np.int32(has_bias), np.int32(bias.shape[1]), np.int32(inp.mask.is_causal))
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        if alignment == "hamming":
            args = (qc[b0:b1], kc[b0:b1], table, v[b0:b1], out[b0:b1], bias, mask_index[b0:b1],
                    np.int32(nq), np.int32(nk), np.int32(d), np.int32((d + 63) // 64)) + masks
        else:
            args = (q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], bias, mask_index[b0:b1],
                    np.int32(nq), np.int32(nk), np.int32(d)) + masks
        kernel(((nq + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,), args)
    return out


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

    precision = tensor_cores(inp, alignment)
    if precision is not None:
        return _forward_mma(inp, alignment, codes, precision)
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

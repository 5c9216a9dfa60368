"""Exact attention on CUDA GPUs through CuPy RawKernels (``kernels/exact.cu``).

The forward (optionally with the rows' log-sum-exp, for training) and the two backward
kernels (dq, then dk/dv) take head dims up to :data:`MAX_HEAD_DIM`. With
``config.EXACT_TENSOR_CORES`` set (``"float16"``, ``"bfloat16"`` or ``"tf32"``) the float32
forward of head dim 32, 64 or 128 runs on tensor cores instead (``kernels/exact_mma.cu``, the
FlashAttention-2 recipe: 64 query rows a block, mma.sync m16n8k16, float32 accumulation),
and for head dims 32 and 64 the float16 / bfloat16 training pair too (``forward_lse``
there, and ``backward`` through ``kernels/exact_mma_backward.cu``; tf32 has no backward). The training entry
points :func:`forward_lse` and :func:`backward` fall back to the CuPy array reference
(:mod:`mcattn.exact.naive`) for wider heads, so training on a GPU is never refused for
the head width alone.
"""

import numpy as np

from .. import config
from .._cupy import block_threads, raw_module
from ..errors import ConfigError

__all__ = ["forward", "forward_lse", "backward", "MAX_HEAD_DIM", "MMA_HEAD_DIMS",
           "MMA_TRAINING_HEAD_DIMS"]

_SOURCE = "exact/kernels/exact.cu"
_MMA_SOURCE = "exact/kernels/exact_mma.cu"
_MMA_BACKWARD_SOURCE = "exact/kernels/exact_mma_backward.cu"
_MAX_GRID_Y = 65535
MAX_HEAD_DIM = 128
#: Head dims (d = dv) of the tensor-core forward; its blocks: 128 threads, 64 query rows.
MMA_HEAD_DIMS = (32, 64, 128)
#: Head dims of the tensor-core training pair (forward with lse, then its backward).
MMA_TRAINING_HEAD_DIMS = (32, 64)
_MMA_ROWS, _MMA_THREADS = 64, 128
_MMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}


def _suffix(dtype):
    return "f32" if dtype == np.float32 else "f64"


def _mask_arrays(inp):
    import cupy

    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else cupy.zeros((1, 1, 1), inp.q.dtype)
    mask_index = cupy.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    return has_bias, bias, mask_index


def _fits(inp):
    return max(inp.q.shape[2], inp.value_dim) <= MAX_HEAD_DIM


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
    precision = _tensor_cores(inp)
    if precision is not None:
        return _forward_mma(inp, precision, want_lse=False)[0]
    return _forward(inp, want_lse=False)[0]


def _tensor_cores(inp, dims=MMA_HEAD_DIMS):
    """The 16-bit type of the tensor-core kernels for these inputs (head dims ``dims``), or None."""
    precision = config.EXACT_TENSOR_CORES
    if precision is None:
        return None
    if precision not in _MMA_TYPES and precision != "tf32":
        raise ConfigError("EXACT_TENSOR_CORES must be None, 'float16', 'bfloat16' or 'tf32'; "
                          f"got {precision!r}")
    d = inp.q.shape[2]
    if inp.q.dtype != np.float32 or d != inp.value_dim or d not in dims:
        return None
    if precision == "tf32" and dims is MMA_TRAINING_HEAD_DIMS:
        return None  # no tf32 backward: the training pair stays on the float32 kernels
    return precision


def _forward_mma(inp, precision, want_lse):
    """The tensor-core forward (``kernels/exact_mma.cu``); arguments as :func:`forward_lse`."""
    import cupy

    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk = inp.nk
    out = cupy.zeros((bh, nq, d), dtype=q.dtype)
    lse = cupy.full((bh, nq) if want_lse else (1, 1), -np.inf, dtype=q.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out, lse
    name = (f"mcattn_exact_tf32_forward_d{d}" if precision == "tf32"
            else f"mcattn_exact_mma_forward_{_MMA_TYPES[precision]}_d{d}")
    kernel = raw_module(_MMA_SOURCE).get_function(name)
    has_bias, bias, mask_index = _mask_arrays(inp)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        kernel(((nq + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,),
               (q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], lse[b0:b1] if want_lse else lse, bias,
                mask_index[b0:b1], np.int32(nq), np.int32(nk), np.float32(inp.scale),
                np.int32(has_bias), np.int32(bias.shape[1]), np.int32(inp.mask.is_causal),
                np.int32(want_lse)))
    return out, lse


def forward_lse(inp):
    """Exact attention of canonical CuPy inputs, and the rows' log-sum-exp (for training).

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``.

    Returns
    -------
    out : cupy.ndarray, shape ``[BH, Nq, dv]``
    lse : cupy.ndarray, shape ``[BH, Nq]``
        ``log sum_j exp(scale q_i k_j + bias_ij)`` over visible keys; -inf for a row with none.
    """
    if not _fits(inp):
        from . import naive

        return naive.forward_lse(inp)
    precision = _tensor_cores(inp, MMA_TRAINING_HEAD_DIMS)
    if precision is not None:
        return _forward_mma(inp, precision, want_lse=True)
    return _forward(inp, want_lse=True)


def _forward(inp, want_lse):
    import cupy

    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    out = cupy.zeros((bh, nq, dv), dtype=q.dtype)
    lse = cupy.full((bh, nq) if want_lse else (1, 1), -np.inf, dtype=q.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out, lse
    kernel = raw_module(_SOURCE).get_function(f"mcattn_exact_forward_{_suffix(q.dtype)}")
    has_bias, bias, mask_index = _mask_arrays(inp)
    threads = block_threads(kernel)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        kernel(
            ((nq + threads - 1) // threads, b1 - b0),
            (threads,),
            (q[b0:b1], k[b0:b1], v[b0:b1], out[b0:b1], lse[b0:b1] if want_lse else lse, bias,
             mask_index[b0:b1], np.int32(nq), np.int32(nk), np.int32(d), np.int32(dv),
             q.dtype.type(inp.scale), np.int32(has_bias), np.int32(bias.shape[1]),
             np.int32(inp.mask.is_causal), np.int32(want_lse)),
        )
    return out, lse


def backward(inp, out, lse, dout):
    """Gradients of exact attention with the CuPy RawKernels.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        The forward's canonical CuPy inputs.
    out : cupy.ndarray, shape ``[BH, Nq, dv]``
    lse : cupy.ndarray, shape ``[BH, Nq]``
        From :func:`forward_lse`.
    dout : cupy.ndarray, shape ``[BH, Nq, dv]``
        Gradient of the loss with respect to ``out``.

    Returns
    -------
    dq, dk, dv : cupy.ndarray
        ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]``. Besides them the kernels use
        ``O(BH Nq)`` memory (``delta``); probabilities are recomputed, never stored.
    """
    import cupy

    if not _fits(inp):
        from . import naive

        return naive.backward(inp, out, lse, dout)
    precision = _tensor_cores(inp, MMA_TRAINING_HEAD_DIMS)
    if precision is not None:
        return _backward_mma(inp, out, lse, dout, precision)
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dvw = inp.nk, inp.value_dim
    dq, dk, dv = cupy.zeros_like(q), cupy.zeros_like(k), cupy.zeros_like(v)
    if bh == 0 or nq == 0 or nk == 0:
        return dq, dk, dv
    out, lse, dout = (cupy.ascontiguousarray(a, dtype=q.dtype) for a in (out, lse, dout))
    delta = cupy.zeros((bh, nq), dtype=q.dtype)
    module = raw_module(_SOURCE)
    suffix = _suffix(q.dtype)
    dq_kernel = module.get_function(f"mcattn_exact_backward_dq_{suffix}")
    dkdv_kernel = module.get_function(f"mcattn_exact_backward_dkdv_{suffix}")
    has_bias, bias, mask_index = _mask_arrays(inp)
    threads_q, threads_k = block_threads(dq_kernel), block_threads(dkdv_kernel)
    tail = (np.int32(nq), np.int32(nk), np.int32(d), np.int32(dvw), q.dtype.type(inp.scale),
            np.int32(has_bias), np.int32(bias.shape[1]), np.int32(inp.mask.is_causal))
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        rows = slice(b0, b1)
        # Same stream, in this order: the dk/dv kernel reads the delta the dq kernel wrote.
        dq_kernel(((nq + threads_q - 1) // threads_q, b1 - b0), (threads_q,),
                  (q[rows], k[rows], v[rows], out[rows], dout[rows], lse[rows], dq[rows],
                   delta[rows], bias, mask_index[rows]) + tail)
        dkdv_kernel(((nk + threads_k - 1) // threads_k, b1 - b0), (threads_k,),
                    (q[rows], k[rows], v[rows], dout[rows], lse[rows], delta[rows], dk[rows],
                     dv[rows], bias, mask_index[rows]) + tail)
    return dq, dk, dv


def _backward_mma(inp, out, lse, dout, precision):
    """The tensor-core backward (``kernels/exact_mma_backward.cu``); arguments as :func:`backward`."""
    import cupy

    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk = inp.nk
    dq, dk, dv = cupy.zeros_like(q), cupy.zeros_like(k), cupy.zeros_like(v)
    if bh == 0 or nq == 0 or nk == 0:
        return dq, dk, dv
    out, lse, dout = (cupy.ascontiguousarray(a, dtype=q.dtype) for a in (out, lse, dout))
    delta = cupy.zeros((bh, nq), dtype=q.dtype)
    module = raw_module(_MMA_BACKWARD_SOURCE)
    tag = f"{_MMA_TYPES[precision]}_d{d}"
    dq_kernel = module.get_function(f"mcattn_exact_mma_backward_dq_{tag}")
    dkdv_kernel = module.get_function(f"mcattn_exact_mma_backward_dkdv_{tag}")
    has_bias, bias, mask_index = _mask_arrays(inp)
    tail = (np.int32(nq), np.int32(nk), np.float32(inp.scale), np.int32(has_bias),
            np.int32(bias.shape[1]), np.int32(inp.mask.is_causal))
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        rows = slice(b0, b1)
        # Same stream, in this order: the dk/dv kernel reads the delta the dq kernel wrote.
        dq_kernel(((nq + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,),
                  (q[rows], k[rows], v[rows], out[rows], dout[rows], lse[rows], dq[rows],
                   delta[rows], bias, mask_index[rows]) + tail)
        dkdv_kernel(((nk + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,),
                    (q[rows], k[rows], v[rows], dout[rows], lse[rows], delta[rows], dk[rows],
                     dv[rows], bias, mask_index[rows]) + tail)
    return dq, dk, dv

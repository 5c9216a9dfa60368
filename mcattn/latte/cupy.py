"""LATTE on CUDA GPUs through CuPy RawKernels (``kernels/latte.cu``, ``kernels/latte_mma.cu``).

The algorithm is that of :mod:`mcattn.latte.cuda`. With ``config.LATTE_TENSOR_CORES`` set
(``"float16"`` or ``"bfloat16"``) the calls the tile kernel covers (:func:`tensor_cores`)
run on ``latte_mma.cu`` instead: the estimate on int8 mma, tiles of 64 queries x 64 keys
with no kept key skipped, ``P V`` on 16-bit mma. The kept sets are the same either way.
The hard-mask backward of the calls :func:`backward_tensor_cores` covers runs on
``latte_mma_backward.cu`` (:func:`backward`): FlashAttention-2's dq and dk/dv passes with
the kept sets recomputed per tile; the rest stays on the array code
(:func:`mcattn.latte.naive.backward`).
"""

import numpy as np

from .. import config
from .._cupy import raw_module
from ..errors import ConfigError
from .naive import MODES

__all__ = ["forward", "kept_mask", "kernel_arguments", "tensor_cores", "MMA_HEAD_DIMS",
           "last_tile_counts", "backward", "backward_tensor_cores", "MMA_TRAINING_HEAD_DIMS",
           "last_backward_tile_counts"]

_SOURCE = "latte/kernels/latte.cu"
_MMA_SOURCE = "latte/kernels/latte_mma.cu"
_MMA_BACKWARD_SOURCE = "latte/kernels/latte_mma_backward.cu"
_MAX_GRID_Y = 65535
#: Head dims (d = dv) of the tensor-core kernel; its blocks: 128 threads, 64 query rows.
MMA_HEAD_DIMS = (32, 64, 128)
#: Head dims (d = dv) of the tensor-core backward (as exact's training pair).
MMA_TRAINING_HEAD_DIMS = (32, 64)
_MMA_ROWS, _MMA_THREADS = 64, 128
_MMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}
_MMA_MODES = ("relative", "absolute")
_tiles = {}
_backward_tiles = {}


def tensor_cores(lat, *, do_output=True):
    """The 16-bit type ``latte_mma.cu`` runs ``lat`` in, or None (``latte.cu`` then).

    Needs ``config.LATTE_TENSOR_CORES``, float32 inputs, mode relative or absolute, int8
    kept scores, no dropped mass, and head dim 32, 64 or 128 (equal to the value dim when
    the output is computed).
    """
    precision = config.LATTE_TENSOR_CORES
    if precision is None:
        return None
    if precision not in _MMA_TYPES:
        raise ConfigError(f"LATTE_TENSOR_CORES must be None, 'float16' or 'bfloat16'; got {precision!r}")
    inp = lat.inp
    d = inp.q.shape[2]
    if (inp.q.dtype != np.float32 or d not in MMA_HEAD_DIMS or lat.mode not in _MMA_MODES
            or lat.exact_scores != "int8" or lat.want_mass or (do_output and inp.value_dim != d)):
        return None
    return precision


def last_tile_counts():
    """``(estimated, computed)``: the (query block, key tile) pairs of the last tensor-core
    forward on the current device, and those not skipped (a skipped tile loads no V and
    computes no score). Synchronises."""
    import cupy

    counts = _tiles.get(cupy.cuda.runtime.getDevice())
    return None if counts is None else tuple(int(c) for c in counts.get())


def _run_mma(lat, precision, *, do_output, write_mask):
    """The tensor-core kernel (``kernels/latte_mma.cu``); outputs as :func:`_run`."""
    import cupy

    inp = lat.inp
    q = inp.q
    bh, nq, d = q.shape
    nk = inp.nk
    out = cupy.zeros((bh, nq, d), dtype=q.dtype)
    kept = cupy.zeros((bh, nq), dtype=np.int64)
    dropped = cupy.zeros((bh, nq), dtype=np.float64)
    mask_out = cupy.zeros((bh, nq, nk) if write_mask else (1, 1, 1), dtype=np.bool_)
    tiles = cupy.zeros(2, dtype=np.uint64)
    _tiles[cupy.cuda.runtime.getDevice()] = tiles
    if bh == 0 or nq == 0 or nk == 0:
        return out, kept, dropped, mask_out
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else cupy.zeros((1, 1, 1), q.dtype)
    bias = cupy.ascontiguousarray(bias)
    mask_index = cupy.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    v = inp.v if do_output else cupy.zeros((1, 1, 1), q.dtype)
    sk256 = 256.0 * lat.s_k.astype(np.float64)
    theta = cupy.asarray(lat.theta)
    kernel = raw_module(_MMA_SOURCE).get_function(f"mcattn_latte_mma_forward_{_MMA_TYPES[precision]}_d{d}")
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        kernel(((nq + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,),
               (lat.q8[b0:b1], lat.k8[b0:b1], v[b0:b1] if do_output else v, lat.s_q[b0:b1],
                lat.s_k[b0:b1], sk256[b0:b1], theta[b0:b1], bias, mask_index[b0:b1], out[b0:b1],
                kept[b0:b1], mask_out[b0:b1] if write_mask else mask_out, tiles, np.int32(nq),
                np.int32(nk), np.float64(inp.scale), np.int32(MODES[lat.mode]), np.int32(has_bias),
                np.int32(bias.shape[1]), np.int32(inp.mask.is_causal), np.int32(write_mask),
                np.int32(do_output)))
    return out, kept, dropped, mask_out


def kernel_arguments(lat, xp, *, do_output, write_mask):
    """Outputs and the argument tuple of ``mcattn_latte_forward_*`` (arrays of ``xp``)."""
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    out = xp.zeros((bh, nq, dv), dtype=q.dtype)
    kept = xp.zeros((bh, nq), dtype=np.int64)
    dropped = xp.zeros((bh, nq), dtype=np.float64)
    mask_out = xp.zeros((bh, nq, nk) if write_mask else (1, 1, 1), dtype=np.bool_)
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else xp.zeros((1, 1, 1), q.dtype)
    mask_index = xp.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    sk256 = 256.0 * lat.s_k.astype(np.float64)
    args = [lat.q8, lat.k8, q, k, v, lat.s_q, lat.s_k, sk256, xp.asarray(lat.theta),
            xp.ascontiguousarray(bias), mask_index, out, kept, dropped, mask_out, np.int32(nq),
            np.int32(nk), np.int32(d), np.int32(dv), np.float64(inp.scale), np.int32(MODES[lat.mode]),
            np.int32(lat.exact_scores == "int8"), np.int32(has_bias), np.int32(bias.shape[1]),
            np.int32(inp.mask.is_causal), np.int32(lat.want_mass), np.int32(write_mask),
            np.int32(do_output)]
    return (out, kept, dropped, mask_out), args


def _run(lat, *, do_output, write_mask):
    import cupy

    precision = tensor_cores(lat, do_output=do_output)
    if precision is not None:
        return _run_mma(lat, precision, do_output=do_output, write_mask=write_mask)

    (out, kept, dropped, mask_out), args = kernel_arguments(lat, cupy, do_output=do_output,
                                                             write_mask=write_mask)
    bh, nq = lat.inp.q.shape[:2]
    if bh == 0 or nq == 0 or lat.inp.nk == 0:
        return out, kept, dropped, mask_out
    suffix = "f32" if lat.inp.dtype == np.float32 else "f64"
    kernel = raw_module(_SOURCE).get_function(f"mcattn_latte_forward_{suffix}")
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    per_row = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)  # arguments with a leading [BH] axis
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        call = list(args)
        for p in per_row:
            call[p] = args[p][b0:b1]
        if write_mask:
            call[14] = args[14][b0:b1]
        kernel(((nq + threads - 1) // threads, b1 - b0), (threads,), tuple(call))
    return out, kept, dropped, mask_out


def forward(lat):
    """LATTE attention of canonical CuPy inputs; as :func:`mcattn.latte.cpu.forward`."""
    out, kept, dropped, _ = _run(lat, do_output=True, write_mask=False)
    return out, kept, dropped if lat.want_mass else None


def kept_mask(lat):
    """The kept sets, bool ``[BH, Nq, Nk]``."""
    return _run(lat, do_output=False, write_mask=True)[3]


def backward_tensor_cores(lat):
    """The 16-bit type ``latte_mma_backward.cu`` runs the hard-mask backward of ``lat`` in, or None.

    Needs ``config.LATTE_TENSOR_CORES``, float32 inputs, mode relative or absolute and head
    dim = value dim in :data:`MMA_TRAINING_HEAD_DIMS`; int8 or float kept scores.
    """
    precision = config.LATTE_TENSOR_CORES
    if precision is None:
        return None
    if precision not in _MMA_TYPES:
        raise ConfigError(f"LATTE_TENSOR_CORES must be None, 'float16' or 'bfloat16'; got {precision!r}")
    inp = lat.inp
    d = inp.q.shape[2]
    if (inp.q.dtype != np.float32 or d not in MMA_TRAINING_HEAD_DIMS or inp.value_dim != d
            or lat.mode not in _MMA_MODES):
        return None
    return precision


def last_backward_tile_counts():
    """``(dq visited, dq computed, dkdv visited, dkdv computed)``: the (block of 64 rows or
    keys, tile of 32 keys or queries) pairs of the last tensor-core backward on the current
    device, and those with a kept key (the others load no 16-bit operand). Synchronises."""
    import cupy

    counts = _backward_tiles.get(cupy.cuda.runtime.getDevice())
    return None if counts is None else tuple(int(c) for c in counts.get())


def backward(lat, dout):
    """LATTE's hard-mask gradients on tensor cores (``kernels/latte_mma_backward.cu``).

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
        Canonical CuPy inputs that :func:`backward_tensor_cores` accepts.
    dout : cupy.ndarray, shape ``[BH, Nq, d]``
        Gradient of the loss with respect to the output.

    Returns
    -------
    dq, dk, dv : cupy.ndarray of float32
        ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, d]``. The kept sets are recomputed per
        tile (never stored); besides the gradients the kernels use ``O(BH Nq)`` memory (the
        rows' cut, log-sum-exp and delta).
    """
    import cupy

    precision = backward_tensor_cores(lat)
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk = inp.nk
    dq, dk, dv = cupy.zeros_like(q), cupy.zeros_like(k), cupy.zeros_like(v)
    tiles = cupy.zeros(4, dtype=np.uint64)
    _backward_tiles[cupy.cuda.runtime.getDevice()] = tiles
    if bh == 0 or nq == 0 or nk == 0:
        return dq, dk, dv
    dout = cupy.ascontiguousarray(dout, dtype=q.dtype)
    cut = cupy.zeros((bh, nq), dtype=np.float64)
    lse2 = cupy.zeros((bh, nq), dtype=q.dtype)
    delta = cupy.zeros((bh, nq), dtype=q.dtype)
    has_bias = inp.mask.bias is not None
    bias = cupy.ascontiguousarray(inp.mask.bias if has_bias else cupy.zeros((1, 1, 1), q.dtype))
    mask_index = cupy.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    sk256 = 256.0 * lat.s_k.astype(np.float64)
    theta = cupy.asarray(lat.theta)
    module = raw_module(_MMA_BACKWARD_SOURCE)
    tag = f"{_MMA_TYPES[precision]}_d{d}"
    dq_kernel = module.get_function(f"mcattn_latte_mma_backward_dq_{tag}")
    dkdv_kernel = module.get_function(f"mcattn_latte_mma_backward_dkdv_{tag}")
    int8_scores = np.int32(lat.exact_scores == "int8")
    tail = (np.int32(has_bias), np.int32(bias.shape[1]), np.int32(inp.mask.is_causal))
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        r = slice(b0, min(bh, b0 + _MAX_GRID_Y))
        common = (lat.q8[r], lat.k8[r], q[r], k[r], v[r], dout[r], lat.s_q[r], lat.s_k[r], sk256[r])
        # Same stream, in this order: the dk/dv kernel reads the cut, lse and delta of the dq kernel.
        dq_kernel(((nq + _MMA_ROWS - 1) // _MMA_ROWS, r.stop - b0), (_MMA_THREADS,),
                  common + (theta[r], bias, mask_index[r], dq[r], cut[r], lse2[r], delta[r], tiles,
                            np.int32(nq), np.int32(nk), np.float64(inp.scale),
                            np.int32(MODES[lat.mode]), int8_scores) + tail)
        dkdv_kernel(((nk + _MMA_ROWS - 1) // _MMA_ROWS, r.stop - b0), (_MMA_THREADS,),
                    common + (bias, mask_index[r], cut[r], lse2[r], delta[r], dk[r], dv[r], tiles,
                              np.int32(nq), np.int32(nk), np.float64(inp.scale), int8_scores) + tail)
    return dq, dk, dv

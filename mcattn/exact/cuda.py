"""Exact attention on CUDA GPUs with numba.cuda (same algorithm as ``kernels/exact.cu``).

One thread per query row, blocks of ``config.CUDA_THREADS_PER_BLOCK`` rows, key tiles
staged in shared memory, streaming softmax (running max, running sum). Head dims up to
:data:`MAX_HEAD_DIM`. Takes CuPy arrays (zero-copy through ``__cuda_array_interface__``)
or, under the numba.cuda simulator (``NUMBA_ENABLE_CUDASIM=1``), NumPy arrays.
"""

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .._array import is_cupy
from .._cuda_device import softmax_tile
from .._cupy import block_threads, numba_stream

__all__ = ["forward", "make_kernel", "MAX_HEAD_DIM", "ptx_signatures"]

MAX_HEAD_DIM = 128
_TILE = {"float32": 32, "float64": 16}  # keys per tile: 2 tiles of TILE x 128 fit in 32 KB
_MAX_GRID_Y = 65535


@functools.cache
def make_kernel(dtype_name):
    """The numba.cuda kernel for one compute dtype (``"float32"`` or ``"float64"``)."""
    from numba import float32, float64

    nb_type = float32 if dtype_name == "float32" else float64
    tile = _TILE[dtype_name]
    maxd = MAX_HEAD_DIM
    # Typed constants: a bare 0.0 or -math.inf would promote the float32 kernel to float64.
    zero, one, neg_inf = nb_type(0.0), nb_type(1.0), nb_type(-math.inf)

    @cuda.jit
    def exact_forward(q, k, v, out, bias, mask_index, scale, has_bias, is_causal):
        k_tile = cuda.shared.array((tile, maxd), nb_type)
        v_tile = cuda.shared.array((tile, maxd), nb_type)
        q_row = cuda.local.array(maxd, nb_type)
        acc = cuda.local.array(maxd, nb_type)
        scores = cuda.local.array(tile, nb_type)
        bh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * cuda.blockDim.x + tid
        nq = q.shape[1]
        nk = k.shape[1]
        d = q.shape[2]
        dv = v.shape[2]
        active = i < nq
        for c in range(d):
            q_row[c] = q[bh, i, c] * scale if active else zero
        for c in range(dv):
            acc[c] = 0.0
        m = neg_inf
        l = zero
        slot = mask_index[bh] if has_bias else 0
        row = i if bias.shape[1] > 1 else 0
        key_end = nk
        if is_causal:  # keys after the block's last row are invisible to the whole block
            key_end = min(nk, min(nq, (cuda.blockIdx.x + 1) * cuda.blockDim.x))
        for j0 in range(0, key_end, tile):
            width = min(tile, key_end - j0)
            for e in range(tid, width * d, cuda.blockDim.x):
                k_tile[e // d, e % d] = k[bh, j0 + e // d, e % d]
            for e in range(tid, width * dv, cuda.blockDim.x):
                v_tile[e // dv, e % dv] = v[bh, j0 + e // dv, e % dv]
            cuda.syncthreads()
            if active:
                top = m
                for r in range(width):
                    s = zero
                    for c in range(d):
                        s += q_row[c] * k_tile[r, c]
                    if has_bias:
                        s += bias[slot, row, j0 + r]
                    if is_causal and j0 + r > i:
                        s = neg_inf
                    scores[r] = s
                    top = max(top, s)
                m, l = softmax_tile(scores, width, top, v_tile, dv, m, l, acc)
            cuda.syncthreads()
        if active:
            inv = one / l if l > zero else zero
            for c in range(dv):
                out[bh, i, c] = acc[c] * inv

    return exact_forward


def ptx_signatures():
    """``(name, python function, argument types)`` of every kernel, for compile_ptx tests."""
    from numba import float32, float64, int64, types

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        arr3 = nb[:, :, ::1]
        args = (arr3, arr3, arr3, arr3, arr3, int64[::1], nb, types.boolean, types.boolean)
        sigs.append((f"exact_forward_{name}", make_kernel(name).py_func, args))
    return sigs


def forward(inp):
    """Exact attention of canonical inputs with numba.cuda.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays (or NumPy arrays under the simulator), head dims <= 128.

    Returns
    -------
    array, shape ``[BH, Nq, dv]``
        CuPy for CuPy inputs, NumPy under the simulator.
    """
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    dv = inp.value_dim
    on_device = is_cupy(q)
    if on_device:
        import cupy

        out = cupy.zeros((bh, nq, dv), dtype=q.dtype)
        bring = cuda.as_cuda_array
    else:
        out = np.zeros((bh, nq, dv), dtype=q.dtype)
        bring = cuda.to_device
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    if on_device:
        import cupy

        bias = cupy.asarray(bias)
        mask_index = cupy.asarray(mask_index)
    kernel = make_kernel(q.dtype.name)
    threads = block_threads(kernel)
    d_bias = bring(bias)
    stream = numba_stream()  # CuPy's current stream (0 under the simulator)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        d_out = bring(out[b0:b1]) if on_device else cuda.device_array((b1 - b0, nq, dv), q.dtype)
        kernel[((nq + threads - 1) // threads, b1 - b0), threads, stream](
            bring(q[b0:b1]), bring(k[b0:b1]), bring(v[b0:b1]), d_out, d_bias,
            bring(mask_index[b0:b1]), q.dtype.type(inp.scale), has_bias,
            bool(inp.mask.is_causal),
        )
        if not on_device:
            out[b0:b1] = d_out.copy_to_host()
    return out

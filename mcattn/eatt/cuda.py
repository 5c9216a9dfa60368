"""E-Att attention on CUDA GPUs with numba.cuda (same algorithm as ``kernels/eatt.cu``).

One thread per query row, blocks of ``config.CUDA_THREADS_PER_BLOCK`` rows, key tiles
(scaled keys for L1, packed sign codes for Hamming) and value tiles staged in shared
memory, streaming softmax. L1: ``-sum |q - k|`` of the pre-scaled rows; Hamming:
``neg_table[popc(qc ^ kc)]``. Head dims up to :data:`MAX_HEAD_DIM`. Takes CuPy arrays
or, under the numba.cuda simulator (``NUMBA_ENABLE_CUDASIM=1``), NumPy arrays.
"""

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .. import config
from .._array import is_cupy
from .._cuda_device import block_key_end, load_tile, softmax_tile
from ._gpu import MAX_WORDS, kernel_arrays

__all__ = ["forward", "make_kernel", "MAX_HEAD_DIM", "ptx_signatures"]

MAX_HEAD_DIM = 128
_TILE = {"float32": 32, "float64": 16}
_MAX_GRID_Y = 65535


@functools.cache
def make_kernel(dtype_name):
    """The numba.cuda kernel for one compute dtype (``"float32"`` or ``"float64"``)."""
    from numba import float32, float64, uint64

    nb_type = float32 if dtype_name == "float32" else float64
    tile = _TILE[dtype_name]
    maxd = MAX_HEAD_DIM
    maxw = MAX_WORDS
    # Typed constants: a bare 0.0 or -math.inf would promote the float32 kernel to float64.
    zero, one, neg_inf = nb_type(0.0), nb_type(1.0), nb_type(-math.inf)

    @cuda.jit
    def eatt_forward(q, k, qc, kc, neg_table, v, out, bias, mask_index, has_bias, is_causal,
                     hamming):
        k_tile = cuda.shared.array((tile, maxd), nb_type)
        c_tile = cuda.shared.array((tile, maxw), uint64)
        v_tile = cuda.shared.array((tile, maxd), nb_type)
        q_row = cuda.local.array(maxd, nb_type)
        q_code = cuda.local.array(maxw, uint64)
        acc = cuda.local.array(maxd, nb_type)
        scores = cuda.local.array(tile, nb_type)
        bh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * cuda.blockDim.x + tid
        nq = out.shape[1]
        nk = v.shape[1]
        d = q.shape[2]
        words = qc.shape[2]
        dv = v.shape[2]
        active = i < nq
        if hamming:
            for w in range(words):  # an if, not a ternary: uint64 and int would unify to float
                if active:
                    q_code[w] = qc[bh, i, w]
                else:
                    q_code[w] = 0
        else:
            for c in range(d):
                q_row[c] = q[bh, i, c] if active else zero
        for c in range(dv):
            acc[c] = zero
        m = neg_inf
        l = zero
        slot = mask_index[bh] if has_bias else 0
        row = i if bias.shape[1] > 1 else 0
        key_end = block_key_end(nq, nk, is_causal)
        for j0 in range(0, key_end, tile):
            width = min(tile, key_end - j0)
            if hamming:
                for e in range(tid, width * words, cuda.blockDim.x):
                    c_tile[e // words, e % words] = kc[bh, j0 + e // words, e % words]
            else:
                load_tile(k_tile, k, bh, j0, width, d, one)
            load_tile(v_tile, v, bh, j0, width, dv, one)
            cuda.syncthreads()
            if active:
                top = m
                for r in range(width):
                    if hamming:
                        h = cuda.popc(q_code[0] ^ c_tile[r, 0])  # stays an unsigned integer
                        for w in range(1, words):
                            h += cuda.popc(q_code[w] ^ c_tile[r, w])
                        s = neg_table[h]
                    else:
                        dist = zero
                        for c in range(d):
                            dist += abs(q_row[c] - k_tile[r, c])
                        s = -dist
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

    return eatt_forward


def ptx_signatures():
    """``(name, python function, argument types)`` of every kernel, for compile_ptx tests."""
    from numba import float32, float64, int64, types, uint64

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        arr3 = nb[:, :, ::1]
        codes = uint64[:, :, ::1]
        args = (arr3, arr3, codes, codes, nb[::1], arr3, arr3, arr3, int64[::1], types.boolean,
                types.boolean, types.boolean)
        sigs.append((f"eatt_forward_{name}", make_kernel(name).py_func, args))
    return sigs


def forward(inp, alignment="l1", codes=None):
    """E-Att attention of canonical inputs with numba.cuda.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays (or NumPy arrays under the simulator), head dims <= 128.
    alignment : {"l1", "hamming"}
    codes : (qb, kb), for ``"hamming"``
        Packed sign codes ``[BH, Nq, W]``, ``[BH, Nk, W]`` (uint64).

    Returns
    -------
    array, shape ``[BH, Nq, dv]``
        CuPy for CuPy inputs, NumPy under the simulator.
    """
    bh, nq, _ = inp.q.shape
    dv = inp.value_dim
    on_device = is_cupy(inp.q)
    if on_device:
        import cupy

        xp = cupy
        bring = cuda.as_cuda_array
    else:
        xp = np
        bring = cuda.to_device
    out = xp.zeros((bh, nq, dv), dtype=inp.dtype)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out
    q, k, qc, kc, table = kernel_arrays(inp, alignment, codes, xp)
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else xp.zeros((1, 1, 1), inp.dtype)
    mask_index = xp.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    kernel = make_kernel(inp.dtype.name)
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    hamming = alignment == "hamming"
    d_bias, d_table = bring(bias), bring(table)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        rows = slice(b0, b1)
        d_out = bring(out[rows]) if on_device else cuda.device_array((b1 - b0, nq, dv), inp.dtype)
        kernel[((nq + threads - 1) // threads, b1 - b0), threads](
            bring(q if hamming else q[rows]), bring(k if hamming else k[rows]),
            bring(qc[rows] if hamming else qc), bring(kc[rows] if hamming else kc), d_table,
            bring(inp.v[rows]), d_out, d_bias, bring(mask_index[rows]), has_bias,
            bool(inp.mask.is_causal), hamming,
        )
        if not on_device:
            out[rows] = d_out.copy_to_host()
    return out

"""Exact attention on CUDA GPUs with numba.cuda (same algorithm as ``kernels/exact.cu``).

Forward: one thread per query row, blocks of ``config.CUDA_THREADS_PER_BLOCK`` rows, key
tiles staged in shared memory, streaming softmax (running max, running sum); optionally
the rows' log-sum-exp for training. Backward (the FlashAttention-2 recipe, probabilities
recomputed from the log-sum-exp, ``O(N d)`` memory): one kernel with a thread per query
row for ``dq`` (and ``delta_i = dout_i . out_i``), then one with a thread per key row for
``dk`` and ``dv``, so no two threads add into the same row and no atomics are needed.
Head dims up to :data:`MAX_HEAD_DIM`. Takes CuPy arrays (zero-copy through
``__cuda_array_interface__``) or, under the numba.cuda simulator
(``NUMBA_ENABLE_CUDASIM=1``), NumPy arrays.
"""

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .._array import is_cupy
from .._cuda_device import block_key_end, load_tile, softmax_tile
from .._cupy import block_threads, numba_stream

__all__ = ["forward", "forward_lse", "backward", "make_kernel", "make_backward_kernels", "MAX_HEAD_DIM",
           "ptx_signatures"]

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
    def exact_forward(q, k, v, out, lse, bias, mask_index, scale, has_bias, is_causal, write_lse):
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
        key_end = block_key_end(nq, nk, is_causal)
        for j0 in range(0, key_end, tile):
            width = min(tile, key_end - j0)
            load_tile(k_tile, k, bh, j0, width, d, one)
            load_tile(v_tile, v, bh, j0, width, dv, one)
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
            if write_lse:  # log-sum-exp of the scaled, masked scores; -inf: no visible key
                lse[bh, i] = m + math.log(l) if l > zero else neg_inf

    return exact_forward


@functools.cache
def make_backward_kernels(dtype_name):
    """The two numba.cuda backward kernels ``(dq kernel, dk/dv kernel)`` for one dtype.

    Both recompute ``p_ij = exp(s_ij - lse_i)`` with ``s_ij = scale q_i . k_j + bias_ij``
    (0 where causal hides ``j > i``, or where the row has no visible key, ``lse_i = -inf``)
    and ``ds_ij = p_ij (dout_i . v_j - delta_i)``. The dq kernel also writes
    ``delta_i = dout_i . out_i``, which the dk/dv kernel (launched after it) reads.
    """
    from numba import float32, float64

    nb_type = float32 if dtype_name == "float32" else float64
    tile = _TILE[dtype_name]
    maxd = MAX_HEAD_DIM
    zero, one, neg_inf = nb_type(0.0), nb_type(1.0), nb_type(-math.inf)

    @cuda.jit
    def exact_backward_dq(q, k, v, out, dout, lse, dq, delta, bias, mask_index, scale, has_bias,
                          is_causal):
        # One thread per query row i: dq_i = scale sum_j ds_ij k_j over key tiles in shared memory.
        k_tile = cuda.shared.array((tile, maxd), nb_type)
        v_tile = cuda.shared.array((tile, maxd), nb_type)
        q_row = cuda.local.array(maxd, nb_type)
        do_row = cuda.local.array(maxd, nb_type)
        acc = cuda.local.array(maxd, nb_type)
        bh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * cuda.blockDim.x + tid
        nq = q.shape[1]
        nk = k.shape[1]
        d = q.shape[2]
        dv = v.shape[2]
        active = i < nq
        top = lse[bh, i] if active else neg_inf
        total = zero
        for c in range(d):
            q_row[c] = q[bh, i, c] * scale if active else zero
            acc[c] = zero
        for c in range(dv):
            g = dout[bh, i, c] if active else zero
            do_row[c] = g
            if active:
                total += g * out[bh, i, c]
        if active:
            delta[bh, i] = total
        live = active and top != neg_inf  # a row with no visible key has zero gradients
        slot = mask_index[bh] if has_bias else 0
        row = i if bias.shape[1] > 1 else 0
        key_end = block_key_end(nq, nk, is_causal)
        for j0 in range(0, key_end, tile):
            width = min(tile, key_end - j0)
            load_tile(k_tile, k, bh, j0, width, d, one)
            load_tile(v_tile, v, bh, j0, width, dv, one)
            cuda.syncthreads()
            if live:
                for r in range(width):
                    if is_causal and j0 + r > i:
                        break
                    s = zero
                    for c in range(d):
                        s += q_row[c] * k_tile[r, c]
                    if has_bias:
                        s += bias[slot, row, j0 + r]
                    p = math.exp(s - top)  # a masked key (-inf) gives 0
                    dp = zero
                    for c in range(dv):
                        dp += do_row[c] * v_tile[r, c]
                    ds = p * (dp - total)
                    for c in range(d):
                        acc[c] += ds * k_tile[r, c]
            cuda.syncthreads()
        if active:
            for c in range(d):
                dq[bh, i, c] = acc[c] * scale

    @cuda.jit
    def exact_backward_dkdv(q, k, v, dout, lse, delta, dk, dv, bias, mask_index, scale, has_bias,
                            is_causal):
        # One thread per key row j: dv_j = sum_i p_ij dout_i, dk_j = sum_i ds_ij (scale q_i)
        # over query tiles in shared memory. The thread's k and v rows are read from global
        # memory (cached): local copies would take the float64 kernel past 4 KiB of stack.
        q_tile = cuda.shared.array((tile, maxd), nb_type)
        do_tile = cuda.shared.array((tile, maxd), nb_type)
        lse_tile = cuda.shared.array(tile, nb_type)
        delta_tile = cuda.shared.array(tile, nb_type)
        dk_acc = cuda.local.array(maxd, nb_type)
        dv_acc = cuda.local.array(maxd, nb_type)
        bh = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        j = cuda.blockIdx.x * cuda.blockDim.x + tid
        nq = q.shape[1]
        nk = k.shape[1]
        d = q.shape[2]
        dvw = v.shape[2]
        active = j < nk
        for c in range(d):
            dk_acc[c] = zero
        for c in range(dvw):
            dv_acc[c] = zero
        slot = mask_index[bh] if has_bias else 0
        row_bias = bias.shape[1] > 1
        first = 0
        if is_causal:  # queries before the block's first key see none of its keys
            first = min(nq, cuda.blockIdx.x * cuda.blockDim.x)
        for i0 in range(first, nq, tile):
            width = min(tile, nq - i0)
            load_tile(q_tile, q, bh, i0, width, d, scale)
            load_tile(do_tile, dout, bh, i0, width, dvw, one)
            for e in range(tid, width, cuda.blockDim.x):
                lse_tile[e] = lse[bh, i0 + e]
                delta_tile[e] = delta[bh, i0 + e]
            cuda.syncthreads()
            if active:
                for r in range(width):
                    i = i0 + r
                    top = lse_tile[r]
                    if top == neg_inf or (is_causal and j > i):
                        continue
                    s = zero
                    for c in range(d):
                        s += q_tile[r, c] * k[bh, j, c]
                    if has_bias:
                        s += bias[slot, i if row_bias else 0, j]
                    p = math.exp(s - top)
                    dp = zero
                    for c in range(dvw):
                        g = do_tile[r, c]
                        dv_acc[c] += p * g
                        dp += g * v[bh, j, c]
                    ds = p * (dp - delta_tile[r])
                    for c in range(d):
                        dk_acc[c] += ds * q_tile[r, c]
            cuda.syncthreads()
        if active:
            for c in range(d):
                dk[bh, j, c] = dk_acc[c]
            for c in range(dvw):
                dv[bh, j, c] = dv_acc[c]

    return exact_backward_dq, exact_backward_dkdv


def ptx_signatures():
    """``(name, python function, argument types)`` of every kernel, for compile_ptx tests."""
    from numba import float32, float64, int64, types

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        arr3, arr2 = nb[:, :, ::1], nb[:, ::1]
        flag = types.boolean
        args = (arr3, arr3, arr3, arr3, arr2, arr3, int64[::1], nb, flag, flag, flag)
        sigs.append((f"exact_forward_{name}", make_kernel(name).py_func, args))
        dq_kernel, dkdv_kernel = make_backward_kernels(name)
        tail = (arr3, int64[::1], nb, flag, flag)
        sigs.append((f"exact_backward_dq_{name}", dq_kernel.py_func,
                     (arr3, arr3, arr3, arr3, arr3, arr2, arr3, arr2) + tail))
        sigs.append((f"exact_backward_dkdv_{name}", dkdv_kernel.py_func,
                     (arr3, arr3, arr3, arr3, arr2, arr2, arr3, arr3) + tail))
    return sigs


def _device_tools(q):
    """``(on_device, xp, bring)``: CuPy and zero-copy views, or NumPy and host-to-device copies."""
    if is_cupy(q):
        import cupy

        return True, cupy, cuda.as_cuda_array
    return False, np, cuda.to_device


def _mask_arrays(inp, xp):
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), inp.q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    return has_bias, xp.asarray(bias), xp.asarray(mask_index)


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
    return _forward(inp, want_lse=False)[0]


def forward_lse(inp):
    """Exact attention with numba.cuda, and the rows' log-sum-exp (for training).

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        CuPy arrays (or NumPy arrays under the simulator), head dims <= 128.

    Returns
    -------
    out : array, shape ``[BH, Nq, dv]``
    lse : array, shape ``[BH, Nq]``
        ``log sum_j exp(scale q_i k_j + bias_ij)`` over visible keys; -inf for a row with none.
    """
    return _forward(inp, want_lse=True)


def _forward(inp, want_lse):
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    dv = inp.value_dim
    on_device, xp, bring = _device_tools(q)
    out = xp.zeros((bh, nq, dv), dtype=q.dtype)
    lse = xp.full((bh, nq) if want_lse else (1, 1), -np.inf, dtype=q.dtype)
    if bh == 0 or nq == 0 or inp.nk == 0:
        return out, lse
    has_bias, bias, mask_index = _mask_arrays(inp, xp)
    kernel = make_kernel(q.dtype.name)
    threads = block_threads(kernel)
    d_bias = bring(bias)
    stream = numba_stream()  # CuPy's current stream (0 under the simulator)
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        lse_part = lse[b0:b1] if want_lse else lse
        d_out, d_lse = bring(out[b0:b1]), bring(lse_part)
        kernel[((nq + threads - 1) // threads, b1 - b0), threads, stream](
            bring(q[b0:b1]), bring(k[b0:b1]), bring(v[b0:b1]), d_out, d_lse, d_bias,
            bring(mask_index[b0:b1]), q.dtype.type(inp.scale), has_bias,
            bool(inp.mask.is_causal), want_lse,
        )
        if not on_device:
            out[b0:b1] = d_out.copy_to_host()
            if want_lse:
                lse[b0:b1] = d_lse.copy_to_host()
    return out, lse


def backward(inp, out, lse, dout):
    """Gradients of exact attention with numba.cuda.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        The forward's canonical inputs (CuPy, or NumPy under the simulator), head dims <= 128.
    out : array, shape ``[BH, Nq, dv]``
    lse : array, shape ``[BH, Nq]``
        From :func:`forward_lse` (or any backend's ``forward_lse``).
    dout : array, shape ``[BH, Nq, dv]``
        Gradient of the loss with respect to ``out``.

    Returns
    -------
    dq, dk, dv : arrays
        ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]``. Besides them the kernels use
        ``O(BH Nq)`` memory (``delta``); probabilities are recomputed, never stored.
    """
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, _ = q.shape
    nk = inp.nk
    on_device, xp, bring = _device_tools(q)
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    if bh == 0 or nq == 0 or nk == 0:
        return dq, dk, dv
    out, lse, dout = (xp.ascontiguousarray(a, dtype=q.dtype) for a in (out, lse, dout))
    delta = xp.zeros((bh, nq), dtype=q.dtype)
    has_bias, bias, mask_index = _mask_arrays(inp, xp)
    dq_kernel, dkdv_kernel = make_backward_kernels(q.dtype.name)
    threads_q, threads_k = block_threads(dq_kernel), block_threads(dkdv_kernel)
    d_bias = bring(bias)
    scale, causal = q.dtype.type(inp.scale), bool(inp.mask.is_causal)
    stream = numba_stream()
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        parts = [bring(a[b0:b1]) for a in (q, k, v, out, dout, lse, dq, delta, dk, dv, mask_index)]
        d_q, d_k, d_v, d_out, d_dout, d_lse, d_dq, d_delta, d_dk, d_dv, d_index = parts
        # Same stream: the dk/dv kernel reads the delta the dq kernel wrote.
        dq_kernel[((nq + threads_q - 1) // threads_q, b1 - b0), threads_q, stream](
            d_q, d_k, d_v, d_out, d_dout, d_lse, d_dq, d_delta, d_bias, d_index, scale, has_bias, causal)
        dkdv_kernel[((nk + threads_k - 1) // threads_k, b1 - b0), threads_k, stream](
            d_q, d_k, d_v, d_dout, d_lse, d_delta, d_dk, d_dv, d_bias, d_index, scale, has_bias, causal)
        if not on_device:
            dq[b0:b1] = d_dq.copy_to_host()
            dk[b0:b1] = d_dk.copy_to_host()
            dv[b0:b1] = d_dv.copy_to_host()
    return dq, dk, dv

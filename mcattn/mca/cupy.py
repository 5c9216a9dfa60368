"""Monte-Carlo value projection on CUDA GPUs through CuPy RawKernels.

Independent draws: ``kernels/mca.cu`` (one thread per token draws its samples). Shared
draws: the plan of the compiled host planner (:func:`mcattn.mca.shared_cpu.make_plan`)
applied as reduced GEMMs on cuBLAS (:func:`shared_gemm`, ``config.MCA_SHARED_CUPY =
"gemm"``, the default) or by one launch of ``kernels/mca_shared.cu`` (``"kernel"``).
"""

import numpy as np

from .. import config
from .. import random as mrandom
from .._cupy import block_threads, raw_module
from ..errors import ConfigError
from ._gpu import device_tables, device_wh, scratch_plan, shared_device_args, shared_grid

__all__ = ["value_projection"]

_SOURCE = "mca/kernels/mca.cu"
_SHARED_SOURCE = "mca/kernels/mca_shared.cu"
THREADS_PER_BLOCK = 128


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", shared_draws=False,
                     tables=None):
    """CuPy version of :func:`mcattn.mca.naive.value_projection` (same draws).

    Parameters and result as there, with CuPy arrays; ``d_head <= 128`` and ``d_in <=
    4096`` (checked by :func:`mcattn.mca.value_projection`). ``shared_draws=True`` (weight
    sampling) goes to :func:`shared_projection`.
    """
    import cupy

    if shared_draws:
        if sampling != "weight":
            raise ValueError("shared_draws=True needs sampling='weight'")
        return shared_projection(x, w, bias, num_heads, budgets, seed, tables)
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


def shared_projection(x, w, bias, num_heads, budgets, seed, tables=None):
    """Shared-draw value projection: the host plan applied on the device.

    The same estimate as :func:`mcattn.mca.shared_cpu.value_projection` (same draws, same
    groups; accumulated in the input precision). The budgets are brought to the host and
    the plan is built there by the compiled planner; then, by ``config.MCA_SHARED_CUPY``,
    the reduced GEMMs on cuBLAS (:func:`shared_gemm`, ``"gemm"``) or the plan uploaded
    (two transfers) and one thread per output element (``kernels/mca_shared.cu``,
    ``"kernel"``).

    Parameters
    ----------
    x : cupy.ndarray, shape ``[B, N, d_in]``
    w : cupy.ndarray, shape ``[d_in, H * dh]``
    bias : cupy.ndarray, shape ``[H * dh]``, or None
    num_heads : int
    budgets : array of int, shape ``[B, H, N]`` (CuPy or NumPy)
        Used as given (rounded or not).
    seed : int
    tables : WeightTables, optional

    Returns
    -------
    cupy.ndarray, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    import cupy

    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    out = cupy.empty((batch, num_heads, n, dh), dtype=x.dtype)
    if out.size == 0:
        return out
    path = config.MCA_SHARED_CUPY
    if path not in ("gemm", "kernel"):
        raise ConfigError(f"MCA_SHARED_CUPY must be 'gemm' or 'kernel'; got {path!r}")
    if path == "gemm":
        return shared_gemm(x, w, bias, num_heads, budgets, seed, tables, out)
    args = shared_device_args(x, w, bias, num_heads, budgets, seed, tables)
    suffix = "f32" if x.dtype == np.float32 else "f64"
    kernel = raw_module(_SHARED_SOURCE).get_function(f"mcattn_mca_shared_apply_{suffix}")
    threads = block_threads(kernel, THREADS_PER_BLOCK)
    total = out.size
    kernel((shared_grid(total, threads),), (threads,),
           args + (out, np.int64(num_heads), np.int64(n), np.int64(d_in), np.int64(dh), np.int64(total)))
    return out


def _padded(values, starts, counts, width, fill, dtype):
    """Rows ``i`` of ``[len(counts), width]`` holding ``values[starts[i]:][:counts[i]]``, then ``fill``."""
    counts = np.asarray(counts, np.int64)
    out = np.full((len(counts), max(1, width)), fill, dtype)
    which = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(which.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out[which, pos] = values[np.repeat(np.asarray(starts, np.int64), counts) + pos]
    return out


def shared_gemm(x, w, bias, num_heads, budgets, seed, tables=None, out=None):
    """Shared-draw value projection as reduced GEMMs on cuBLAS (``cupy.matmul``).

    The plan of :func:`mcattn.mca.shared_cpu.make_plan` (host) gives each (batch row, head)
    ``bh`` its distinct drawn rows ``R`` and each token ``j`` a group whose weights ``w_g``
    cover a prefix of ``R``; so ``out_j = bias + (x[j, R] * w_g) @ W_h[R]``. Per chunk of
    batch rows (at most ``config.CUDA_SCRATCH_BYTES`` for the gathered ``[N, R]``
    operands): gather ``x[:, R]`` and the tokens' weight rows (zeros past their width, for
    masked and exact tokens everywhere), multiply, then one batched GEMM with ``W_h[R]``
    ``[R, dh]``; exact tokens are one GEMM per head over their rows of ``x``. ``R`` is
    padded to the largest head's count (zero weights): more multiply-adds than the
    kernel's (each token its own width), all on cuBLAS's tiles.

    Parameters and result as :func:`shared_projection` (``out``: ``[B, H, N, dh]`` to fill).
    """
    import cupy

    from .shared_cpu import make_plan

    batch, n, d_in = x.shape
    heads = num_heads
    dh = w.shape[1] // heads
    dtype = x.dtype
    if out is None:
        out = cupy.empty((batch, heads, n, dh), dtype=dtype)
    host_tables, dev = device_tables(w, heads, tables)
    r_host = budgets.get() if hasattr(budgets, "get") else np.asarray(budgets)
    plan = make_plan(r_host, seed, host_tables)
    bh_count = batch * heads
    distinct = np.diff(plan.row_base)
    r_max = int(distinct.max(initial=0))
    # host: the padded rows [BH, R], the groups' weight rows [G + 1, R] (the last: zeros)
    rows = _padded(plan.rows, plan.row_base[:-1], distinct, r_max, 0, np.int64)
    n_groups = int(plan.group_ptr[-1])
    weights = np.zeros((n_groups + 1, max(1, r_max)), dtype)
    weights[:n_groups] = _padded(plan.weights.astype(dtype), plan.weight_ptr, plan.width, r_max, 0, dtype)
    group_of = plan.group_of.reshape(bh_count, n)
    token_group = np.where(group_of >= 0, group_of + plan.group_ptr[:-1, None], n_groups)
    wh = device_wh(dev, dtype)  # [H, d_in, dh]
    bias_h = (cupy.zeros((heads, dh), dtype) if bias is None
              else cupy.ascontiguousarray(bias, dtype=dtype).reshape(heads, dh))
    x = cupy.ascontiguousarray(x)
    rows_d, weights_d, group_d = cupy.asarray(rows), cupy.asarray(weights), cupy.asarray(token_group)
    flat = out.reshape(bh_count, n, dh)
    step = max(1, int(config.CUDA_SCRATCH_BYTES) // max(1, 2 * n * max(1, r_max) * dtype.itemsize))
    tokens = cupy.arange(n)[None, :, None]
    for c0 in range(0, bh_count, step):
        c1 = min(bh_count, c0 + step)
        bh = np.arange(c0, c1)
        b_idx, h_idx = cupy.asarray(bh // heads), cupy.asarray(bh % heads)
        r_c = rows_d[c0:c1]
        a = x[b_idx[:, None, None], tokens, r_c[:, None, :]]  # [c, N, R]
        a *= weights_d[group_d[c0:c1]]
        flat[c0:c1] = cupy.matmul(a, wh[h_idx[:, None], r_c]) + bias_h[h_idx][:, None, :]
    for h in range(heads):  # exact tokens: their full rows
        eb, ej = np.nonzero(plan.group_of[:, h] == -1)
        if eb.size:
            eb, ej = cupy.asarray(eb), cupy.asarray(ej)
            out[eb, h, ej] = cupy.matmul(x[eb, ej], wh[h]) + bias_h[h]
    return out

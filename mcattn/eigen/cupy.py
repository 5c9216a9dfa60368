"""Eigen reconstruction attention on CUDA GPUs with CuPy.

Two paths, the same definition (:mod:`mcattn.eigen.naive`):

* the RawKernel ``kernels/eigen.cu`` (one thread per query row, the row in local memory),
  for the fixed windows eigen is fitted on: ``n <= 256``, ``m <= 64`` computed columns per
  row, ``d, dv <= 64`` (:data:`KERNEL_LIMITS`);
* :func:`forward_gemm` for everything larger: the products as batched cuBLAS GEMMs (tensor
  cores where cuBLAS uses them: TF32 for float32 with CuPy's ``CUPY_TF32=1``), the
  per-query selection as array operations, in row chunks of bounded memory.
"""

import math

import numpy as np

from .. import config
from .._cupy import raw_module
from ._gpu import plan_arrays

__all__ = ["forward", "forward_gemm", "KERNEL_LIMITS"]

_SOURCE = "eigen/kernels/eigen.cu"
_MAX_GRID_Y = 65535
#: Sizes the RawKernel takes (its per-thread row and scratch); larger calls use the GEMMs.
KERNEL_LIMITS = {"n": 256, "m": 64, "d": 64}
#: Elements of the largest scratch array of one chunk of :func:`forward_gemm`.
_CHUNK_ELEMENTS = 1 << 25


def _fits_kernel(inp, plan):
    lim = KERNEL_LIMITS
    return (inp.nk <= lim["n"] and plan.num_fixed + plan.per_query <= lim["m"]
            and inp.q.shape[2] <= lim["d"] and inp.value_dim <= lim["d"])


def forward(inp, plan):
    """Eigen reconstruction attention of canonical CuPy inputs (any size).

    Calls within :data:`KERNEL_LIMITS` run the RawKernel, larger ones :func:`forward_gemm`.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    plan : mcattn.eigen.plan.Plan

    Returns
    -------
    cupy.ndarray, shape ``[BH, Nq, dv]``
    """
    import cupy

    if not _fits_kernel(inp, plan):
        return forward_gemm(inp, plan)
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


def forward_gemm(inp, plan, *, chunk_elements=None):
    """Eigen reconstruction attention as batched GEMMs and array operations (CuPy or NumPy).

    For a chunk of batch rows ``b`` and query rows ``i`` (head ``h = b % H``):

    1. ``a_S = scale q K[S_h]^T`` (a gathered key panel times the queries);
    2. the reconstruction ``base + a_S G_h`` (``m n`` per row) or, when the head dimension
       is the smaller, ``base + scale q Kt^T`` with reconstructed keys ``Kt = G_h^T K[S_h]``
       (``n d`` per row; the same linear map, another order of the sums); the computed
       columns take ``a_S``;
    3. the mask, then the ``per_query`` largest reconstructed visible scores outside ``S_h``
       (ties: lower key index first; found with a partition and a running count of the
       ties, no sort) computed exactly from gathered key rows;
    4. softmax and ``P V``.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        ``q [BH, Nq, d]``, ``k [BH, n, d]``, ``v [BH, n, dv]`` (CuPy, or NumPy arrays).
    plan : mcattn.eigen.plan.Plan
    chunk_elements : int, optional
        Largest scratch array of one chunk, in elements (default ``2**25``): bounds memory.

    Returns
    -------
    array, shape ``[BH, Nq, dv]``
    """
    xp = inp.xp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    dt = q.dtype.type
    out = xp.zeros((bh, nq, dv), dtype=q.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    cols, weights, base, bias, index, has_bias = plan_arrays(inp, plan, xp)
    heads, m, p = plan.num_heads, plan.num_fixed, min(plan.per_query, nk - plan.num_fixed)
    # Rows per chunk: the [rows, n] score tiles and the [rows, p, d] gathered keys.
    limit = int(chunk_elements or _CHUNK_ELEMENTS)
    rows = max(1, min(nq, limit // max(1, nk, p * max(d, 1))))
    factored = d < m
    scale = dt(inp.scale)
    for b in range(bh):
        h = b % heads
        ks = k[b][cols[h]]  # [m, d]
        kt = weights[h].T @ ks if factored else None  # [n, d] reconstructed keys
        for i0 in range(0, nq, rows):
            i1 = min(nq, i0 + rows)
            qs = q[b, i0:i1] * scale
            a_s = qs @ ks.T  # [r, m]
            brow = base[h, i0:i1] if plan.positional else base[h, :1]
            s = brow + (qs @ kt.T if factored else a_s @ weights[h])
            s[:, cols[h]] = a_s
            if has_bias:
                bias_rows = bias[int(index[b])]
                s += bias_rows[i0:i1] if bias_rows.shape[0] > 1 else bias_rows
            if inp.mask.is_causal:
                later = xp.arange(nk)[None, :] > xp.arange(i0, i1)[:, None]
                s = xp.where(later, dt(-math.inf), s)
            if p > 0:
                _exact_extras(xp, s, qs, k[b], cols[h], p, bias_rows if has_bias else None, i0, i1)
            top = s.max(axis=-1, keepdims=True)
            top = xp.where(xp.isfinite(top), top, dt(0))
            e = xp.exp(s - top)
            total = e.sum(axis=-1, keepdims=True)
            out[b, i0:i1] = xp.where(total > 0, (e @ v[b]) / xp.where(total > 0, total, dt(1)), dt(0))
    return out


def _exact_extras(xp, s, qs, kb, cols, p, bias_rows, i0, i1):
    """Replace in ``s [r, n]`` the ``p`` largest visible scores outside ``cols`` by exact ones.

    The ``p``-th largest candidate ``tau`` is a partition away; every candidate above it is
    taken, and of those equal to it the lowest indices up to ``p`` in all (a running count),
    which is the reference's order (score, then lower key index).
    """
    dt = s.dtype.type
    cand = s.copy()
    cand[:, cols] = dt(-math.inf)
    tau = -xp.partition(-cand, p - 1, axis=-1)[:, p - 1:p]  # [r, 1]
    above = cand > tau
    ties = (cand == tau) & (cand > dt(-math.inf))
    room = p - above.sum(axis=-1, keepdims=True)
    chosen = above | (ties & (xp.cumsum(ties, axis=-1) <= room))
    # Gather the chosen keys, p slots per row (rows with fewer visible keys: invalid slots).
    slot = xp.argsort(~chosen, axis=-1, kind="stable")[:, :p]  # chosen first
    valid = xp.take_along_axis(chosen, slot, axis=-1)
    exact = xp.einsum("rd,rpd->rp", qs, kb[slot])
    if bias_rows is not None:
        rows = bias_rows[i0:i1] if bias_rows.shape[0] > 1 else bias_rows[:1]
        exact += xp.take_along_axis(xp.broadcast_to(rows, s.shape), slot, axis=-1)
    r = xp.arange(s.shape[0])[:, None]
    s[r, slot] = xp.where(valid, exact, s[r, slot])

"""MCA's shared draws as reduced GEMMs (NumPy/BLAS on the host, CuPy/cuBLAS on a GPU).

With ``shared_draws=True`` every token of a (batch row, head) uses a prefix of one draw
sequence ``k_0, k_1, ...`` (:mod:`mcattn.mca.naive`), so the estimate of token ``j`` is

    V~[j] = b + (1/r_j) sum_{t < r_j} X[j, k_t] W[k_t] / p(k_t).

Sort the sampled tokens by budget; the distinct budgets ``e_1 < e_2 < ... < e_G`` cut
the draw sequence into segments ``[e_{s-1}, e_s)``. In a segment, repeated indices merge
into one row of ``W`` weighted by ``count / p``; the tokens whose budget reaches the
segment (a suffix of the sorted tokens) gather their columns of ``X`` once and one GEMM
adds the segment's contribution. So the sampled projection costs ``G`` GEMMs over a
reduced inner dimension per head instead of one multiply-add per draw.

:func:`round_budgets` rounds budgets *up* to fewer distinct values first (more samples:
the estimator stays unbiased and every bound computed from the rounded budgets holds),
trading a few extra multiply-adds for fewer, larger GEMMs. With the budgets as given
(no rounding) the draws and the estimate are those of the per-draw kernels.
"""

import numpy as np

from .. import random as mrandom
from .._validate import namespace_of
from .naive import SHARED_STREAM_BASE, alias_draw, weight_tables

__all__ = ["round_budgets", "value_projection", "segment_plan"]


def round_budgets(budgets, d_in, slack):
    """Budgets rounded up so that each (batch row, head) has few distinct values.

    Parameters
    ----------
    budgets : numpy.ndarray of int, shape ``[B, H, N]``
    d_in : int
        Budgets ``>= d_in`` (exact tokens) and 0 (masked) are left as they are.
    slack : float
        A group of budgets ``[a, b]`` is rounded up to ``b`` with ``b <= a * (1 + slack)``
        (0 leaves the budgets as they are).

    Returns
    -------
    numpy.ndarray of int64, same shape, ``>= budgets`` everywhere.
    """
    r = np.array(budgets, dtype=np.int64, copy=True)
    if slack <= 0 or r.size == 0:
        return r
    flat = r.reshape(-1, r.shape[-1])
    for row in flat:
        sampled = (row > 0) & (row < d_in)
        values = np.unique(row[sampled])
        if values.size < 2:
            continue
        edges = []  # greedy from the smallest budget: a group spans [a, a * (1 + slack)]
        i = 0
        while i < values.size:
            top = values[i] * (1.0 + slack)
            j = np.searchsorted(values, top, side="right") - 1
            edges.append(values[j])
            i = j + 1
        edges = np.asarray(edges)
        row[sampled] = np.minimum(edges[np.searchsorted(edges, row[sampled])], d_in)
    return r


def segment_plan(k, p, budgets_sorted):
    """The segments of one draw sequence.

    Parameters
    ----------
    k : numpy.ndarray of int64, shape ``[longest]``
        The drawn row indices.
    p : numpy.ndarray, shape ``[d_in]``
        Sampling probabilities.
    budgets_sorted : numpy.ndarray of int64
        Budgets of the sampled tokens, ascending.

    Returns
    -------
    list of (start, rows, weights)
        For each segment: the first sorted token that uses it, the distinct indices
        drawn in it, and ``count / p`` for each.
    """
    edges = np.unique(budgets_sorted)
    plan, lo = [], 0
    for e in edges:
        rows, counts = np.unique(k[lo:e], return_counts=True)
        start = int(np.searchsorted(budgets_sorted, e, side="left"))
        plan.append((start, rows, counts / p[rows]))
        lo = int(e)
    return plan


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", shared_draws=True,
                     tables=None):
    """Shared-draw value projection by reduced GEMMs (same arguments as the other kernels).

    Parameters
    ----------
    x : array, shape ``[B, N, d_in]``
        NumPy or CuPy.
    w : array, shape ``[d_in, H * dh]``
    bias : array, shape ``[H * dh]``, or None
    num_heads : int
    budgets : array of int, shape ``[B, H, N]``
        Used as given (round them with :func:`round_budgets` first for speed).
    seed : int
    sampling : {"weight"}
    shared_draws : True
    tables : WeightTables, optional

    Returns
    -------
    array, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    if sampling != "weight" or not shared_draws:
        raise ValueError("the reduced-GEMM path is for shared_draws=True with weight sampling")
    xp = namespace_of(x)
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    if xp is np:
        tables = weight_tables(w, num_heads) if tables is None else tables
        wh = tables.wh_as(x.dtype)  # [H, d_in, dh]
    else:
        from ._gpu import device_tables

        tables, dev = device_tables(w, num_heads, tables)
        wh = dev["wh"].astype(x.dtype, copy=False)
    r_host = np.asarray(budgets.get() if hasattr(budgets, "get") else budgets, dtype=np.int64)
    out = xp.zeros((batch, num_heads, n, dh), dtype=x.dtype)
    if bias is not None:
        out += bias.reshape(num_heads, 1, dh).astype(x.dtype, copy=False)
    # (A zero input row needs no special case here: its estimate is exactly the bias.)

    def project(task):  # one (batch row, head): writes out[b, h] only
        b, h = task
        xb, r = x[b], r_host[b, h]
        exact = np.flatnonzero(r >= d_in)
        if exact.size:
            out[b, h, xp.asarray(exact)] += xb[xp.asarray(exact)] @ wh[h]
        sampled = np.flatnonzero((r > 0) & (r < d_in))
        if sampled.size == 0:
            return
        order = np.argsort(r[sampled], kind="stable")
        tokens, counts = sampled[order], r[sampled][order]
        bits = mrandom.sample_bits(seed, np.uint64(SHARED_STREAM_BASE + b * num_heads + h),
                                   np.arange(int(counts[-1])))
        k = alias_draw(bits, tables.threshold[h], tables.alias[h], tables.shift)
        # Sorted tokens that form a run (uniform budgets: all of them) index by a slice.
        run = tokens[-1] - tokens[0] == tokens.size - 1 and bool(np.all(np.diff(tokens) == 1))

        def rows_of(part):
            return slice(int(part[0]), int(part[-1]) + 1) if run else xp.asarray(part)

        acc = None
        for start, rows, weights in segment_plan(k, tables.p_weight[h], counts):
            w_seg = wh[h][xp.asarray(rows)] * xp.asarray(weights, dtype=x.dtype)[:, None]
            # The drawn columns of x (one gather), then the tokens that reach the segment
            # (a slice when the sorted tokens are a run, as with uniform budgets): a
            # C-contiguous block, so the product is one BLAS call with an [N, dh] result.
            x_seg = xp.take(xb, xp.asarray(rows), axis=1)
            if start or not run or tokens.size != n:
                x_seg = x_seg[rows_of(tokens[start:])]
            part = x_seg @ w_seg
            if acc is None:
                acc = part  # the first segment reaches every sampled token
            else:
                acc[start:] += part
        acc /= xp.asarray(counts, dtype=x.dtype)[:, None]
        out[b, h, rows_of(tokens)] += acc

    tasks = [(b, h) for b in range(batch) for h in range(num_heads)]
    if xp is np:  # small products: one per thread, single-threaded BLAS
        from .._cpu import map_threads

        map_threads(project, tasks)
    else:  # cuBLAS: one stream, in order
        for task in tasks:
            project(task)
    return out


def reduced_macs(budgets, d_in, dh, seed, tables, x_nonzero):
    """Work of the reduced GEMMs (sampled tokens) for host budgets ``[B, H, N]``.

    Returns
    -------
    macs : int
        Per segment, the tokens that reach it times its distinct rows times ``dh``.
    merge_muls : int
        Scaling the distinct rows by ``count / p``: one multiply per row and column.
    """
    total = merge = 0
    batch, heads, _ = budgets.shape
    for b in range(batch):
        for h in range(heads):
            r = budgets[b, h]
            sampled = np.flatnonzero((r > 0) & (r < d_in) & x_nonzero[b])
            if sampled.size == 0:
                continue
            counts = np.sort(r[sampled])
            bits = mrandom.sample_bits(seed, np.uint64(SHARED_STREAM_BASE + b * heads + h),
                                       np.arange(int(counts[-1])))
            k = alias_draw(bits, tables.threshold[h], tables.alias[h], tables.shift)
            for start, rows, _ in segment_plan(k, tables.p_weight[h], counts):
                total += (counts.size - start) * rows.size * dh
                merge += rows.size * dh
    return total, merge

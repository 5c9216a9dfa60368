"""MCA's shared draws as reduced GEMMs (NumPy/BLAS on the host, CuPy/cuBLAS on a GPU).

With ``shared_draws=True`` every token of a (batch row, head) uses a prefix of one draw
sequence ``k_0, k_1, ...`` (:mod:`mcattn.mca.naive`), so the estimate of token ``j`` is

    V~[j] = b + (1/r_j) sum_{t < r_j} X[j, k_t] W[k_t] / p(k_t).

The tokens with the same budget ``e`` form a *group*; the prefix ``k_0 .. k_{e-1}``
merges into its distinct rows ``R`` (``|R| <= e``) weighted by ``count / (p e)``, and one
GEMM ``X[group][:, R] @ (weights * W[R])`` gives the group's estimates. So the sampled
projection costs one GEMM over a reduced inner dimension per distinct budget and head
instead of one multiply-add per draw (and never more multiply-adds than the draws).

:func:`round_budgets` rounds budgets *up* to fewer distinct values first (more samples:
the estimator stays unbiased and every bound computed from the rounded budgets holds),
trading a few extra multiply-adds for fewer, larger GEMMs. With the budgets as given
(no rounding) the draws and the estimate are those of the per-draw kernels.

This module is the array version (NumPy or CuPy, one head at a time); on the CPU,
:mod:`mcattn.mca.shared_cpu` runs the same plan compiled, all heads of a block of tokens
at once.
"""

import numpy as np

from .. import random as mrandom
from .._jit import njit
from .._validate import namespace_of
from .cpu import weight_tables
from .naive import SHARED_BATCH_STREAM_BASE, SHARED_STREAM_BASE, alias_draw, batch_as_one_row
from .naive import round_budgets as round_budgets_reference

__all__ = ["round_budgets", "round_budgets_reference", "value_projection", "group_plan"]


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

    Notes
    -----
    Compiled (one pass per row over a ``d_in`` table): :func:`mcattn.mca.attention` calls
    it on every shared-draw call, where the NumPy loop of :func:`round_budgets_reference`
    cost more than the projection itself on short sequences.
    """
    r = np.array(budgets, dtype=np.int64, copy=True)
    if slack <= 0 or r.size == 0:
        return r
    _round_rows(r.reshape(-1, r.shape[-1]), int(d_in), float(slack))
    return r


@njit(nogil=True, cache=True)
def _round_rows(r, d_in, slack):
    """In place, per row: greedy groups from the smallest budget, each ``[a, a (1 + slack)]``
    rounded up to its largest present value (what :func:`round_budgets_reference` does)."""
    present = np.zeros(d_in, np.bool_)
    target = np.zeros(d_in, np.int64)
    for row in range(r.shape[0]):
        present[:] = False
        for j in range(r.shape[1]):
            v = r[row, j]
            if 0 < v < d_in:
                present[v] = True
        v = 1
        while v < d_in:
            if not present[v]:
                v += 1
                continue
            top = v * (1.0 + slack)
            edge = v
            u = v + 1
            while u < d_in and u <= top:
                if present[u]:
                    edge = u
                u += 1
            for u in range(v, edge + 1):
                target[u] = edge
            v = edge + 1
        for j in range(r.shape[1]):
            v = r[row, j]
            if 0 < v < d_in:
                r[row, j] = target[v]


def group_plan(k, p, budgets_sorted):
    """The groups of one draw sequence (tokens of equal budget) and their merged rows.

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
    list of (start, stop, rows, weights)
        For each distinct budget ``e``: the sorted tokens ``[start, stop)`` that have it,
        the distinct indices of ``k[:e]``, and ``count / (p e)`` for each (the token's
        ``1 / r_j`` folded in).
    """
    edges, starts = np.unique(budgets_sorted, return_index=True)
    stops = np.append(starts[1:], budgets_sorted.size)
    plan = []
    for e, lo, hi in zip(edges, starts, stops):
        rows, counts = np.unique(k[: int(e)], return_counts=True)
        plan.append((int(lo), int(hi), rows, counts / (p[rows] * float(e))))
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

        for lo, hi, rows, weights in group_plan(k, tables.p_weight[h], counts):
            w_g = wh[h][xp.asarray(rows)] * xp.asarray(weights, dtype=x.dtype)[:, None]
            # The group's tokens (a view when the sorted tokens are a run), their drawn
            # columns gathered into a C-contiguous block: one BLAS call.
            part = rows_of(tokens[lo:hi])
            out[b, h, part] += xp.take(xb[part], xp.asarray(rows), axis=1) @ w_g

    tasks = [(b, h) for b in range(batch) for h in range(num_heads)]
    if xp is np:  # small products: one per thread, single-threaded BLAS
        from .._cpu import map_threads

        map_threads(project, tasks)
    else:  # cuBLAS: one stream, in order
        for task in tasks:
            project(task)
    return out


def reduced_macs(budgets, d_in, dh, seed, tables, x_nonzero, share="row"):
    """Work of the reduced GEMMs (sampled tokens) for host budgets ``[B, H, N]`` (the
    reference of the compiled :func:`mcattn.mca.shared_cpu.reduced_macs`); ``share="batch"``:
    one draw sequence per head, groups over the whole batch.

    Returns
    -------
    macs : int
        Per group, its tokens times its distinct rows times ``dh``.
    merge_muls : int
        Scaling the distinct rows by ``count / (p e)``: one multiply per row and column.
    """
    total = merge = 0
    base = SHARED_STREAM_BASE
    if share == "batch":
        nz, budgets = batch_as_one_row(np.asarray(x_nonzero)[..., None], budgets)
        x_nonzero, base = nz[..., 0], SHARED_BATCH_STREAM_BASE
    batch, heads, _ = budgets.shape
    for b in range(batch):
        for h in range(heads):
            r = budgets[b, h]
            sampled = np.flatnonzero((r > 0) & (r < d_in) & x_nonzero[b])
            if sampled.size == 0:
                continue
            counts = np.sort(r[sampled])
            bits = mrandom.sample_bits(seed, np.uint64(base + b * heads + h),
                                       np.arange(int(counts[-1])))
            k = alias_draw(bits, tables.threshold[h], tables.alias[h], tables.shift)
            for lo, hi, rows, _ in group_plan(k, tables.p_weight[h], counts):
                total += (hi - lo) * rows.size * dh
                merge += rows.size * dh
    return total, merge

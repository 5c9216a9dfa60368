"""MCA's shared draws as reduced GEMMs, compiled for the CPU (Numba + BLAS).

The same estimate as :mod:`mcattn.mca.shared` (and the same draws as the per-draw
kernels), organised for the host's memory hierarchy:

1. **Plan** (one task per (batch row, head), no Python per head): draw the sequence
   ``k_0, k_1, ...`` once (Philox + alias, as :mod:`mcattn.mca.cpu`), and for each
   distinct budget ``e_g`` of the head (a *group* of tokens) merge the prefix
   ``k_0 .. k_{e_g - 1}`` into its distinct rows ``R_g`` with weights
   ``count / (p e_g)``: the estimate of every token of the group is then
   ``b + x[j, R_g] @ (w_g W[R_g])``, a product over ``|R_g|`` (<= ``e_g``) inner
   indices with the ``1 / r_j`` folded in. Merging the whole prefix (not segment by
   segment) never does more multiply-adds than the segments would.
2. **Apply** (one task per (batch row, block of tokens), :func:`token_block`): the block
   of ``x`` stays in cache while every head and group uses it; per group the tokens'
   drawn columns are gathered into a contiguous buffer and one BLAS product
   (``np.dot``, single-threaded BLAS per task) gives their rows, or, for small groups
   where a BLAS call costs more than it saves, a compiled loop does. Masked tokens get
   the bias; exact ones (``r >= d_in``) are one BLAS product per head and block over
   their whole rows of ``x`` (in the same task, so threads stay balanced).

Against the array version this removes the Python work per head (drawing, sorting and
merging with small NumPy calls, under the GIL) and reads each block of ``x`` from memory
once for all heads instead of once per head (``x`` is 6 MB at N = 4096, d_in = 384).
Weights are merged in float64 and cast to the input precision; BLAS accumulates in it.
The reference is :func:`mcattn.mca.naive.value_projection` (``shared_draws=True``).
"""

from typing import NamedTuple

import numpy as np

from .. import random as mrandom
from .._cpu import run_tasks
from .._jit import njit
from .naive import SHARED_BATCH_STREAM_BASE, SHARED_STREAM_BASE, batch_as_one_row, check_share
from .tables import alias_draw as _alias
from .tables import weight_tables

__all__ = ["value_projection", "make_plan", "SharedPlan", "reduced_macs", "token_block",
           "TOKEN_BLOCK", "TOKENS_PER_GROUP", "MAX_TOKEN_BLOCK", "BLAS_MIN_MACS", "BATCH_PIECE"]

#: The fewest tokens per apply task (one group per head: uniform budgets): a block of ``x``
#: (``TOKEN_BLOCK * d_in`` numbers, 384 KB at d_in = 384 in float32) is reused from the
#: core's L2 by every head. 256 against 128: half the BLAS calls, 2-5 % faster at 20 %
#: uniform budgets (N = 4096); 512 was slower (its block no longer stays in L2).
TOKEN_BLOCK = 256
#: Tokens per apply task for each group per head (see :func:`token_block`).
TOKENS_PER_GROUP = 128
#: The most tokens per apply task (see :func:`token_block`).
MAX_TOKEN_BLOCK = 1024
#: ``share="batch"``: a head's sampled tokens, sorted by budget, are multiplied by pieces of
#: this many (one BLAS product each, see :func:`_project_batch`).
BATCH_PIECE = 32
#: ``share="batch"``: chunks of heads per thread (each chunk is one kernel call, whose
#: dispatch costs microseconds).
BATCH_CHUNKS = 2
#: Groups whose product has fewer multiply-adds than this use the compiled loop, larger
#: ones a BLAS call (whose fixed cost is a few microseconds).
BLAS_MIN_MACS = 1 << 15

_philox = mrandom.philox4x32_cpu
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_MASKED = -2  # buckets of _apply: 0 masked, 1 exact, 2 + g group g
_EXACT = -1


@njit(nogil=True, cache=True, inline="always")
def _draw_sequence(stream, longest, threshold_h, alias_h, shift, k0, k1, out):
    """The first ``longest`` draws of random stream ``stream`` into ``out``."""
    d_in = threshold_h.shape[0]
    for pair in range((longest + 1) // 2):
        # One Philox call gives draws 2 * pair and 2 * pair + 1 (= sample_bits).
        index = np.uint64(pair)
        w0, w1, w2, w3 = _philox(index & _MASK32, index >> _SHIFT32, stream & _MASK32,
                                 stream >> _SHIFT32, k0, k1)
        out[2 * pair] = _alias((w0 << _SHIFT32) | w1, threshold_h, alias_h, shift, d_in)
        if 2 * pair + 1 < longest:
            out[2 * pair + 1] = _alias((w2 << _SHIFT32) | w3, threshold_h, alias_h, shift, d_in)


@njit(nogil=True, cache=True, inline="always")
def _mark_budgets(r, present):
    """``present[v]`` = some token of the row ``r`` has the sampled budget ``v`` (``0 < v <
    d_in``, with ``present`` of length ``d_in + 1``); returns the largest such budget."""
    d_in = present.shape[0] - 1
    for v in range(d_in + 1):  # (explicit loops: Numba's slice fills are slow)
        present[v] = False
    longest = 0
    for j in range(r.shape[0]):
        v = r[j]
        if 0 < v < d_in:
            present[v] = True
            longest = max(longest, v)
    return longest


@njit(nogil=True, cache=True)
def _count_plan(budgets, threshold, alias, shift, k0, k1, base, draws, n_groups, n_distinct,
                n_weights, t0, t1):
    """Per (batch row, head) ``task``: the draws of stream ``base + task``, and the numbers of
    groups, of distinct drawn rows and of merged rows over all groups."""
    heads = budgets.shape[1]
    d_in = threshold.shape[1]
    present = np.zeros(d_in + 1, np.bool_)
    counts = np.zeros(d_in, np.int64)
    for task in range(t0, t1):
        b = task // heads
        h = task % heads
        r = budgets[b, h]
        longest = _mark_budgets(r, present)
        for v in range(d_in):
            counts[v] = 0
        distinct = 0
        groups = 0
        total = 0
        _draw_sequence(base + np.uint64(task), longest, threshold[h], alias[h], shift, k0, k1,
                       draws[task])
        for t in range(longest):
            k = draws[task, t]
            if counts[k] == 0:
                distinct += 1
            counts[k] += 1
            if present[t + 1]:
                groups += 1
                total += distinct
        n_groups[task] = groups
        n_distinct[task] = distinct
        n_weights[task] = total


@njit(nogil=True, cache=True)
def _fill_plan(budgets, draws, p_weight, group_ptr, row_base, weight_base, rows, width, weight_ptr,
               weights, group_of, t0, t1):
    """Per (batch row, head): each token's group; the distinct rows in order of first draw;
    per group, how many of them its prefix reaches and their weights ``count / (p e)``."""
    _, heads, n = budgets.shape
    d_in = p_weight.shape[1]
    present = np.zeros(d_in + 1, np.bool_)
    rank = np.zeros(d_in + 1, np.int64)
    counts = np.zeros(d_in, np.int64)
    for task in range(t0, t1):
        b = task // heads
        h = task % heads
        r = budgets[b, h]
        longest = _mark_budgets(r, present)
        g = 0
        for v in range(1, longest + 1):  # groups in ascending budget
            if present[v]:
                rank[v] = g
                g += 1
        for j in range(n):
            v = r[j]
            if v <= 0:
                group_of[b, h, j] = _MASKED
            elif v >= d_in:
                group_of[b, h, j] = _EXACT
            else:
                group_of[b, h, j] = rank[v]
        for v in range(d_in):
            counts[v] = 0
        gi = group_ptr[task]
        base = row_base[task]
        at = weight_base[task]
        distinct = 0
        for t in range(longest):
            k = draws[task, t]
            if counts[k] == 0:  # rows in order of first draw: each group's rows are a prefix
                rows[base + distinct] = k
                distinct += 1
            counts[k] += 1
            if not present[t + 1]:
                continue
            e = np.float64(t + 1)  # the group's budget: 1 / e folded into the weights
            width[gi] = distinct
            weight_ptr[gi] = at
            for m in range(distinct):
                kk = rows[base + m]
                weights[at + m] = counts[kk] / (p_weight[h, kk] * e)
            at += distinct
            gi += 1


@njit(nogil=True, cache=True)
def _apply(x, wh, bias, group_of, group_ptr, row_base, rows, width, weight_ptr, weights, block,
           blas_min, out, t0, t1):
    """Tasks = (batch row, block of tokens): every head and group of the block."""
    _, n, d_in = x.shape
    heads = group_of.shape[1]
    dh = out.shape[3]
    n_blocks = (n + block - 1) // block
    max_groups = 0
    for i in range(group_ptr.shape[0] - 1):
        max_groups = max(max_groups, group_ptr[i + 1] - group_ptr[i])
    buf = np.empty(block * d_in, x.dtype)
    wbuf = np.empty(d_in * dh, x.dtype)
    acc_buf = np.empty(block * dh, x.dtype)
    starts = np.empty(max_groups + 3, np.int64)
    fill = np.empty(max_groups + 3, np.int64)
    order = np.empty(block, np.int64)
    flat_out = out.reshape(-1)
    for task in range(t0, t1):
        b = task // n_blocks
        j0 = (task % n_blocks) * block
        j1 = min(n, j0 + block)
        xb = x[b]
        for h in range(heads):
            bh = b * heads + h
            g0 = group_ptr[bh]
            n_g = group_ptr[bh + 1] - g0
            base = row_base[bh]
            col0 = h * dh
            w_h = wh[h]
            # Counting sort of the block's tokens by bucket: 0 masked, 1 exact, 2 + g group g.
            for s in range(n_g + 3):
                starts[s] = 0
            for j in range(j0, j1):
                starts[group_of[b, h, j] + 3] += 1
            for s in range(n_g + 2):
                starts[s + 1] += starts[s]
            for s in range(n_g + 2):
                fill[s] = starts[s]
            for j in range(j0, j1):
                s = group_of[b, h, j] + 2
                order[fill[s]] = j
                fill[s] += 1
            for i in range(starts[0], starts[1]):  # masked keys: the bias only
                for c in range(dh):
                    out[b, h, order[i], c] = bias[col0 + c]
            lo = starts[1]
            tokens = starts[2] - lo
            if tokens > 0:  # exact keys (r >= d_in): their rows of x times the head's W
                first = order[lo]
                if order[lo + tokens - 1] - first == tokens - 1:  # a run: x as it is
                    _product_out(xb[first : first + tokens], w_h, order, lo, tokens, bias, col0,
                                 out, flat_out, b, h)
                else:
                    rows_x = buf[: tokens * d_in].reshape((tokens, d_in))
                    for i in range(tokens):
                        xj = xb[order[lo + i]]
                        xi = rows_x[i]
                        for c in range(d_in):
                            xi[c] = xj[c]
                    _product_out(rows_x, w_h, order, lo, tokens, bias, col0, out, flat_out, b, h)
            for s in range(2, n_g + 2):
                lo = starts[s]
                tokens = starts[s + 1] - lo
                if tokens == 0:
                    continue
                wd = width[g0 + s - 2]
                w0 = weight_ptr[g0 + s - 2]
                if tokens * wd * dh >= blas_min:
                    # Gather the tokens' drawn columns of x into a contiguous block and the
                    # drawn rows of W, scaled by their weights; one BLAS product.
                    a = buf[: tokens * wd].reshape((tokens, wd))
                    idx = rows[base : base + wd]
                    for i in range(0, tokens - 3, 4):  # four tokens per loaded index
                        x0 = xb[order[lo + i]]
                        x1 = xb[order[lo + i + 1]]
                        x2 = xb[order[lo + i + 2]]
                        x3 = xb[order[lo + i + 3]]
                        a0 = a[i]
                        a1 = a[i + 1]
                        a2 = a[i + 2]
                        a3 = a[i + 3]
                        for m in range(wd):
                            k = idx[m]
                            a0[m] = x0[k]
                            a1[m] = x1[k]
                            a2[m] = x2[k]
                            a3[m] = x3[k]
                    for i in range(tokens - tokens % 4, tokens):
                        xj = xb[order[lo + i]]
                        for m in range(wd):
                            a[i, m] = xj[idx[m]]
                    wmat = wbuf[: wd * dh].reshape((wd, dh))
                    for m in range(wd):
                        k = rows[base + m]
                        scale = weights[w0 + m]
                        for c in range(dh):
                            wmat[m, c] = w_h[k, c] * scale
                    _product_out(a, wmat, order, lo, tokens, bias, col0, out, flat_out, b, h)
                    continue
                # Small groups (a BLAS call costs microseconds): each drawn row of W is
                # loaded once for all the group's tokens; four rows per update of the
                # accumulators (each update waits on the previous one through memory).
                acc = acc_buf[: tokens * dh].reshape((tokens, dh))
                for i in range(tokens):
                    for c in range(dh):
                        acc[i, c] = 0
                top = wd - wd % 4
                for m in range(0, top, 4):
                    k0 = rows[base + m]
                    k1 = rows[base + m + 1]
                    k2 = rows[base + m + 2]
                    k3 = rows[base + m + 3]
                    s0 = weights[w0 + m]
                    s1 = weights[w0 + m + 1]
                    s2 = weights[w0 + m + 2]
                    s3 = weights[w0 + m + 3]
                    r0 = w_h[k0]
                    r1 = w_h[k1]
                    r2 = w_h[k2]
                    r3 = w_h[k3]
                    for i in range(tokens):
                        xj = xb[order[lo + i]]
                        c0 = xj[k0] * s0
                        c1 = xj[k1] * s1
                        c2 = xj[k2] * s2
                        c3 = xj[k3] * s3
                        ai = acc[i]
                        for c in range(dh):
                            ai[c] += (c0 * r0[c] + c1 * r1[c]) + (c2 * r2[c] + c3 * r3[c])
                for m in range(top, wd):
                    k = rows[base + m]
                    scale = weights[w0 + m]
                    wrow = w_h[k]
                    for i in range(tokens):
                        coef = xb[order[lo + i], k] * scale
                        ai = acc[i]
                        for c in range(dh):
                            ai[c] += coef * wrow[c]
                for i in range(tokens):
                    j = order[lo + i]
                    for c in range(dh):
                        out[b, h, j, c] = acc[i, c] + bias[col0 + c]


@njit(nogil=True, cache=True, inline="always")  # (a call per group cost 15-25 % at 20 %)
def _product_out(a, wmat, order, lo, tokens, bias, col0, out, flat_out, b, h):
    """``out[b, h, order[lo + i]] = (a @ wmat)[i] + bias`` for the ``tokens`` rows of ``a``
    (``flat_out``: ``out.reshape(-1)``)."""
    n = out.shape[2]
    dh = out.shape[3]
    first = order[lo]
    if order[lo + tokens - 1] - first == tokens - 1:
        # The tokens are a run (uniform budgets: the whole block): the product goes
        # straight into out, the bias added in place.
        at = ((b * out.shape[1] + h) * n + first) * dh
        res = flat_out[at : at + tokens * dh].reshape((tokens, dh))
        np.dot(a, wmat, res)
        for i in range(tokens):
            for c in range(dh):
                res[i, c] += bias[col0 + c]
        return
    prod = np.dot(a, wmat)
    for i in range(tokens):
        j = order[lo + i]
        for c in range(dh):
            out[b, h, j, c] = prod[i, c] + bias[col0 + c]


@njit(nogil=True, cache=True, inline="always")
def _sort_tokens(g_of, n_g, starts, fill, order):
    """Counting sort of one head's tokens by bucket (0 masked, 1 exact, 2 + g group g, so in
    ascending budget): ``order[starts[s]:starts[s + 1]]`` are bucket ``s``'s tokens."""
    for s in range(n_g + 3):
        starts[s] = 0
    for j in range(g_of.shape[0]):
        starts[g_of[j] + 3] += 1
    for s in range(n_g + 2):
        starts[s + 1] += starts[s]
    for s in range(n_g + 2):
        fill[s] = starts[s]
    for j in range(g_of.shape[0]):
        s = g_of[j] + 2
        order[fill[s]] = j
        fill[s] += 1


@njit(nogil=True, cache=True)
def _plan_head(r, threshold_h, alias_h, shift, k0, k1, stream, p_h, draws, present, rank, counts,
               group_of, rows, width, weight_ptr, weights):
    """The plan of one row ``r`` of budgets (what :func:`_count_plan` and :func:`_fill_plan`
    give one (batch row, head), in local arrays): ``group_of`` as :class:`SharedPlan`'s,
    the distinct drawn rows in order of first draw, each group's width and weights
    ``count / (p e)`` at ``weights[weight_ptr[g]:]`` (``weights`` grown when too short).

    Returns
    -------
    (n_groups, weights)
    """
    d_in = threshold_h.shape[0]
    longest = _mark_budgets(r, present)
    _draw_sequence(stream, longest, threshold_h, alias_h, shift, k0, k1, draws)
    g = 0
    for v in range(1, longest + 1):  # groups in ascending budget
        if present[v]:
            rank[v] = g
            g += 1
    n_g = g
    for j in range(r.shape[0]):
        v = r[j]
        if v <= 0:
            group_of[j] = _MASKED
        elif v >= d_in:
            group_of[j] = _EXACT
        else:
            group_of[j] = rank[v]
    for v in range(d_in):
        counts[v] = 0
    total = 0  # merged rows over all groups, to size the weights
    distinct = 0
    for t in range(longest):
        k = draws[t]
        if counts[k] == 0:
            rows[distinct] = k
            distinct += 1
        counts[k] += 1
        if present[t + 1]:
            total += distinct
    if weights.shape[0] < total:
        weights = np.empty(2 * total, weights.dtype)
    for v in range(d_in):
        counts[v] = 0
    gi = 0
    at = 0
    distinct = 0
    for t in range(longest):
        k = draws[t]
        if counts[k] == 0:
            distinct += 1
        counts[k] += 1
        if not present[t + 1]:
            continue
        e = np.float64(t + 1)
        width[gi] = distinct
        weight_ptr[gi] = at
        for m in range(distinct):
            kk = rows[m]
            weights[at + m] = counts[kk] / (p_h[kk] * e)
        at += distinct
        gi += 1
    return n_g, weights


@njit(nogil=True, cache=True)
def _project_batch(x, wh, bias, budgets, threshold, alias, shift, k0, k1, base, p_weight, piece,
                   out, t0, t1):
    """``share="batch"``: tasks = heads, each plans (:func:`_plan_head`, stream ``base + h``)
    and applies its own draws; ``x`` is ``[1, T, d_in]``, the batch end to end, and token
    ``t`` goes to ``out[t // N, h, t % N]``.

    A head's groups all use prefixes of its one list of distinct drawn rows, so the weights
    ``count / (p e)`` go on the side of ``x``: ``a[j, m] = x[j, rows[m]] w_g[m]`` (0 past the
    group's width) and every product is ``a @ W_h[rows]`` with the same gathered rows of W.
    The sampled tokens, sorted by budget, are taken ``piece`` at a time across group
    boundaries: one BLAS product of ``piece`` rows over the widest width in the piece (the
    zeros of the narrower groups are multiplied too; :func:`reduced_macs` counts them).
    """
    t_all = x.shape[1]
    d_in = x.shape[2]
    n = out.shape[2]
    dh = out.shape[3]
    xb = x[0]
    draws = np.empty(d_in, np.int64)
    present = np.zeros(d_in + 1, np.bool_)
    rank = np.zeros(d_in + 1, np.int64)
    counts = np.zeros(d_in, np.int64)
    group_of = np.empty(t_all, np.int64)
    idx = np.empty(d_in, np.int64)
    width = np.empty(d_in + 1, np.int64)
    weight_ptr = np.empty(d_in + 1, np.int64)
    weights = np.empty(4 * d_in, np.float64)
    wts = np.empty(weights.shape[0], x.dtype)
    order = np.empty(t_all, np.int64)
    starts = np.empty(d_in + 3, np.int64)
    fill = np.empty(d_in + 3, np.int64)
    abuf = np.empty(piece * d_in, x.dtype)
    pbuf = np.empty(piece * dh, x.dtype)
    wbuf = np.empty(d_in * dh, x.dtype)
    for h in range(t0, t1):
        n_g, weights = _plan_head(budgets[0, h], threshold[h], alias[h], shift, k0, k1,
                                  base + np.uint64(h), p_weight[h], draws, present, rank, counts,
                                  group_of, idx, width, weight_ptr, weights)
        if wts.shape[0] < weights.shape[0]:
            wts = np.empty(weights.shape[0], x.dtype)
        used = weight_ptr[n_g - 1] + width[n_g - 1] if n_g else 0
        for m in range(used):  # (cast once, as the row mode's plan.weights.astype)
            wts[m] = weights[m]
        b_h = bias[h * dh : (h + 1) * dh]
        w_h = wh[h]
        _sort_tokens(group_of, n_g, starts, fill, order)
        for i in range(starts[0], starts[1]):  # masked keys: the bias only
            j = order[i]
            row = out[j // n, h, j % n]  # (a row view: the copy vectorises)
            for c in range(dh):
                row[c] = b_h[c]
        for lo in range(starts[1], starts[2], piece):  # exact keys: whole rows of x
            cnt = min(piece, starts[2] - lo)
            a = abuf[: cnt * d_in].reshape((cnt, d_in))
            for i in range(cnt):
                xj = xb[order[lo + i]]
                ai = a[i]
                for c in range(d_in):
                    ai[c] = xj[c]
            _scatter(a, w_h, order, lo, cnt, pbuf, b_h, out, h)
        if n_g == 0:
            continue
        top = width[n_g - 1]  # every distinct drawn row of the head, in draw order
        wrows = wbuf[: top * dh].reshape((top, dh))
        for m in range(top):
            src = w_h[idx[m]]
            dst = wrows[m]
            for c in range(dh):
                dst[c] = src[c]
        g = 0  # the group of the token at position lo
        for lo in range(starts[2], starts[n_g + 2], piece):
            cnt = min(piece, starts[n_g + 2] - lo)
            while starts[g + 3] <= lo:
                g += 1
            last = g
            while starts[last + 3] < lo + cnt:
                last += 1
            wmax = width[last]
            a = abuf[: cnt * wmax].reshape((cnt, wmax))
            for gi in range(g, last + 1):  # the piece's tokens of group gi: rows i0 .. i1 - 1
                i0 = max(starts[gi + 2], lo) - lo
                i1 = min(starts[gi + 3], lo + cnt) - lo
                wd = width[gi]
                wg = wts[weight_ptr[gi] : weight_ptr[gi] + wd]
                for i in range(i0, i1 - 3, 4):  # four tokens per loaded index and weight
                    x0 = xb[order[lo + i]]
                    x1 = xb[order[lo + i + 1]]
                    x2 = xb[order[lo + i + 2]]
                    x3 = xb[order[lo + i + 3]]
                    a0 = a[i]
                    a1 = a[i + 1]
                    a2 = a[i + 2]
                    a3 = a[i + 3]
                    for m in range(wd):
                        k = idx[m]
                        sc = wg[m]
                        a0[m] = x0[k] * sc
                        a1[m] = x1[k] * sc
                        a2[m] = x2[k] * sc
                        a3[m] = x3[k] * sc
                for i in range(i1 - (i1 - i0) % 4, i1):
                    xj = xb[order[lo + i]]
                    ai = a[i]
                    for m in range(wd):
                        ai[m] = xj[idx[m]] * wg[m]
                for i in range(i0, i1):  # zeros past the group's width
                    ai = a[i]
                    for m in range(wd, wmax):
                        ai[m] = 0
            _scatter(a, wrows[:wmax], order, lo, cnt, pbuf, b_h, out, h)


@njit(nogil=True, cache=True, inline="always")
def _scatter(a, wmat, order, lo, cnt, pbuf, b_h, out, h):
    """``out[t // N, h, t % N] = (a @ wmat)[i] + b_h`` for ``t = order[lo + i]``."""
    n = out.shape[2]
    dh = out.shape[3]
    prod = pbuf[: cnt * dh].reshape((cnt, dh))
    np.dot(a, wmat, prod)
    for i in range(cnt):
        j = order[lo + i]
        row = out[j // n, h, j % n]
        p = prod[i]
        for c in range(dh):
            row[c] = p[c] + b_h[c]


@njit(nogil=True, cache=True)
def _batch_macs(group_of, group_ptr, width, nonzero, piece, macs, merges, t0, t1):
    """Per head of ``share="batch"`` (the plan of :func:`_project_batch`): the products'
    multiply-adds per column (each piece's tokens times its widest width) and the weight
    multiplies ``x[j, rows[m]] w_g[m]``, over the pieces' tokens whose row of ``x`` is not zero."""
    t_all = group_of.shape[2]
    max_groups = 0
    for i in range(group_ptr.shape[0] - 1):
        max_groups = max(max_groups, group_ptr[i + 1] - group_ptr[i])
    order = np.empty(t_all, np.int64)
    starts = np.empty(max_groups + 3, np.int64)
    fill = np.empty(max_groups + 3, np.int64)
    for h in range(t0, t1):
        g0 = group_ptr[h]
        n_g = group_ptr[h + 1] - g0
        _sort_tokens(group_of[0, h], n_g, starts, fill, order)
        total = 0
        merged = 0
        g = 0
        for lo in range(starts[2], starts[n_g + 2], piece):
            cnt = min(piece, starts[n_g + 2] - lo)
            last = g
            while starts[last + 3] < lo + cnt:
                last += 1
            wmax = width[g0 + last]
            gi = g
            for i in range(cnt):
                while starts[gi + 3] <= lo + i:
                    gi += 1
                if nonzero[order[lo + i]]:
                    total += wmax
                    merged += width[g0 + gi]
            g = last
        macs[h] = total
        merges[h] = merged


@njit(nogil=True, cache=True)
def _macs_tasks(budgets, nonzero, threshold, alias, shift, k0, k1, base, macs, merges, t0, t1):
    """Per (batch row, head): the reduced GEMMs' multiply-adds per column (tokens of a group
    times its distinct rows, summed) and the merged rows, over tokens with a nonzero row."""
    _, heads, n = budgets.shape
    d_in = threshold.shape[1]
    tokens = np.zeros(d_in, np.int64)
    counts = np.zeros(d_in, np.int64)
    draws = np.empty(d_in, np.int64)
    for task in range(t0, t1):
        b = task // heads
        h = task % heads
        for v in range(d_in):
            tokens[v] = 0
            counts[v] = 0
        longest = 0
        for j in range(n):
            v = budgets[b, h, j]
            if 0 < v < d_in and nonzero[b, j]:
                tokens[v] += 1
                longest = max(longest, v)
        _draw_sequence(base + np.uint64(task), longest, threshold[h], alias[h], shift, k0, k1, draws)
        distinct = 0
        total = 0
        merged = 0
        for t in range(longest):
            k = draws[t]
            if counts[k] == 0:
                distinct += 1
            counts[k] += 1
            if t + 1 < d_in and tokens[t + 1] > 0:
                total += tokens[t + 1] * distinct
                merged += distinct
        macs[task] = total
        merges[task] = merged


def reduced_macs(budgets, d_in, dh, seed, tables, x_nonzero, share="row"):
    """:func:`mcattn.mca.shared.reduced_macs` compiled (same arguments, same ``(macs,
    merge_muls)``): what ``mca.attention(..., return_info=True)`` reports. ``share="batch"``
    counts one draw sequence per head over the whole batch (:func:`value_projection`)."""
    base = _stream_base(share)
    if share == "batch":
        nonzero, one = batch_as_one_row(np.asarray(x_nonzero)[..., None], budgets)
        if one.size == 0:
            return 0, 0
        plan = make_plan(one, seed, tables, base)
        heads = one.shape[1]
        macs = np.zeros(heads, np.int64)
        merges = np.zeros(heads, np.int64)
        run_tasks(_batch_macs, heads, plan.group_of, plan.group_ptr, plan.width,
                  np.ascontiguousarray(nonzero[0, :, 0], dtype=np.bool_), int(BATCH_PIECE), macs,
                  merges, work=one.size, blas=False)
        # the weights multiply x's entries, once per token and row (not per column)
        return int(macs.sum()) * int(dh), int(merges.sum())
    budgets = np.ascontiguousarray(budgets, dtype=np.int64)
    batch, heads, n = budgets.shape
    if budgets.size == 0:
        return 0, 0
    k0, k1 = mrandom.seed_to_key(seed)
    macs = np.zeros(batch * heads, np.int64)
    merges = np.zeros(batch * heads, np.int64)
    run_tasks(_macs_tasks, batch * heads, budgets, np.ascontiguousarray(x_nonzero, dtype=np.bool_),
              tables.threshold, tables.alias, tables.shift, k0, k1, base, macs, merges,
              work=batch * heads * (n + 4 * d_in), blas=False)
    return int(macs.sum()) * int(dh), int(merges.sum()) * int(dh)


def token_block(n, groups_per_head):
    """Tokens per apply task: ``TOKENS_PER_GROUP`` times the mean number of groups per
    head, within ``[TOKEN_BLOCK, MAX_TOKEN_BLOCK]`` and at most ``n``.

    A block's tokens are split among the groups of each head, and a group's product is
    one GEMM over its tokens in the block: with many groups (varied real budgets) a larger
    block keeps those GEMMs from shrinking to a few rows (measured on real budgets, 8 x 512
    tokens: one block per sequence is 9-15 % faster than blocks of 128); with one group
    (uniform budgets) ``TOKEN_BLOCK`` tokens keep the block of ``x`` in cache. The block
    changes no result: a token's product is the same whatever block it is in.
    """
    want = int(TOKENS_PER_GROUP) * max(1.0, float(groups_per_head))
    return int(max(1, min(n, max(int(TOKEN_BLOCK), min(int(MAX_TOKEN_BLOCK), round(want))))))


class SharedPlan(NamedTuple):
    """The groups of a shared-draw projection (host arrays, from :func:`make_plan`).

    For (batch row, head) ``bh = b * H + h``, its groups are ``group_ptr[bh] <= g <
    group_ptr[bh + 1]`` in ascending budget; group ``g`` uses the first ``width[g]`` of
    the head's distinct drawn rows ``rows[row_base[bh]:]`` with weights
    ``weights[weight_ptr[g]:][:width[g]]`` (``count / (p e)``, the ``1 / r_j`` folded
    in), so token ``j`` of the group gets ``b + sum_m x[j, rows[m]] weights[m] W_h[rows[m]]``.

    Attributes
    ----------
    group_of : int64, ``[B, H, N]``
        Each token's group relative to its (batch row, head): ``-2`` masked (the bias),
        ``-1`` exact (``r >= d_in``), else ``g - group_ptr[bh]``.
    group_ptr : int64, ``[B * H + 1]``
    row_base : int64, ``[B * H + 1]``
    rows : int64, ``[row_base[-1]]``
    width : int64, ``[group_ptr[-1]]``
    weight_ptr : int64, ``[group_ptr[-1]]``
    weights : float64, ``[sum of width]``
    """

    group_of: np.ndarray
    group_ptr: np.ndarray
    row_base: np.ndarray
    rows: np.ndarray
    width: np.ndarray
    weight_ptr: np.ndarray
    weights: np.ndarray


def _stream_base(share):
    """The first random stream of a shared-draw projection (``share`` checked)."""
    check_share(share, True)
    return np.uint64(SHARED_BATCH_STREAM_BASE if share == "batch" else SHARED_STREAM_BASE)


def make_plan(budgets, seed, tables, stream_base=SHARED_STREAM_BASE):
    """The shared-draw plan of host budgets ``[B, H, N]`` (compiled, all heads at once).

    Parameters
    ----------
    budgets : numpy.ndarray of int, shape ``[B, H, N]``
        Used as given (rounded or not).
    seed : int
    tables : WeightTables
        Of the weight (its alias tables and probabilities).
    stream_base : int, default ``SHARED_STREAM_BASE``
        (Batch row, head) ``b * H + h`` draws from stream ``stream_base + b * H + h``
        (``SHARED_BATCH_STREAM_BASE`` for the one row of ``share="batch"``).

    Returns
    -------
    SharedPlan
    """
    budgets = np.ascontiguousarray(budgets, dtype=np.int64)
    batch, heads, n = budgets.shape
    d_in = tables.threshold.shape[1]
    k0, k1 = mrandom.seed_to_key(seed)
    t = tables
    tasks = batch * heads
    n_groups = np.empty(tasks, np.int64)
    n_distinct = np.empty(tasks, np.int64)
    n_weights = np.empty(tasks, np.int64)
    draws = np.empty((tasks, d_in), np.int64)
    # The plan is small next to the products (0.1 ms at N = 4096): on the calling thread
    # unless it is large (run_tasks' work=).
    run_tasks(_count_plan, tasks, budgets, t.threshold, t.alias, t.shift, k0, k1,
              np.uint64(stream_base), draws, n_groups, n_distinct, n_weights, chunks_per_thread=4,
              work=tasks * (n + 4 * d_in), blas=False)
    group_ptr, row_base, weight_base = (np.concatenate(([0], np.cumsum(a))) for a in
                                        (n_groups, n_distinct, n_weights))
    rows = np.empty(int(row_base[-1]), np.int64)
    width = np.empty(int(group_ptr[-1]), np.int64)
    weight_ptr = np.empty(int(group_ptr[-1]), np.int64)
    weights = np.empty(int(weight_base[-1]), np.float64)
    group_of = np.empty(budgets.shape, np.int64)
    run_tasks(_fill_plan, tasks, budgets, draws, t.p_weight, group_ptr, row_base, weight_base,
              rows, width, weight_ptr, weights, group_of, chunks_per_thread=4,
              work=tasks * (n + d_in) + int(weight_base[-1]), blas=False)
    return SharedPlan(group_of, group_ptr, row_base, rows, width, weight_ptr, weights)


def value_projection(x, w, bias, num_heads, budgets, seed, tables=None, share="row"):
    """Shared-draw value projection on the host (NumPy arrays; rounded budgets are used as given).

    Parameters
    ----------
    x : numpy.ndarray, shape ``[B, N, d_in]``
    w : numpy.ndarray, shape ``[d_in, H * dh]``
    bias : numpy.ndarray, shape ``[H * dh]``, or None
    num_heads : int
    budgets : numpy.ndarray of int, shape ``[B, H, N]``
    seed : int
    tables : WeightTables, optional
    share : {"row", "batch"}
        ``"batch"``: one draw sequence per head serves the tokens of every batch row. The
        plan sees the batch's sequences end to end as one row of ``B N`` tokens
        (:func:`mcattn.mca.naive.batch_as_one_row`) and :func:`_project_batch` multiplies a
        head's sampled tokens of all sequences by pieces of ``BATCH_PIECE``, across groups
        (one task per head); masked (padding) tokens get the bias and no product.

    Returns
    -------
    numpy.ndarray, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    base = _stream_base(share)
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    out = np.empty((batch, num_heads, n, dh), dtype=x.dtype)
    if out.size == 0:
        return out
    tables = weight_tables(w, num_heads) if tables is None else tables
    x = np.ascontiguousarray(x)
    bias_row = (np.zeros(num_heads * dh, x.dtype) if bias is None
                else np.ascontiguousarray(bias, dtype=x.dtype))
    if share == "batch":  # planned inside the tasks, one per head
        x, budgets = batch_as_one_row(x, budgets)
        k0, k1 = mrandom.seed_to_key(seed)
        t = tables
        run_tasks(_project_batch, num_heads, x, t.wh_as(x.dtype), bias_row, budgets, t.threshold,
                  t.alias, t.shift, k0, k1, base, t.p_weight, int(BATCH_PIECE), out,
                  chunks_per_thread=BATCH_CHUNKS)
        return out
    plan = make_plan(budgets, seed, tables, base)
    block = token_block(n, plan.width.size / (batch * num_heads))  # mean groups per head
    n_blocks = -(-n // block)
    run_tasks(_apply, batch * n_blocks, x, tables.wh_as(x.dtype), bias_row, plan.group_of,
              plan.group_ptr, plan.row_base, plan.rows, plan.width, plan.weight_ptr,
              plan.weights.astype(x.dtype), block, int(BLAS_MIN_MACS), out, chunks_per_thread=4)
    return out

"""Monte-Carlo value projection on the CPU (Numba), same draws as ``naive.py``.

Independent draws: one task per (batch row, head, token), looping over the token's
samples: 64 bits from the shared Philox generator (one call per two draws), an index by
the alias method (weight sampling, O(1), integer arithmetic) or by inverse-CDF binary
search (optimal sampling), ``d_head`` multiply-adds accumulated in float64.
``shared_draws=True``: sequences of at least ``config.MCA_SHARED_GEMM_MIN_TOKENS`` tokens
go to :mod:`mcattn.mca.shared_cpu` (compiled reduced GEMMs); shorter ones run one task per
(batch row, head) that draws one index sequence and, with the tokens sorted by budget,
serves the prefix of tokens whose budget exceeds each draw ``t`` (each drawn weight row is
loaded once for all of them).
Tokens whose budget reaches ``d_in`` are computed by one BLAS product per head; weights
are read in the input precision. Tasks run batch row fastest, so that any contiguous
range of them mixes long and short sequences and the threads stay balanced.
"""

import numpy as np

from .. import config
from .. import random as mrandom
from .._cpu import run_tasks
from .._jit import njit
from .naive import SHARED_STREAM_BASE, check_share
from .shared_cpu import value_projection as shared_projection
from .tables import WeightTables, alias_tables, weight_tables
from .tables import alias_draw as _alias

__all__ = ["value_projection", "WeightTables", "weight_tables", "alias_tables"]

_sample_bits = mrandom.sample_bits_cpu
_philox = mrandom.philox4x32_cpu
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SHIFT11 = np.uint64(11)
_TWO_M53 = 2.0**-53

@njit(nogil=True, cache=True, inline="always")
def _search(cdf, u):
    """Smallest k with u < cdf[k] (cdf non-decreasing, cdf[-1] = 1 > u)."""
    lo = 0
    hi = cdf.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if u < cdf[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit(nogil=True, cache=True)
def _independent_tasks(x, nonzero, w, bias, has_bias, budgets, threshold, alias, shift, p_weight,
                       row_norms, k0, k1, optimal, out, t0, t1):
    n_batch, n, d_in = x.shape
    heads = budgets.shape[1]
    dh = out.shape[3]
    acc = np.empty(dh, np.float64)
    cdf_tok = np.empty(d_in, np.float64)
    p_tok = np.empty(d_in, np.float64)
    for task in range(t0, t1):
        # Batch row fastest, so that every chunk of tasks mixes long and short sequences
        # (balance); the random stream is the token's own number whatever the order.
        b = task % n_batch
        h = (task // n_batch) % heads
        j = task // (n_batch * heads)
        stream = np.uint64((b * heads + h) * n + j)
        col0 = h * dh
        wh = w[h]
        r = budgets[b, h, j]
        for c in range(dh):
            acc[c] = 0.0
        if r >= d_in:  # exact: done by one BLAS product per head in value_projection
            continue
        if r > 0 and not nonzero[b, j]:  # a zero row is exact: the bias only
            pass
        elif r > 0 and not optimal:
            p = p_weight[h]
            thr = threshold[h]
            ali = alias[h]
            for pair in range((r + 1) // 2):
                # One Philox call gives draws 2 * pair and 2 * pair + 1 (= sample_bits).
                index = np.uint64(pair)
                w0, w1, w2, w3 = _philox(index & _MASK32, index >> _SHIFT32, stream & _MASK32,
                                         stream >> _SHIFT32, k0, k1)
                for half in range(min(2, r - 2 * pair)):
                    bits = (w0 << _SHIFT32) | w1 if half == 0 else (w2 << _SHIFT32) | w3
                    k = _alias(bits, thr, ali, shift, d_in)
                    coef = np.float64(x[b, j, k]) / p[k]
                    for c in range(dh):
                        acc[c] += coef * wh[k, c]
            for c in range(dh):
                acc[c] /= r
        elif r > 0:
            if optimal:  # p_j(k) proportional to |x_jk| ||W_k||
                total = 0.0
                for k in range(d_in):
                    p_tok[k] = abs(np.float64(x[b, j, k])) * row_norms[h, k]
                    total += p_tok[k]
                running = 0.0
                for k in range(d_in):
                    p_tok[k] /= total
                    running += p_tok[k]
                    cdf_tok[k] = running
                cdf_tok[d_in - 1] = 1.0
            for t in range(r):
                u = (_sample_bits(k0, k1, stream, np.uint64(t)) >> _SHIFT11) * _TWO_M53
                k = _search(cdf_tok, u)
                coef = np.float64(x[b, j, k]) / p_tok[k]
                for c in range(dh):
                    acc[c] += coef * wh[k, c]
            for c in range(dh):
                acc[c] /= r
        for c in range(dh):
            value = acc[c]
            if has_bias:
                value += bias[col0 + c]
            out[b, h, j, c] = value


def _exact_tokens(x, wh, bias, budgets, out):
    """Tokens with ``r >= d_in``: one BLAS product per head (in ``x``'s precision).

    On real attention most of the kept work is such tokens (the salient ones); a GEMM
    does it many times faster than a per-token loop.
    """
    d_in = x.shape[2]
    heads, _, dh = wh.shape
    for h in range(heads):
        b_idx, j_idx = np.nonzero(budgets[:, h, :] >= d_in)
        if b_idx.size == 0:
            continue
        rows = x[b_idx, j_idx] @ wh[h]
        if bias is not None:
            rows += bias[h * dh : (h + 1) * dh]
        out[b_idx, h, j_idx] = rows


@njit(nogil=True, cache=True)
def _shared_tasks(x, nonzero, w, bias, has_bias, budgets, threshold, alias, shift, p_weight, k0,
                  k1, out, t0, t1):
    n_batch, n, d_in = x.shape
    heads = budgets.shape[1]
    dh = out.shape[3]
    for task in range(t0, t1):
        # Batch row fastest: a contiguous range of tasks mixes long and short sequences,
        # so a few large chunks balance the threads without many small ones.
        b = task % n_batch
        h = task // n_batch
        col0 = h * dh
        wh = w[h]
        r = budgets[b, h]
        # Tokens computed exactly, tokens sampled, and the longest prefix needed.
        sampled = np.empty(n, np.int64)
        n_sampled = 0
        longest = 0
        for j in range(n):
            if r[j] >= d_in:  # exact: done by one BLAS product per head in value_projection
                continue
            if r[j] > 0 and nonzero[b, j]:
                sampled[n_sampled] = j
                n_sampled += 1
                longest = max(longest, r[j])
                continue
            for c in range(dh):  # masked key or zero row: the bias only
                out[b, h, j, c] = bias[col0 + c] if has_bias else 0.0
        if n_sampled == 0:
            continue
        # Tokens sorted by budget (largest first): draw t serves the tokens whose budget
        # exceeds t, a prefix of that order, and its weight row is loaded once for all.
        order = sampled[:n_sampled][np.argsort(-r[sampled[:n_sampled]], kind="mergesort")]
        acc = np.zeros((n_sampled, dh), np.float64)
        row = np.empty(dh, np.float64)
        active = n_sampled
        stream = np.uint64(SHARED_STREAM_BASE + b * heads + h)
        for t in range(longest):
            while active > 0 and r[order[active - 1]] <= t:
                active -= 1
            k = _alias(_sample_bits(k0, k1, stream, np.uint64(t)), threshold[h], alias[h], shift,
                       d_in)
            inv_p = 1.0 / p_weight[h, k]
            for c in range(dh):  # the drawn row, in float64, once for all tokens
                row[c] = np.float64(wh[k, c])
            for i in range(active):
                coef = np.float64(x[b, order[i], k]) * inv_p
                for c in range(dh):
                    acc[i, c] += coef * row[c]
        for i in range(n_sampled):
            j = order[i]
            for c in range(dh):
                out[b, h, j, c] = acc[i, c] / r[j] + (bias[col0 + c] if has_bias else 0.0)


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", shared_draws=False,
                     tables=None, share="row"):
    """Numba version of :func:`mcattn.mca.naive.value_projection` (same signature, same draws)."""
    check_share(share, shared_draws)
    if shared_draws and (share == "batch" or x.shape[1] >= int(config.MCA_SHARED_GEMM_MIN_TOKENS)):
        # Reduced GEMMs over the distinct drawn rows (mcattn.mca.shared_cpu). Very short
        # sequences stay in the per-draw kernel below, where planning the groups costs
        # more than the draws themselves (share="batch": the whole batch is one row).
        return shared_projection(x, w, bias, num_heads, budgets, seed, tables, share)
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    out = np.empty((batch, num_heads, n, dh), dtype=x.dtype)
    if out.size == 0:
        return out
    tables = weight_tables(w, num_heads) if tables is None else tables
    has_bias = bias is not None
    bias64 = np.ascontiguousarray(bias, dtype=np.float64) if has_bias else np.zeros(1)
    budgets = np.ascontiguousarray(budgets, dtype=np.int64)
    k0, k1 = mrandom.seed_to_key(seed)
    x = np.ascontiguousarray(x)
    _exact_tokens(x, tables.wh_as(x.dtype), bias if has_bias else None, budgets, out)
    t = tables
    # Weights in the input precision (half the cache traffic for float32); sums in float64.
    wh = t.wh_as(x.dtype)
    nonzero = x.any(axis=-1)  # [B, N]: a zero input row is exact (bias only)
    if shared_draws:
        run_tasks(_shared_tasks, batch * num_heads, x, nonzero, wh, bias64, has_bias, budgets,
                  t.threshold, t.alias, t.shift, t.p_weight, k0, k1, out, chunks_per_thread=2)
        return out
    run_tasks(_independent_tasks, batch * num_heads * n, x, nonzero, wh, bias64, has_bias, budgets,
              t.threshold, t.alias, t.shift, t.p_weight, t.row_norms, k0, k1,
              sampling == "optimal", out)
    return out

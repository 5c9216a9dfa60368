"""Monte-Carlo attention, the readable definition (NumPy, float64 accumulation).

Kim & Ko, "MCA: Monte-Carlo Attention", AAAI 2022. Only the value projection is
approximated. For head ``h`` owning the output columns ``cols_h`` of ``W [d_in, H*dh]``:

    V_h[j]  = X[j] @ W[:, cols_h] + b_h                               (exact)
    V~_h[j] = b_h + (1/r_j) sum_t X[j, k_t] W[k_t, cols_h] / p(k_t),  k_t ~ p iid

with ``p = p_h`` (``sampling="weight"``: ``p_h(k) = ||W[k, cols_h]||^2 / ||W[:, cols_h]||_F^2``)
or ``p = p_hj`` (``sampling="optimal"``: ``p_hj(k)`` proportional to
``|X[j, k]| ||W[k, cols_h]||``). A token whose budget ``r_j >= d_in`` is computed exactly;
``r_j = 0`` (a masked key) gives ``b_h``; a token whose ``X[j]`` is zero is exact (``b_h``).

Randomness (identical on every backend): draw ``t`` of token ``j`` of head ``h`` in batch
row ``b`` is ``mcattn.random.sample_uniform(seed, stream, t)`` with
``stream = (b * H + h) * N + j``; with ``shared_draws=True`` all tokens of ``(b, h)`` use
the prefixes of one sequence, ``stream = SHARED_STREAM_BASE + b * H + h``. The index is
the smallest ``k`` with ``u < cdf[k]`` (``cdf`` the float64 cumulative probabilities,
its last entry set to exactly 1), so zero-probability rows are never drawn.
"""

import numpy as np

from .. import random as mrandom

__all__ = [
    "SHARED_STREAM_BASE",
    "weight_probs",
    "cumulative",
    "token_streams",
    "value_projection",
]

#: Streams of ``shared_draws=True`` start here (above every per-token stream).
SHARED_STREAM_BASE = 1 << 62


def weight_probs(w, num_heads):
    """Per-head weight-norm sampling probabilities ``[H, d_in]`` (float64).

    Parameters
    ----------
    w : numpy.ndarray, shape ``[d_in, H * dh]``
    num_heads : int

    Returns
    -------
    numpy.ndarray, shape ``[H, d_in]``
        ``||W[k, cols_h]||^2 / ||W[:, cols_h]||_F^2``; a head whose weight block is zero
        gets uniform probabilities (its projection is exactly the bias either way).
    """
    d_in, width = w.shape
    dh = width // num_heads
    sq = (np.asarray(w, dtype=np.float64).reshape(d_in, num_heads, dh) ** 2).sum(-1).T
    total = sq.sum(-1, keepdims=True)
    return np.where(total > 0, sq / np.where(total > 0, total, 1.0), 1.0 / d_in)


def cumulative(p):
    """Cumulative probabilities along the last axis, last entry exactly 1 (float64)."""
    cdf = np.cumsum(np.asarray(p, dtype=np.float64), axis=-1)
    cdf[..., -1] = 1.0
    return cdf


def token_streams(batch, heads, tokens):
    """Stream number of every (batch row, head, token): ``[B, H, N]`` uint64."""
    b = np.arange(batch, dtype=np.uint64)[:, None, None]
    h = np.arange(heads, dtype=np.uint64)[None, :, None]
    j = np.arange(tokens, dtype=np.uint64)[None, None, :]
    return (b * np.uint64(heads) + h) * np.uint64(tokens) + j


def _draws(seed, streams, counts):
    """Uniforms of draws 0..counts[i]-1 of each stream, concatenated, and their owner."""
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    t = np.arange(owner.size) - np.repeat(starts, counts)
    return mrandom.sample_uniform(seed, streams[owner], t), owner


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight",
                     shared_draws=False):
    """Importance-sampled value projection, split into heads.

    Parameters
    ----------
    x : numpy.ndarray, shape ``[B, N, d_in]``
    w : numpy.ndarray, shape ``[d_in, H * dh]``
    bias : numpy.ndarray, shape ``[H * dh]``, or None
    num_heads : int
    budgets : numpy.ndarray of int, shape ``[B, H, N]``
        Samples per token; ``>= d_in`` computes the token exactly, 0 gives the bias.
    seed : int
    sampling : {"weight", "optimal"}
    shared_draws : bool
        One draw sequence per (batch row, head); tokens use its prefixes.

    Returns
    -------
    numpy.ndarray, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    x64 = np.asarray(x, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64).reshape(d_in, num_heads, dh)
    out = np.zeros((batch, num_heads, n, dh))
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(num_heads, 1, dh)
    p_weight = weight_probs(w, num_heads)
    cdf_weight = cumulative(p_weight)
    row_norms = np.sqrt((w64**2).sum(-1)).T  # [H, d_in]
    streams = token_streams(batch, num_heads, n)
    for b in range(batch):
        for h in range(num_heads):
            r = np.asarray(budgets[b, h], dtype=np.int64)
            xb = x64[b]
            exact = (r >= d_in) | ((r > 0) & ~xb.any(-1))  # zero input: exact (= bias)
            out[b, h, exact] += xb[exact] @ w64[:, h]
            sampled = np.flatnonzero((r > 0) & ~exact)
            if sampled.size == 0:
                continue
            counts = r[sampled]
            if shared_draws:
                longest = int(counts.max())
                stream = np.uint64(SHARED_STREAM_BASE + b * num_heads + h)
                u = mrandom.sample_uniform(seed, stream, np.arange(longest))
                k = np.searchsorted(cdf_weight[h], u, side="right")
                terms = xb[sampled][:, k] / p_weight[h, k]  # [tokens, longest]
                terms *= np.arange(longest)[None, :] < counts[:, None]  # prefixes
                out[b, h, sampled] += (terms @ w64[k, h]) / counts[:, None]
                continue
            u, owner = _draws(seed, streams[b, h, sampled], counts)
            if sampling == "weight":
                k = np.searchsorted(cdf_weight[h], u, side="right")
                p_k = p_weight[h, k]
            else:  # per-token probabilities |x_jk| ||W_k||: one cdf per token
                k = np.empty(u.size, dtype=np.int64)
                p_k = np.empty(u.size)
                for i, j in enumerate(sampled):
                    mass = np.abs(xb[j]) * row_norms[h]
                    p_tok = mass / mass.sum()
                    mine = owner == i
                    k[mine] = np.searchsorted(cumulative(p_tok), u[mine], side="right")
                    p_k[mine] = p_tok[k[mine]]
            terms = (xb[sampled[owner], k] / p_k)[:, None] * w64[k, h]  # [draws, dh]
            sums = np.zeros((sampled.size, dh))
            np.add.at(sums, owner, terms)
            out[b, h, sampled] += sums / counts[:, None]
    return out.astype(x.dtype, copy=False)

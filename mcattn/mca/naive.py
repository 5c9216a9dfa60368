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
row ``b`` uses the 64 bits ``mcattn.random.sample_bits(seed, stream, t)`` with
``stream = (b * H + h) * N + j``; with ``shared_draws=True`` all tokens of ``(b, h)`` use
the prefixes of one sequence, ``stream = SHARED_STREAM_BASE + b * H + h``; with
``share="batch"`` too, all tokens of head ``h`` in every batch row use the prefixes of one
sequence, ``stream = SHARED_BATCH_STREAM_BASE + h`` (:func:`batch_as_one_row`: the batch's
sequences end to end are one row).

* Weight sampling turns the bits into an index with Walker's alias method (one table
  per head, built once per call on the host, O(1) per draw) in integer arithmetic only:
  ``m = bits >> s`` (``s = ceil(log2 d_in)``), ``c = m * d_in`` (< 2**64), column
  ``k = c >> (64 - s)``, kept if ``c mod 2**(64 - s) < threshold[k]``, else ``alias[k]``.
  Integers make the draw bit-identical on CPUs and GPUs (no rounding, no fused
  multiply-add can change it).
* Optimal sampling (a distribution per token) uses the inverse CDF: ``u`` = the top 53
  bits as a float in [0, 1), index = smallest ``k`` with ``u < cdf[k]`` (``cdf`` the
  float64 cumulative probabilities, last entry exactly 1), so zero-probability rows are
  never drawn.
"""

import numpy as np

from .. import config
from .. import random as mrandom
from .._validate import namespace_of

__all__ = [
    "SHARED_STREAM_BASE",
    "SHARED_BATCH_STREAM_BASE",
    "SHARES",
    "check_share",
    "batch_as_one_row",
    "batch_from_one_row",
    "WeightTables",
    "weight_tables",
    "weight_probs",
    "alias_tables",
    "alias_draw",
    "cumulative",
    "token_streams",
    "budgets_from_probs",
    "budgets_from_top",
    "round_budgets",
    "shared_budgets",
    "value_projection",
    "attention",
]

#: Streams of ``shared_draws=True`` start here (above every per-token stream).
SHARED_STREAM_BASE = 1 << 62
#: Streams of ``shared_draws=True, share="batch"`` (one per head): above every stream of
#: ``share="row"`` (``SHARED_STREAM_BASE + b * H + h``, fewer than ``2**61`` rows and heads).
SHARED_BATCH_STREAM_BASE = 3 << 61
#: What one shared draw sequence serves: the tokens of a (batch row, head), or of a head in
#: every batch row.
SHARES = ("row", "batch")


def check_share(share, shared_draws):
    """``share`` checked: one of :data:`SHARES`, ``"batch"`` only with ``shared_draws=True``."""
    if not isinstance(share, str) or share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}; got {share!r}")
    if share == "batch" and not shared_draws:
        raise ValueError("share='batch' needs shared_draws=True (it shares one draw sequence "
                         "per head across the batch)")


def batch_as_one_row(x, budgets):
    """The batch's sequences end to end, for ``share="batch"``: one row of ``B N`` tokens.

    Parameters
    ----------
    x : array, shape ``[B, N, d_in]``
    budgets : array of int, shape ``[B, H, N]``

    Returns
    -------
    x1 : array, shape ``[1, B N, d_in]``
        A view of ``x`` when it is C-contiguous; token ``b N + j`` is ``x[b, j]``.
    budgets1 : numpy.ndarray of int64, shape ``[1, H, B N]``
        C-contiguous, ``budgets1[0, h, b N + j] = budgets[b, h, j]``.
    """
    batch, heads, n = budgets.shape
    flat = np.ascontiguousarray(np.asarray(budgets, dtype=np.int64).transpose(1, 0, 2))
    return x.reshape(1, batch * n, x.shape[-1]), flat.reshape(1, heads, batch * n)


def batch_from_one_row(out, batch):
    """``[1, H, B N, dh]`` (a projection of :func:`batch_as_one_row`'s row) as ``[B, H, N, dh]``
    (a copy)."""
    _, heads, total, dh = out.shape
    n = total // batch if batch else 0
    return np.ascontiguousarray(out.reshape(heads, batch, n, dh).transpose(1, 0, 2, 3))


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
    p = np.where(total > 0, sq / np.where(total > 0, total, 1.0), 1.0 / d_in)
    return np.ascontiguousarray(p)  # kernels index it as C-contiguous [H, d_in]


def vose(scaled, threshold, alias, unit):
    """Vose's alias construction for one distribution (``scaled = p * d_in``, modified).

    Fills ``threshold`` (integer acceptance levels out of ``unit``) and ``alias``. Plain
    Python here; :mod:`mcattn.mca.cpu` compiles this same function for the fast paths.
    """
    n = scaled.shape[0]
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    n_small = 0
    n_large = 0
    for i in range(n):
        alias[i] = i
        if scaled[i] < 1.0:
            small[n_small] = i
            n_small += 1
        else:
            large[n_large] = i
            n_large += 1
    prob = np.ones(n)
    while n_small > 0 and n_large > 0:
        n_small -= 1
        lo = small[n_small]
        hi = large[n_large - 1]
        prob[lo] = scaled[lo]
        alias[lo] = hi
        scaled[hi] = (scaled[hi] + scaled[lo]) - 1.0
        if scaled[hi] < 1.0:  # hi moves to the small list
            n_large -= 1
            small[n_small] = hi
            n_small += 1
    for i in range(n):  # leftovers (rounding) keep their own column
        threshold[i] = min(unit, np.uint64(prob[i] * unit))
    return threshold, alias


def alias_tables(p, build=vose):
    """Walker alias tables for integer sampling from each row of ``p``.

    Parameters
    ----------
    p : numpy.ndarray, shape ``[H, d_in]``
        Probabilities (rows sum to 1).
    build : callable, default :func:`vose`
        Builds one row's tables (a compiled :func:`vose` gives the same tables, faster).

    Returns
    -------
    threshold : numpy.ndarray of uint64, shape ``[H, d_in]``
    alias : numpy.ndarray of int64, shape ``[H, d_in]``
    shift : int
        ``s = max(1, ceil(log2 d_in))``; see the module docstring for the draw.
    """
    p = np.asarray(p, dtype=np.float64)
    d_in = p.shape[-1]
    shift = max(1, (d_in - 1).bit_length())
    unit = np.uint64(1) << np.uint64(64 - shift)
    threshold = np.empty(p.shape, np.uint64)
    alias = np.empty(p.shape, np.int64)
    for h in range(p.shape[0]):
        build(p[h] * d_in, threshold[h], alias[h], unit)
    return threshold, alias, shift


def alias_draw(bits, threshold, alias, shift):
    """Indices drawn by the alias method from 64-bit words (vectorised over ``bits``)."""
    d_in = threshold.shape[-1]
    m = np.asarray(bits, dtype=np.uint64) >> np.uint64(shift)
    c = m * np.uint64(d_in)
    k = (c >> np.uint64(64 - shift)).astype(np.int64)
    rem = c & ((np.uint64(1) << np.uint64(64 - shift)) - np.uint64(1))
    return np.where(rem < threshold[k], k, alias[k])


class WeightTables:
    """Everything the kernels need from one value weight, computed once (float64).

    Attributes
    ----------
    wh : numpy.ndarray, shape ``[H, d_in, dh]``
        Head-major weight blocks (one head's block stays in cache).
    p_weight : numpy.ndarray, shape ``[H, d_in]``
        Weight-norm sampling probabilities.
    threshold, alias : numpy.ndarray, shape ``[H, d_in]``
        Alias tables of ``p_weight`` (uint64, int64); ``shift`` the draw's bit shift.
    row_norms : numpy.ndarray, shape ``[H, d_in]``
        ``||W[k, cols_h]||`` (optimal sampling).
    """

    #: Builds the alias tables (:class:`mcattn.mca.cpu.WeightTables` compiles it).
    _alias_tables = staticmethod(alias_tables)

    def __init__(self, w, num_heads):
        w = np.asarray(w, dtype=np.float64)
        d_in, width = w.shape
        dh = width // num_heads
        self.num_heads = num_heads
        self.wh = np.ascontiguousarray(w.reshape(d_in, num_heads, dh).transpose(1, 0, 2))
        self.p_weight = weight_probs(w, num_heads)
        self.threshold, self.alias, self.shift = self._alias_tables(self.p_weight)
        self.row_norms = np.sqrt((self.wh**2).sum(-1))
        self._cast = {np.dtype(np.float64): self.wh}

    @property
    def shape(self):
        """``(d_in, H * dh)``: the shape of the weight the tables were built from."""
        heads, d_in, dh = self.wh.shape
        return (d_in, heads * dh)

    def wh_as(self, dtype):
        """The head-major blocks in ``dtype`` (cached)."""
        dtype = np.dtype(dtype)
        if dtype not in self._cast:
            self._cast[dtype] = self.wh.astype(dtype)
        return self._cast[dtype]


def weight_tables(w, num_heads):
    """:class:`WeightTables` of a host weight ``[d_in, H * dh]`` (the fast paths use
    :func:`mcattn.mca.cpu.weight_tables`: the same tables, built by compiled code)."""
    return WeightTables(w, num_heads)


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


def budgets_from_probs(p, alpha, d_in, valid):
    """Budgets ``[..., H, Nk]`` from probabilities ``[..., H, Nq, Nk]`` and a valid-key mask."""
    xp = namespace_of(p)
    top = p.max(axis=-2).astype(np.float64) if p.shape[-2] else xp.zeros(p.shape[:-2] + p.shape[-1:])
    return budgets_from_top(top, alpha, d_in, valid)


def budgets_from_top(top, alpha, d_in, valid):
    """Budgets ``[..., H, Nk]`` from each key's largest probability ``top`` (float64,
    ``[..., H, Nk]``) and a valid-key mask."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a positive number; got {alpha!r}") from None
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number; got {alpha}")
    if int(d_in) < 1:
        raise ValueError(f"d_in must be >= 1; got {d_in}")
    xp = namespace_of(top)
    if valid is None:
        n = top.shape[-1]
    else:
        n = valid.sum(axis=-1, keepdims=True)
        top = xp.where(valid, top, 0.0)
    r = xp.ceil((n * top / alpha) ** 2)
    return xp.minimum(r, int(d_in)).astype(np.int64)


def round_budgets(budgets, d_in, slack):
    """Budgets rounded up so that each row has few distinct values (the reference of
    :func:`mcattn.mca.shared.round_budgets`, same arguments and result): greedy groups of
    the distinct sampled budgets of each row, from the smallest."""
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


def shared_budgets(r, d_in, on_gpu=False, rounding=round_budgets, share="row"):
    """The budgets the shared-draw projection uses: on the GPU, and on the CPU from
    ``config.MCA_SHARED_GEMM_MIN_TOKENS`` keys on (the reduced-GEMM path), rounded up to few
    distinct values per row (fewer, larger GEMMs; :func:`round_budgets`, or the compiled
    ``rounding`` the fast paths pass) and kept on the host, where the kernels build their
    plan; else ``r`` as it is. With ``share="batch"`` (host arrays ``[B, H, N]``) the row is
    a head's tokens in the whole batch (:func:`batch_as_one_row`): rounded across the batch,
    and the CPU always takes the reduced GEMMs."""
    if share == "batch":
        batch, heads, n = r.shape
        _, one = batch_as_one_row(np.empty((batch, n, 0)), np.asarray(r))
        one = rounding(one, d_in, float(config.MCA_SHARED_SLACK))
        return np.ascontiguousarray(one.reshape(heads, batch, n).transpose(1, 0, 2))
    if not on_gpu and r.shape[-1] < int(config.MCA_SHARED_GEMM_MIN_TOKENS):
        return r
    return rounding(np.asarray(r.get() if on_gpu else r), d_in, float(config.MCA_SHARED_SLACK))


def _draws(seed, streams, counts):
    """64-bit words of draws 0..counts[i]-1 of each stream, concatenated, and their owner."""
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    t = np.arange(owner.size) - np.repeat(starts, counts)
    return mrandom.sample_bits(seed, streams[owner], t), owner


def _to_uniform(bits):
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _independent_estimates(xb, tokens, counts, streams, seed, tables, h, row_norms, w_h, sampling):
    """``(1/r_j) sum_t x[j, k_t] W_h[k_t] / p(k_t)`` of ``tokens`` (independent draws), ``[n, dh]``."""
    bits, owner = _draws(seed, streams, counts)
    if sampling == "weight":
        k = alias_draw(bits, tables.threshold[h], tables.alias[h], tables.shift)
        p_k = tables.p_weight[h, k]
    else:  # per-token probabilities |x_jk| ||W_k||: one cdf per token
        u = _to_uniform(bits)
        k = np.empty(u.size, dtype=np.int64)
        p_k = np.empty(u.size)
        for i, j in enumerate(tokens):
            mass = np.abs(xb[j]) * row_norms
            p_tok = mass / mass.sum()
            mine = owner == i
            k[mine] = np.searchsorted(cumulative(p_tok), u[mine], side="right")
            p_k[mine] = p_tok[k[mine]]
    terms = (xb[tokens[owner], k] / p_k)[:, None] * w_h[k]  # [draws, dh]
    sums = np.zeros((tokens.size, w_h.shape[1]))
    np.add.at(sums, owner, terms)
    return sums / counts[:, None]


def value_projection(x, w, bias, num_heads, budgets, seed, sampling="weight",
                     shared_draws=False, tables=None, share="row"):
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
    tables : WeightTables, optional
        Precomputed :func:`weight_tables` of ``w`` (otherwise built here).
    share : {"row", "batch"}
        With ``shared_draws``: ``"batch"`` draws one sequence per head for the tokens of
        every batch row (stream ``SHARED_BATCH_STREAM_BASE + h``).

    Returns
    -------
    numpy.ndarray, shape ``[B, H, N, dh]``, dtype of ``x``
    """
    check_share(share, shared_draws)
    stream_base = SHARED_STREAM_BASE
    if share == "batch":  # one row of B N tokens, its own streams
        batch_rows = x.shape[0]
        x, budgets = batch_as_one_row(np.asarray(x), budgets)
        stream_base = SHARED_BATCH_STREAM_BASE
    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    x64 = np.asarray(x, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64).reshape(d_in, num_heads, dh)
    out = np.zeros((batch, num_heads, n, dh))
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(num_heads, 1, dh)
    tables = weight_tables(w, num_heads) if tables is None else tables
    p_weight, threshold, alias, shift = tables.p_weight, tables.threshold, tables.alias, tables.shift
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
                stream = np.uint64(stream_base + b * num_heads + h)
                bits = mrandom.sample_bits(seed, stream, np.arange(longest))
                k = alias_draw(bits, threshold[h], alias[h], shift)
                terms = xb[sampled][:, k] / p_weight[h, k]  # [tokens, longest]
                terms *= np.arange(longest)[None, :] < counts[:, None]  # prefixes
                out[b, h, sampled] += (terms @ w64[k, h]) / counts[:, None]
                continue
            # Tokens by chunks of about 2**16 draws: memory O(chunk * dh) whatever N.
            cuts = np.flatnonzero(np.diff(np.cumsum(counts) >> 16)) + 1
            for part in np.split(np.arange(sampled.size), cuts):
                tokens = sampled[part]
                out[b, h, tokens] += _independent_estimates(
                    xb, tokens, counts[part], streams[b, h, tokens], seed, tables, h, row_norms[h],
                    w64[:, h], sampling)
    if share == "batch":
        out = batch_from_one_row(out, batch_rows)
    return out.astype(x.dtype, copy=False)


def attention(inp, x, w, bias, num_heads, alpha, seed, sampling="weight", shared_draws=False,
              projection=value_projection, share="row"):
    """Monte-Carlo attention, the dense definition: the whole probability matrix.

    ``A = softmax(scale q k^T + mask)`` (:func:`mcattn.exact.naive.probs`), budgets
    ``r_j = min(d_in, ceil((n max_i A[i, j] / alpha)^2))``, the sampled values ``V~``
    (with ``shared_draws``, the budgets rounded up first as :func:`mcattn.mca.attention`
    does), and ``A @ V~``. :func:`mcattn.mca.attention` computes the same without holding
    ``A`` (:mod:`mcattn.mca.stream`).

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
        ``prepare_attention(q, k, k, ...)`` of ``q``, ``k`` ``[B, H, N, d]`` and the masks.
    x : numpy.ndarray, shape ``[B, Nk, d_in]``
    w, bias, num_heads, seed, sampling, shared_draws, share
        As :func:`value_projection`.
    alpha : float
    projection : callable, default :func:`value_projection`
        A value projection with its signature (e.g. :func:`mcattn.mca.cpu.value_projection`).

    Returns
    -------
    out : numpy.ndarray, shape ``[B * H, Nq, dv]``
    budgets : numpy.ndarray of int64, shape ``[B, H, Nk]``
    """
    from ..exact.naive import probs as attention_probs

    batch, nk, d_in = x.shape
    probs = attention_probs(inp)  # [B * H, Nq, Nk]
    valid = np.broadcast_to(inp.mask.visible_keys(inp.nq, nk), (batch * num_heads, nk))
    r = budgets_from_probs(probs, alpha, d_in, valid).reshape(batch, num_heads, nk)
    if shared_draws:
        r = shared_budgets(r, d_in, share=share)
    values = (projection(x, w, bias, num_heads, r, seed, sampling, shared_draws) if share == "row"
              else projection(x, w, bias, num_heads, r, seed, sampling, shared_draws, share=share))
    return np.matmul(probs, values.reshape(batch * num_heads, nk, -1)), r

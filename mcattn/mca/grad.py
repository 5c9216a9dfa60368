"""Monte-Carlo attention for training: exact-probability gradients and sampled value gradients.

The forward is :func:`mcattn.mca.attention`'s computation, ``out = A @ V~`` with exact
probabilities ``A = softmax(scale q k^T + mask)`` and the importance-sampled values of
head ``h``

    V~_h[j] = b_h + sum_i C_h[j, i] x[j, i] W[i, cols_h],
    C_h[j, i] = count_h(j, i) / (r_j p(i))

where ``count_h(j, i)`` is how often the inner index ``i`` was drawn among token ``j``'s
``r_j`` draws (the draws of :mod:`mcattn.mca.naive`, bit for bit: same streams, alias
tables, inverse CDF, shared prefixes), ``p`` the sampling probabilities (``p_h`` or, with
``sampling="optimal"``, ``p_hj``); ``C_h[j] = 1`` for a token computed exactly
(``r_j >= d_in``, or an all-zero input row) and 0 for a masked one (``r_j = 0``). The
forward keeps ``C`` (``[B, H, Nk, d_in]``, float64) as a residual, so the backward uses
the forward's draws whatever the adapter (JAX and TensorFlow recompute the forward with
the same ``seed``, hence the same ``C``).

Gradients, with ``dV~ = A^T dout`` per head:

* ``q``, ``k``: exact attention's backward with ``V~`` as the values
  (``dA = dout V~^T``, ``dS = A * (dA - rowsum(dA * A))``, ``dq = scale dS k``,
  ``dk = scale dS^T q``). Linear in ``V~``, hence an unbiased estimate of the dense
  gradients (those of exact attention with ``v = x W + b``).
* ``x``: ``dx[j, i] = sum_h C_h[j, i] (dV~_h[j] . W[i, cols_h])``, the sampled estimate of
  the dense ``dV W^T``;
* ``w_v``: ``dW[i, cols_h] = sum_j C_h[j, i] x[j, i] dV~_h[j]``, the sampled estimate of
  the dense ``X^T dV``;
* ``b_v``: ``sum_j dV~_h[j]``, exact.

What is held constant: the importance weights ``C`` (the draws and their ``1 / (r p)``)
and the budgets ``r_j``. The budgets depend on ``A`` (``r_j`` from ``max_i A[i, j]``),
a step function: their dependence on ``q``, ``k`` is not differentiated. The sampling
probabilities depend on ``w_v`` (and on ``x`` with ``sampling="optimal"``); holding
``1 / p`` fixed instead of differentiating it is what makes ``dx`` and ``dW`` unbiased,
since ``E[C_h[j, i]] = 1`` wherever ``p(i) > 0``. So ``dW`` (and ``dx`` under optimal
sampling) is *not* the derivative of the sampled forward; under weight sampling ``dx``
is. Where ``p(i) = 0`` (a row of ``W`` that is zero in head ``h``; under optimal
sampling also ``x[j, i] = 0``) the index is never drawn and that part of the gradient is
0 for sampled tokens — biased there, exact for exactly computed tokens.

The backward is a reference written with array operations (NumPy, float64): ``O(B H Nk
d_in)`` memory for ``C`` (8 bytes each: 288 MiB at ``Nk = 8192``, 12 heads, ``d_in =
384``); ``A`` is never held whole, forward and backward recompute it by blocks of query
rows from the rows' softmax statistics (:mod:`mcattn.mca.stream`). ``seed`` must be an
int (the same draws in forward and backward).
"""

import numbers

import numpy as np

from .. import random as mrandom
from .._validate import check_finite_array, namespace_of, prepare_attention, sum_to_shape
from ..errors import GradientNotSupportedError, ShapeError
from . import stream
from ._inputs import check_sampling, check_tables, check_weight
from .api import _shared_budgets
from .cpu import weight_tables
from .naive import (
    SHARED_BATCH_STREAM_BASE,
    SHARED_STREAM_BASE,
    batch_as_one_row,
    budgets_from_top,
    check_share,
    cumulative,
    token_streams,
)

__all__ = ["forward", "backward", "TRAINABLE", "sample_weights", "output_shape"]

#: Knob arrays that receive gradients: the value projection's input, weight and bias.
TRAINABLE = ("x", "w_v", "b_v")


def output_shape(q_shape, k_shape, v_shape, knobs):
    """Shape of the output for the JAX / TensorFlow adapters (``v`` is None for mca)."""
    batch = tuple(np.broadcast_shapes(tuple(q_shape[:-2]), tuple(k_shape[:-2])))
    heads = int(q_shape[-3])
    return batch + (int(q_shape[-2]), int(knobs["w_v"].shape[1]) // heads)


def _alias(bits, heads, tables):
    """Alias-method draws (:func:`mcattn.mca.naive.alias_draw`), head ``heads[t]`` for draw ``t``."""
    d_in, shift = tables.threshold.shape[-1], tables.shift
    m = np.asarray(bits, dtype=np.uint64) >> np.uint64(shift)
    c = m * np.uint64(d_in)
    k = (c >> np.uint64(64 - shift)).astype(np.int64)
    rem = c & ((np.uint64(1) << np.uint64(64 - shift)) - np.uint64(1))
    return np.where(rem < tables.threshold[heads, k], k, tables.alias[heads, k])


def sample_weights(x, w, num_heads, budgets, seed, sampling="weight", shared_draws=False,
                   tables=None, share="row"):
    """The importance weights ``C`` of the sampled value projection (host, float64).

    Parameters
    ----------
    x : numpy.ndarray, shape ``[B, N, d_in]``
    w : numpy.ndarray, shape ``[d_in, H * dh]``
    num_heads : int
    budgets : numpy.ndarray of int, shape ``[B, H, N]``
    seed : int
    sampling : {"weight", "optimal"}
    shared_draws : bool
    tables : WeightTables, optional
    share : {"row", "batch"}
        With ``shared_draws``, as :func:`mcattn.mca.attention`.

    Returns
    -------
    numpy.ndarray, shape ``[B, H, N, d_in]``, float64
        ``C[b, h, j, i] = count / (r_j p(i))`` for sampled tokens, 1 for exact ones, 0
        for masked ones; ``(C[b, h] * x[b]) @ W_h + b_h`` is
        :func:`mcattn.mca.naive.value_projection`'s estimate (same draws).
    """
    check_share(share, shared_draws)
    x = np.asarray(x, dtype=np.float64)
    base = SHARED_STREAM_BASE
    if share == "batch":  # the batch end to end: one row, one sequence per head
        rows_b = x.shape[0]
        x, budgets = batch_as_one_row(x, budgets)
        base = SHARED_BATCH_STREAM_BASE
    batch, n, d_in = x.shape
    r = np.asarray(budgets, dtype=np.int64)
    tables = weight_tables(w, num_heads) if tables is None else tables
    c = np.zeros((batch, num_heads, n, d_in))
    nonzero = x.any(-1)  # [B, N]: a zero input row is computed exactly (the bias)
    exact = (r >= d_in) | ((r > 0) & ~nonzero[:, None, :])
    c[exact] = 1.0
    sampled = (r > 0) & ~exact
    if not sampled.any() and share == "row":
        return c
    if shared_draws:  # one sequence per (batch row, head); token j uses its first r_j draws
        for b, h in zip(*np.nonzero(sampled.any(-1))):
            tokens = np.flatnonzero(sampled[b, h])
            counts = r[b, h, tokens]
            longest = int(counts.max())
            bits = mrandom.sample_bits(seed, np.uint64(base + b * num_heads + h),
                                       np.arange(longest))
            k = _alias(bits, np.full(longest, h), tables)
            live = np.arange(longest)[None, :] < counts[:, None]  # [tokens, longest]
            rows = np.broadcast_to(tokens[:, None], live.shape)[live]
            cols = np.broadcast_to(k[None, :], live.shape)[live]
            wts = (1.0 / (tables.p_weight[h, cols] * r[b, h, rows]))
            np.add.at(c[b, h], (rows, cols), wts)
        if share == "batch":
            c = np.ascontiguousarray(c.reshape(num_heads, rows_b, n // max(rows_b, 1), d_in)
                                     .transpose(1, 0, 2, 3))
        return c
    bi, hi, ji = np.nonzero(sampled)
    counts = r[bi, hi, ji]
    streams = token_streams(batch, num_heads, n)[bi, hi, ji]
    # Tokens by chunks of about 2**16 draws: memory O(chunk) besides C, whatever N.
    for part in np.split(np.arange(counts.size), np.flatnonzero(np.diff(np.cumsum(counts) >> 16)) + 1):
        _add_weights(c, x, tables, bi[part], hi[part], ji[part], counts[part], streams[part], seed,
                     sampling)
    return c


def _add_weights(c, x, tables, bi, hi, ji, counts, streams, seed, sampling):
    """Add ``1 / (r_j p(k))`` to ``C[b, h, j, k]`` for every independent draw ``k`` of the
    tokens ``(bi, hi, ji)``."""
    owner = np.repeat(np.arange(counts.size), counts)
    t = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    bits = mrandom.sample_bits(seed, streams[owner], t)
    hd = hi[owner]
    if sampling == "weight":
        k = _alias(bits, hd, tables)
        p_k = tables.p_weight[hd, k]
    else:  # per-token probabilities |x_ji| ||W_i, h||, inverse CDF as the reference
        u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
        k = np.empty(u.size, np.int64)
        p_k = np.empty(u.size)
        starts = np.cumsum(counts) - counts
        for s in range(counts.size):
            mass = np.abs(x[bi[s], ji[s]]) * tables.row_norms[hi[s]]
            p_tok = mass / mass.sum()
            part = slice(starts[s], starts[s] + counts[s])
            k[part] = np.searchsorted(cumulative(p_tok), u[part], side="right")
            p_k[part] = p_tok[k[part]]
    np.add.at(c, (bi[owner], hd, ji[owner], k), 1.0 / (p_k * counts[owner]))


def _seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise GradientNotSupportedError(
            "training with mca needs the same draws in the forward and the backward: give an "
            f"int seed= (got {type(seed).__name__})")
    return mrandom.resolve_seed(int(seed))


def _setup(q, k, x, w, b, alpha, attn_mask, key_padding_mask, is_causal, scale, sampling,
           shared_draws, tables, check_finite, share="row"):
    """Row statistics, budgets and inputs as :func:`mcattn.mca.attention` computes them."""
    check_sampling(sampling, shared_draws)
    check_share(share, shared_draws)
    heads = int(q.shape[-3])
    check_weight(w, b, heads, x.shape[-1])
    check_tables(tables, w, heads)
    if k.shape[-2] != x.shape[-2]:
        raise ShapeError(f"x must have one row per key: k has Nk={k.shape[-2]}, x has {x.shape[-2]} rows")
    if check_finite:
        for name, arr in (("x", x), ("w_v", w), ("b_v", b)):
            if arr is not None:
                check_finite_array(name, arr)
    inp = prepare_attention(q, k, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=check_finite)
    xp = inp.xp
    nk, d_in = x.shape[-2], x.shape[-1]
    lead = tuple(inp.batch_shape)[:-1]
    batch = int(np.prod(lead, dtype=np.int64))
    stats, top = stream.row_stats(inp)  # pass 1 of mcattn.mca.stream: no [Nq, Nk] matrix
    valid = inp.mask.visible_keys(inp.nq, nk)
    valid = np.broadcast_to(valid, (batch * heads, nk)).reshape(batch, heads, nk)
    r = budgets_from_top(top.reshape(batch, heads, nk), alpha, d_in, xp.asarray(valid))
    if shared_draws:
        r = _shared_budgets(r, xp is not np, d_in, share)  # the budgets the forward's path uses
    r = np.asarray(r.get() if hasattr(r, "get") else r)
    x3 = xp.broadcast_to(x, lead + (nk, d_in)).reshape(batch, nk, d_in)
    return inp, stats, r, x3, heads, lead


def forward(q, k, v=None, *, x, w_v, b_v=None, alpha, seed=None, sampling="weight",
            shared_draws=False, share="row", tables=None, attn_mask=None, key_padding_mask=None,
            is_causal=False, scale=None, backend=None, check_finite=True):
    """Monte-Carlo attention and the residuals its backward needs.

    Parameters
    ----------
    q : array, shape ``[..., H, Nq, d]``
    k : array, shape ``[..., H, Nk, d]``
    v : None
        mca computes the values from ``x``, ``w_v``, ``b_v``.
    x : array, shape ``[..., Nk, d_in]``
    w_v : array, shape ``[d_in, H * dv]``
    b_v : array, shape ``[H * dv]``, optional
    alpha, sampling, shared_draws, share, tables, attn_mask, key_padding_mask, is_causal, scale,
    check_finite
        As :func:`mcattn.mca.attention`. ``backend`` is accepted and unused: the training
        forward is the array reference (its draws are those of every backend).
    seed : int
        Required (the backward uses the forward's draws).

    Returns
    -------
    out : array, shape ``[..., H, Nq, dv]``
        Equal to :func:`mcattn.mca.attention` with the same arguments (to rounding).
    residuals : tuple
        ``(stats, values [B, H, Nk, dv], C [B, H, Nk, d_in])``: the rows' softmax
        statistics (:func:`mcattn.mca.stream.row_stats`, two ``[B H, Nq, 1]`` arrays), the
        sampled values and the importance weights (float64; :func:`sample_weights`).
    """
    if v is not None:
        raise TypeError("mca computes the values from x, w_v and b_v; pass v=None")
    seed = _seed(seed)
    inp, stats, r, x3, heads, lead = _setup(q, k, x, w_v, b_v, alpha, attn_mask, key_padding_mask,
                                            is_causal, scale, sampling, shared_draws, tables,
                                            check_finite, share)
    xp = inp.xp
    host = lambda a: np.asarray(a.get() if xp is not np else a)  # noqa: E731
    c = sample_weights(host(x3), host(w_v), heads, r, seed, sampling, shared_draws, tables, share)
    c = xp.asarray(c)
    d_in = x3.shape[-1]
    wh = w_v.astype(np.float64).reshape(d_in, heads, -1).transpose(1, 0, 2)  # [H, d_in, dv]
    x64 = x3.astype(np.float64)
    values = xp.empty(c.shape[:3] + (wh.shape[-1],))  # [B, H, Nk, dv]
    for h in range(heads):  # a head at a time: [B, Nk, d_in] temporaries, not [B, H, Nk, d_in]
        values[:, h] = xp.matmul(c[:, h] * x64, wh[h])
    if b_v is not None:
        values = values + b_v.astype(np.float64).reshape(heads, 1, -1)
    values = values.astype(q.dtype)  # the kernels' output dtype
    out = stream.apply(inp, stats, values.reshape(-1, x3.shape[-2], values.shape[-1]))
    return out.reshape(tuple(inp.batch_shape) + (inp.nq, values.shape[-1])), (stats, values, c)


def backward(q, k, v, out, residuals, dout, *, x, w_v, b_v=None, alpha, seed=None,
             sampling="weight", shared_draws=False, share="row", tables=None, attn_mask=None,
             key_padding_mask=None, is_causal=False, scale=None, backend=None, check_finite=True):
    """Gradients with respect to ``q``, ``k``, ``x``, ``w_v`` and ``b_v``.

    ``dq``, ``dk`` through the exact probabilities with the sampled values; ``dx``,
    ``dw_v`` the sampled estimates (forward's draws, importance weights and budgets held
    constant; unbiased for the dense gradients wherever the sampling probabilities are
    positive); ``db_v`` exact. See the module docstring.

    Returns
    -------
    dict
        ``{"q", "k", "x", "w_v"}`` (and ``"b_v"``) in the shapes and dtypes of the inputs.
    """
    stats, values, c = residuals
    xp = namespace_of(values)
    f64 = np.float64
    heads = int(q.shape[-3])
    inp = prepare_attention(q, k, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=False)
    batch, _, nk, dv = values.shape
    nq = inp.nq
    d_in = x.shape[-1]
    lead = tuple(inp.batch_shape)[:-1]
    vals = values.astype(f64).reshape(batch * heads, nk, dv)
    g = xp.broadcast_to(dout, tuple(inp.batch_shape) + (nq, dv))
    g = g.reshape(batch * heads, nq, dv).astype(f64)
    q3, k3 = inp.q.astype(f64), inp.k.astype(f64)
    dq = xp.zeros(q3.shape)
    dk = xp.zeros(k3.shape)
    dval = xp.zeros(vals.shape)
    # q, k: exact attention's backward with the sampled values, the forward's probabilities
    # recomputed by blocks of query rows (mcattn.mca.stream: never the [Nq, Nk] matrix).
    for block in stream.blocks(inp):
        b0, b1, i0, i1 = block
        a = stream.probabilities(inp, block, stats)[0].astype(f64)  # [bb, bq, Nk]
        gb = g[b0:b1, i0:i1]
        ds = xp.matmul(gb, vals[b0:b1].transpose(0, 2, 1))  # dA, then in place
        ds -= (ds * a).sum(-1, keepdims=True)
        ds *= a  # dS = A * (dA - rowsum(dA * A))
        dq[b0:b1, i0:i1] = xp.matmul(ds, k3[b0:b1]) * inp.scale
        dk[b0:b1] += xp.matmul(ds.transpose(0, 2, 1), q3[b0:b1, i0:i1]) * inp.scale
        dval[b0:b1] += xp.matmul(a.transpose(0, 2, 1), gb)
    dval = dval.reshape(batch, heads, nk, dv)
    # x, w_v, b_v: through V~ = (C * x) @ W_h + b_h with C held constant.
    x3 = xp.broadcast_to(x, lead + (nk, d_in)).reshape(batch, nk, d_in).astype(f64)
    wh = w_v.astype(f64).reshape(d_in, heads, -1).transpose(1, 0, 2)  # [H, d_in, dv]
    dx = xp.zeros((batch, nk, d_in))
    dw = xp.empty(wh.shape)  # [H, d_in, dv]
    for h in range(heads):  # a head at a time, as the forward
        dx += c[:, h] * xp.matmul(dval[:, h], wh[h].T)
        dw[h] = xp.matmul((c[:, h] * x3).transpose(0, 2, 1), dval[:, h]).sum(0)
    bshape = tuple(inp.batch_shape)
    grads = {
        "q": sum_to_shape(dq.reshape(bshape + dq.shape[1:]), q.shape).astype(q.dtype),
        "k": sum_to_shape(dk.reshape(bshape + dk.shape[1:]), k.shape).astype(k.dtype),
        "x": sum_to_shape(dx.reshape(lead + (nk, d_in)), x.shape).astype(x.dtype),
        "w_v": dw.transpose(1, 0, 2).reshape(w_v.shape).astype(w_v.dtype),
    }
    if b_v is not None:
        grads["b_v"] = dval.sum((0, 2)).reshape(b_v.shape).astype(b_v.dtype)
    return grads

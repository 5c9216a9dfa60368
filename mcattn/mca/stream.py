"""MCA's probabilities without the ``[Nq, Nk]`` matrix: two passes over blocks of rows.

MCA needs the attention probabilities ``A`` twice: before the projection, the largest
probability each key receives (``max_i A[i, j]``, its budget), and after it, ``A @ V~``.
Keeping ``A`` costs ``4 Nq Nk`` bytes per (batch row, head) in float32 (3 GiB at
``N = 8192``, 12 heads); here it is recomputed a block at a time instead:

* pass 1, :func:`row_stats`: each row's largest score and sum of ``exp`` (the softmax
  normaliser), and each key's column maximum of ``A``;
* pass 2, :func:`apply`: ``A @ V~`` block by block from the saved row statistics.

A block is whole query rows against every key (at most ``config.MCA_BLOCK_ELEMENTS``
probabilities; ``config.MCA_GPU_BLOCK_ELEMENTS`` on a GPU), so the softmax of a row is
complete within its block. Each block computes its probabilities with the operations of
:func:`mcattn.exact.naive.probs` in the same order (one matmul of scores, the row max,
``exp``, the row sum, the divide), so on the host every probability is the dense matrix's
bit for bit wherever BLAS gives a row of ``q k^T`` the same bits whatever the number of
rows in the product, hence the same budgets and the same draws as the dense
:func:`mcattn.mca.naive.attention` (tested). OpenBLAS does in the cases measured, except
for a one-row product (its matrix-vector kernel sums in another order: no block of a
long sequence has fewer than 16 rows, :func:`blocks`) and small float64 products with
``d = 8``, whose full-size bits change with the number of BLAS threads. ``A @ V~`` by
blocks agrees with the dense product to rounding, and bit for bit where OpenBLAS uses the
same kernels for both: it did in every call of ``benchmarks/mca_memory.py --time``
(``N = 2048 - 8192``, ``dv = 32``, blocks of 128-512 rows), not in the tests' smaller
problems (600 rows in blocks of 64, or 130 in blocks of 16: the last bit differs). A
problem that fits one block (``Nq Nk`` up to ``2**20`` on the host) is computed exactly
as the dense matrix.
On a GPU, cuBLAS may choose another algorithm for another shape: results agree to
rounding there, and a budget at an integer boundary could round the other way.
Memory: a few blocks and ``O(BH (Nq + Nk))`` row and column statistics; a matrix of at
most ``config.MCA_KEEP_ELEMENTS`` probabilities (16 MiB in float32) is kept from pass 1 to
pass 2 instead of being computed twice (short sequences, where the second pass would cost
a third of the call).
Array-namespace code: NumPy on the host, CuPy on a GPU.
"""

import numpy as np

from .. import config
from .._validate import namespace_of
from ..exact.naive import masked_scores

__all__ = ["blocks", "probabilities", "row_stats", "apply"]

#: Fewest query rows in a block of a long sequence (see the module docstring).
_MIN_ROWS = 16


def blocks(inp):
    """The blocks ``(b0, b1, i0, i1)``: batch rows ``b0:b1``, query rows ``i0:i1``, all keys.

    Short rows are grouped several batch rows per block (a block is then the whole
    matrix of each, as the dense computation has it); long ones split into blocks of at
    least 16 query rows (a shorter last block joins the one before).
    """
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    if bh == 0 or nq == 0 or nk == 0:
        return []
    on_gpu = namespace_of(inp.q) is not np
    cap = max(1, int(config.MCA_GPU_BLOCK_ELEMENTS if on_gpu else config.MCA_BLOCK_ELEMENTS))
    if nq * nk <= cap:
        step = max(1, cap // (nq * nk))
        return [(b0, min(bh, b0 + step), 0, nq) for b0 in range(0, bh, step)]
    rows = max(_MIN_ROWS, cap // nk)
    starts = list(range(0, nq, rows))
    if nq - starts[-1] < _MIN_ROWS and len(starts) > 1:
        starts.pop()  # a short last block joins the one before
    bounds = starts + [nq]
    return [(b, b + 1, i0, i1) for b in range(bh) for i0, i1 in zip(bounds[:-1], bounds[1:])]


def probabilities(inp, block, stats=None):
    """Probabilities of one block, ``[b1 - b0, i1 - i0, Nk]``, as :func:`mcattn.exact.naive.probs`.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    block : tuple ``(b0, b1, i0, i1)``
    stats : tuple, optional
        From :func:`row_stats` (the rows' statistics, and the blocks if it kept them);
        computed here when None.

    Returns
    -------
    p : array, shape ``[b1 - b0, i1 - i0, Nk]``
        Rows sum to 1; a row with no visible key (or a NaN) is 0.
    top, total : arrays, shape ``[b1 - b0, i1 - i0, 1]``
        The rows' largest score (0 where none is finite) and sum of ``exp(s - top)``.
    """
    xp = inp.xp
    dt = inp.dtype.type
    b0, b1, i0, i1 = block
    if stats is not None and stats[2] is not None:
        return stats[2][block], stats[0][b0:b1, i0:i1], stats[1][b0:b1, i0:i1]
    s = masked_scores(inp, b0, b1, i0, i1, 0, inp.nk)
    if stats is None:
        top = s.max(axis=-1, keepdims=True)
        top = xp.where(xp.isfinite(top), top, dt(0))
    else:
        top = stats[0][b0:b1, i0:i1]
    s -= top
    xp.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True) if stats is None else stats[1][b0:b1, i0:i1]
    s /= xp.where(total > 0, total, dt(1))
    xp.copyto(s, dt(0), where=~(total > 0))  # a row with nothing visible (or NaN) is 0
    return s, top, total


def row_stats(inp):
    """Pass 1: the rows' softmax statistics and the keys' largest probabilities.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs

    Returns
    -------
    stats : tuple ``(top, total, kept)``
        For :func:`apply` and :func:`probabilities`: the rows' largest score and sum of
        ``exp`` (arrays ``[BH, Nq, 1]``), and the probability blocks themselves (a dict)
        when the whole matrix has at most ``config.MCA_KEEP_ELEMENTS`` entries (pass 2 then
        recomputes nothing), else None.
    column_max : array, shape ``[BH, Nk]``, float64
        ``max_i A[i, j]`` (0 for ``Nq = 0``), as ``probs.max(axis=-2)`` of the dense matrix.
    """
    xp = inp.xp
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    top = xp.zeros((bh, nq, 1), dtype=inp.dtype)
    total = xp.zeros((bh, nq, 1), dtype=inp.dtype)
    column_max = xp.zeros((bh, nk), dtype=inp.dtype)  # probabilities are >= 0
    kept = {} if bh * nq * nk <= int(config.MCA_KEEP_ELEMENTS) else None
    for block in blocks(inp):
        b0, b1, i0, i1 = block
        p, top[b0:b1, i0:i1], total[b0:b1, i0:i1] = probabilities(inp, block)
        column_max[b0:b1] = xp.maximum(column_max[b0:b1], p.max(axis=-2))
        if kept is not None:
            kept[block] = p
    return (top, total, kept), column_max.astype(np.float64)


def apply(inp, stats, values, second=None, squared=False):
    """Pass 2: ``A @ values`` block by block.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    stats : tuple
        From :func:`row_stats`.
    values : array, shape ``[BH, Nk, dv]``
    second : array, shape ``[BH, Nk, c]``, optional
        Also return ``A @ second`` (``(A * A) @ second`` with ``squared``) from the same
        blocks of probabilities (the a-posteriori bound's variances, :mod:`mcattn.mca.posterior`).
    squared : bool

    Returns
    -------
    array, shape ``[BH, Nq, dv]``
        Of the dtype ``matmul`` gives the probabilities and ``values``.
    array, shape ``[BH, Nq, c]``, float64
        Only with ``second``.
    """
    xp = inp.xp
    dtype = np.result_type(inp.dtype, values.dtype)
    out = xp.zeros((inp.q.shape[0], inp.nq, values.shape[-1]), dtype=dtype)
    extra = None if second is None else xp.zeros((inp.q.shape[0], inp.nq, second.shape[-1]))
    for block in blocks(inp):
        b0, b1, i0, i1 = block
        p = probabilities(inp, block, stats)[0]
        out[b0:b1, i0:i1] = xp.matmul(p, values[b0:b1])
        if extra is not None:
            p64 = p.astype(np.float64)
            extra[b0:b1, i0:i1] = xp.matmul(p64 * p64 if squared else p64, second[b0:b1])
    return out if second is None else (out, extra)

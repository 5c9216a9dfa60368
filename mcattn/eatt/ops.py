"""Operation counts of E-Att (alignment, softmax and ``P V``, projections)."""

import numpy as np

from ..cost import OpCounts
from ._inputs import ALIGNMENTS

__all__ = ["alignment_ops", "softmax_value_ops", "projection_ops", "dense_projection_ops",
           "pairs_rows", "attention_counts"]


def alignment_ops(alignment, pairs, queries, keys, head_dim, scale=None):
    """Operations of the scores, for ``pairs`` visible (query, key) pairs.

    Parameters
    ----------
    alignment : {"l1", "hamming", "dot"}
        ``"dot"`` is exact attention's ``scale * q k^T`` (``q`` scaled once per row).
    pairs : int
        Visible (query, key) pairs.
    queries, keys : int
        Rows of ``q`` and ``k`` (over every batch row).
    head_dim : int
    scale : float, optional
        With ``scale == 1`` the L1 alignment scales nothing (no multiplication at all).

    Returns
    -------
    OpCounts
    """
    d = int(head_dim)
    if alignment == "dot":
        return OpCounts({"fp32_mul": pairs * d + queries * d, "fp32_add": pairs * d})
    if alignment == "l1":
        scaling = 0 if scale == 1.0 else (queries + keys) * d
        return OpCounts({"fp32_mul": scaling, "fp32_add": 2 * pairs * d})
    if alignment == "hamming":
        words = (d + 63) // 64
        return OpCounts({"fp32_cmp": (queries + keys) * d, "bit_xor64": pairs * words,
                         "popcount64": pairs * words, "int32_add": pairs * words,
                         "fp32_mul": d + 1})
    raise ValueError(f"alignment must be one of {ALIGNMENTS + ('dot',)}; got {alignment!r}")


def softmax_value_ops(pairs, rows, value_dim, has_bias=False):
    """Softmax and ``P V`` for ``pairs`` visible pairs and ``rows`` rows with a visible key.

    Per pair: a compare (max), a subtract, an exp, an add (sum), ``dv`` multiply-adds;
    an add for an additive mask; per row a reciprocal and ``dv`` multiplies.
    """
    dv = int(value_dim)
    return OpCounts({"fp32_mul": pairs * dv + rows * dv,
                     "fp32_add": pairs * (dv + 2) + (pairs if has_bias else 0),
                     "fp32_cmp": pairs, "fp32_exp": pairs, "fp32_div": rows})


def projection_ops(tokens, ones, d_in, d_out, has_bias=False):
    """Selective projection of ``tokens`` binary rows holding ``ones`` set bits in all.

    One ``select`` per (token, input bit, output column) and one ``fp32_add`` per
    selected row and output column, plus ``d_out`` adds per token for a bias.
    """
    return OpCounts({"select": tokens * d_in * d_out,
                     "fp32_add": ones * d_out + (tokens * d_out if has_bias else 0)})


def dense_projection_ops(tokens, d_in, d_out, has_bias=False):
    """A dense projection ``x @ w (+ b)`` of ``tokens`` rows: multiply-adds (and the bias adds)."""
    return OpCounts({"fp32_mul": tokens * d_in * d_out,
                     "fp32_add": tokens * (d_in + (1 if has_bias else 0)) * d_out})


def pairs_rows(inp):
    """Visible (query, key) pairs and rows with a visible key of canonical inputs ``inp``."""
    per_row = inp.mask.allowed_per_row(inp.nq, inp.nk)  # [BH or 1, Nq]
    bh = inp.q.shape[0]
    times = bh if per_row.shape[0] == 1 else 1
    return int(per_row.sum()) * times, int(np.count_nonzero(per_row)) * times


def attention_counts(inp, alignment):
    """``(alignment, softmax and P V, dot-product alignment)`` counts of one attention call."""
    pairs, rows = pairs_rows(inp)
    bh = inp.q.shape[0]
    align = alignment_ops(alignment, pairs, bh * inp.nq, bh * inp.nk, inp.head_dim, inp.scale)
    rest = softmax_value_ops(pairs, rows, inp.value_dim, inp.mask.bias is not None)
    dense_align = alignment_ops("dot", pairs, bh * inp.nq, bh * inp.nk, inp.head_dim)
    return align, rest, dense_align

"""Operation counts of exact attention (the ``dense_ops`` every method is measured against)."""

import numpy as np

from ..cost import OpCounts

__all__ = ["exact_ops"]


def exact_ops(inp, value_dim=None):
    """Operations exact attention needs for canonical inputs ``inp``.

    Only visible (query, key) pairs are counted: masked keys and the causal upper
    triangle cost nothing to a mask-aware kernel, so padding does not flatter a method
    compared with this baseline. Per visible pair: ``d`` multiply-adds for the score, a
    compare (max), a subtract, an exp and an add (sum), ``dv`` multiply-adds for ``P V``;
    per query row: ``d`` multiplies to scale ``q``, one reciprocal and ``dv`` multiplies
    to normalise; plus an add per pair for an additive mask.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    value_dim : int, optional
        Width of the values (default: that of ``inp.v``).

    Returns
    -------
    OpCounts
    """
    per_row = inp.mask.allowed_per_row(inp.nq, inp.nk)  # [BH or 1, Nq]
    bh = inp.q.shape[0]
    pairs = int(per_row.sum()) * (bh if per_row.shape[0] == 1 else 1)
    rows = int(np.count_nonzero(per_row)) * (bh if per_row.shape[0] == 1 else 1)
    d, dv = inp.head_dim, inp.value_dim if value_dim is None else value_dim
    counts = {
        "fp32_mul": pairs * (d + dv) + bh * inp.nq * d + rows * dv,
        "fp32_add": pairs * (d + dv + 2) + (pairs if inp.mask.bias is not None else 0),
        "fp32_cmp": pairs,
        "fp32_exp": pairs,
        "fp32_div": rows,
    }
    return OpCounts(counts)

"""Operation counts of hybrid attention."""

import numpy as np

from ..cost import OpCounts
from ..latte.ops import latte_ops

__all__ = ["hybrid_ops"]


def hybrid_ops(lat, kept_per_row, remainder, block):
    """LATTE's operations (float kept scores) plus the pooled remainder's.

    Pooled, per visible dropped pair: a multiply (``c u``), an add (the shift), an exp and an
    add into its block's mass; per kept pair ``dv`` adds (its value out of the block sum); per
    row and block a divide and ``dv`` multiply-adds; once per batch row the block value sums
    (``Nk dv`` adds).
    """
    ops, _ = latte_ops(lat, kept_per_row)
    if remainder != "pooled":
        return ops
    inp = lat.inp
    from ..latte.ops import visible_per_row

    vis = int(visible_per_row(inp).sum())
    kept = int(np.asarray(kept_per_row).sum())
    dropped = vis - kept
    bh, nq, nk, dv = inp.q.shape[0], inp.nq, inp.nk, inp.value_dim
    blocks = bh * nq * -(-nk // block)
    extra = OpCounts({"fp32_mul": dropped + blocks * dv, "fp32_add": 2 * dropped + kept * dv
                      + blocks * dv + bh * nk * dv, "fp32_exp": dropped, "fp32_div": blocks})
    return ops + extra

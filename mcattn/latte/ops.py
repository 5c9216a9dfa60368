"""Operation counts of LATTE."""

import numpy as np

from ..cost import OpCounts

__all__ = ["latte_ops", "visible_per_row"]


def visible_per_row(inp):
    """Visible keys of each query row, ``[BH, Nq]`` int64 (host)."""
    per_row = inp.mask.allowed_per_row(inp.nq, inp.nk)
    return np.broadcast_to(per_row, (inp.q.shape[0], inp.nq)).astype(np.int64)


def latte_ops(lat, kept_per_row):
    """Operations of a LATTE call (what a LATTE accelerator does).

    Quantisation per row of ``q`` and ``k``: ``d`` compares (max), a divide, ``d``
    multiplies and ``d`` roundings (counted as adds). Per visible pair: the MS4B estimate
    (``d`` int4 multiply-adds), its scale (a multiply) and two compares (row max,
    threshold); ``safe`` adds the bound's three nibble products (``3d`` int4
    multiply-adds) and two adds; ``topk`` a compare of the selection; a float mask an add.
    Per kept pair: the kept score (int8: the three remaining nibble products
    ``hi.lo, lo.hi, lo.lo``, ``3d`` int4 multiply-adds, 3 int32 shift-adds to combine
    with ``hi.hi`` and 2 multiplies by the scales; float: ``d`` fp32 multiply-adds), then
    softmax and ``P V`` as exact attention does on those pairs only (a compare, two adds,
    an exp, ``dv`` multiply-adds); per row a divide and ``dv`` multiplies.

    Returns
    -------
    ops, reuse_saved : OpCounts
        ``reuse_saved``: the ``d`` int4 multiply-adds per kept pair that reusing ``hi.hi``
        avoids (zero for float kept scores).
    """
    inp = lat.inp
    bh, nq, nk, d, dv = inp.q.shape[0], inp.nq, inp.nk, inp.head_dim, inp.value_dim
    kept_per_row = np.asarray(kept_per_row, dtype=np.int64)
    vis = int(visible_per_row(inp).sum())
    kept = int(kept_per_row.sum())
    rows = int(np.count_nonzero(kept_per_row))
    qrows = bh * (nq + nk)
    c = {
        "fp32_cmp": qrows * d + 2 * vis + kept,
        "fp32_div": qrows + rows,
        "fp32_mul": qrows * d + vis + kept * dv + rows * dv,
        "fp32_add": qrows * d + 2 * kept + kept * dv,
        "fp32_exp": kept,
        "int4_mul": vis * d,
        "int4_add": vis * d,
    }
    if lat.mode == "safe":
        c["int4_mul"] += 3 * vis * d
        c["int4_add"] += 3 * vis * d
        c["fp32_add"] += 2 * vis
    if lat.mode == "topk":
        c["fp32_cmp"] += vis
    if inp.mask.bias is not None:
        c["fp32_add"] += vis
    saved = OpCounts({})
    if lat.exact_scores == "int8":
        c["int4_mul"] += 3 * kept * d
        c["int4_add"] += 3 * kept * d
        c["int32_add"] = 3 * kept
        c["fp32_mul"] += 2 * kept
        saved = OpCounts({"int4_mul": kept * d, "int4_add": kept * d})
    else:
        c["fp32_mul"] += kept * d + bh * nq * d
        c["fp32_add"] += kept * d
    return OpCounts(c), saved

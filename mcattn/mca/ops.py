"""Operation counts of Monte-Carlo attention's sampled value projection."""

import numpy as np

from ..cost import OpCounts

__all__ = ["projection_ops", "shared_projection_ops"]


def projection_ops(r, d_in, dv, sampling, valid):
    """Operations of the sampled projection given the budgets that were used."""
    r = np.asarray(r, dtype=np.int64)
    exact = r >= d_in
    sampled = (r > 0) & ~exact
    n_exact = int(exact.sum())
    draws = int(r[sampled].sum())
    steps = int(np.ceil(np.log2(max(d_in, 2))))
    counts = {
        "fp32_mul": (n_exact * d_in + draws) * dv + draws + int(sampled.sum()) * dv,
        "fp32_add": (n_exact * d_in + draws) * dv + int((r > 0).sum()) * dv,
        "fp32_div": draws,
        "rng": 2 * draws,
        "search_step": steps * draws,
    }
    if sampling == "optimal":  # per-token distribution: |x| ||W_k||, running sum, normalise
        counts["fp32_mul"] += 2 * int(sampled.sum()) * d_in
        counts["fp32_add"] += int(sampled.sum()) * d_in
    n_valid = int(valid.sum())
    dense = OpCounts({"fp32_mul": n_valid * d_in * dv, "fp32_add": n_valid * (d_in + 1) * dv})
    return OpCounts(counts), dense


def shared_projection_ops(r, x, w, num_heads, seed, tables, share="row"):
    """Operations of the reduced-GEMM shared-draw projection (:mod:`mcattn.mca.shared`).

    One draw sequence per (batch row, head) — per head with ``share="batch"`` — of the
    longest budget (2 random words and
    ``log2 d_in`` search steps per draw, as the per-draw kernels), the merge weights
    (a divide per distinct drawn row, the ``1 / r_j`` folded in), the scaling of the
    merged rows, the reduced GEMMs' multiply-adds as done, and exact tokens' dense rows.
    """
    from .cpu import weight_tables
    from .shared_cpu import reduced_macs  # compiled (the reference: shared.reduced_macs)

    d_in, dh = x.shape[-1], w.shape[1] // num_heads
    host = lambda a: np.asarray(a.get() if hasattr(a, "get") else a)  # noqa: E731
    nonzero = host(x.any(axis=-1))
    tables = weight_tables(host(w), num_heads) if tables is None else tables
    exact = (r >= d_in) & nonzero[:, None, :]
    sampled = (r > 0) & (r < d_in) & nonzero[:, None, :]
    top = np.where(sampled, r, 0)
    if share == "batch":  # one sequence per head: the longest budget over the batch
        top = top.max(axis=0, initial=0)
    longest = int(top.max(axis=-1, initial=0).sum())
    macs, merge = reduced_macs(r, d_in, dh, seed, tables, nonzero, share)
    macs += int(exact.sum()) * d_in * dh
    steps = int(np.ceil(np.log2(max(d_in, 2))))
    return OpCounts({"fp32_mul": macs + merge, "fp32_add": macs,
                     "fp32_div": longest, "rng": 2 * longest, "search_step": steps * longest})

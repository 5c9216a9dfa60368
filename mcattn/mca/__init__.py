"""Monte-Carlo attention (MCA): the value projection by importance sampling.

Kim & Ko, "MCA: Monte-Carlo Attention", AAAI 2022 (arXiv 2201.12854). Attention
probabilities ``A = softmax(scale q k^T + mask)`` stay exact; each key token ``j`` gets
``r_j = min(d_in, ceil((n * max_i A[i, j] / alpha)^2))`` samples of the inner index of
its value projection ``x_j @ W_V`` (``n`` = number of valid keys), so tokens that
receive little attention are projected coarsely and the salient ones precisely; the
output is ``A @ V~``. With ceil (not the authors' floor) the paper's theorem holds
exactly: ``E||O~_i - O_i|| <= (alpha / n) sum_j ||x_j|| ||W_h||_F`` (see
:mod:`mcattn.mca.bounds`).

Differences from the authors' code, all deliberate: valid (unpadded) key count ``n``
instead of the padded length, ceil instead of floor, independent draws per (token, head)
by default (``shared_draws=True`` reproduces their nested draws), batches, masks,
causal attention, float64, and the honest operation count in ``info``.
"""

from . import bounds
from .api import (
    PROJECTION_KERNELS,
    MCAInfo,
    attention,
    budgets,
    sampling_probs,
    value_projection,
    weight_tables,
)
from .cpu import WeightTables

__all__ = ["sampling_probs", "weight_tables", "WeightTables", "budgets", "value_projection",
           "attention", "MCAInfo", "bounds", "PROJECTION_KERNELS"]

"""LATTE: low-precision score estimates filter keys per head before exact attention.

Wang, Lin, Wu, "LATTE: Low-Precision Approximate Attention with Head-wise Trainable
Threshold for Efficient Transformer" (arXiv 2404.07519). The paper has no public code;
the construction follows ``docs/methods/latte.md`` of the team design:

1. ``q`` and ``k`` are quantised to int8 per row: ``x ~ s_x x8`` (:func:`quantize`);
2. the scores are estimated from the high nibbles only (MS4B),
   ``est_ij = scale s_q s_k 256 hi(q8_i) . hi(k8_j)`` with ``hi(x8) = x8 >> 4``
   (:func:`estimate_scores`);
3. each query keeps the keys whose estimate passes its head's threshold
   (:func:`kept_mask`; modes ``relative``, ``absolute``, ``topk`` and ``safe``, which
   widens the relative rule by the estimate's error bound so that no key within the
   threshold of the true row maximum is ever dropped);
4. softmax over the kept keys only, with the kept scores from the int8 values
   (``q8.k8 = 256 hi.hi + 16 (hi.lo + lo.hi) + lo.lo``, reusing ``hi.hi``) or in full
   precision (:func:`attention`).

:func:`calibrate` picks per-head thresholds for a target keep fraction or attention mass
without training; :mod:`mcattn.latte.bounds` holds the error bounds. Backends:
``numpy`` (:mod:`mcattn.latte.naive`, the definition) and ``numba``
(:mod:`mcattn.latte.cpu`, streaming: an integer estimate per block of queries, then
only the kept keys).
"""

from . import bounds
from ._inputs import LatteInputs
from .api import (
    KERNELS,
    MASK_KERNELS,
    MODES,
    LatteInfo,
    attention,
    estimate_scores,
    kept_mask,
    quantize,
)
from .calibrate import calibrate
from .ops import latte_ops

__all__ = [
    "attention",
    "quantize",
    "estimate_scores",
    "kept_mask",
    "calibrate",
    "LatteInfo",
    "LatteInputs",
    "latte_ops",
    "bounds",
    "MODES",
    "KERNELS",
    "MASK_KERNELS",
]

"""Exact softmax attention: the baseline every approximation is measured against.

``out = softmax(scale * q k^T + mask) v`` with the conventions of
``torch.nn.functional.scaled_dot_product_attention`` (argument names, boolean masks
with True = may attend, additive float masks, top-left causal mask, ``scale=None``
meaning ``1/sqrt(d)``). A query row with no visible key returns zeros.
"""

from .api import KERNELS, PROBS_KERNELS, attention, attention_probs
from .ops import exact_ops

__all__ = ["attention", "attention_probs", "exact_ops", "KERNELS", "PROBS_KERNELS"]

"""Attention with energy-friendly operations (E-Att): selective projections, L1 alignment.

Wan et al., "Attention Mechanism with Energy-Friendly Operations", Findings of ACL 2022
(arXiv 2204.13353). E-Att replaces the multiplications of the alignment (the query/key
projections and the dot products) by selections and additions:

* the hidden states are binarised, ``b = 1[x > 0]``, so a projection ``b @ W + c`` is the
  sum of the rows of ``W`` that ``b`` selects (:func:`selective_projection`);
* queries and keys are compared by the L1 distance, ``e_ij = -||q_i - k_j||_1 * scale``
  with ``scale = 1/sqrt(d)`` (:func:`l1_scores`);
* the softmax, ``P V`` and the value/output projections stay as they are.

Beyond the paper, :func:`hamming_scores` and ``alignment="hamming"`` compare fully
binary codes (the signs of ``q`` and ``k``, packed 64 to a word) by XOR and popcount.

E-Att is a different attention function, meant to be trained: a model trained with
dot-product attention does not work with L1 alignment swapped in.

Operation counts (``info.ops``; prices in :data:`mcattn.cost.HOROWITZ_45NM_PJ`)
--------------------------------------------------------------------------------
* L1 alignment: ``q`` and ``k`` are scaled once (``(Nq + Nk) d`` multiplies, none when
  ``scale == 1``; the pair loop then needs none, since ``s |x| = |s x|`` for ``s > 0``;
  a trained model can keep ``1/c`` inside ``W_Q``, ``W_K``), and per visible pair ``d``
  subtractions and ``d`` additions (``fp32_add``). The absolute value clears the sign
  bit, no arithmetic, and is not counted.
* Hamming alignment: ``(Nq + Nk) d`` sign tests (``fp32_cmp``) to binarise, and per
  visible pair and 64-bit word one XOR (``bit_xor64``), one popcount (``popcount64``)
  and one integer add (``int32_add``); the distance is turned into a score by a
  ``d + 1`` entry table (``d + 1`` multiplies per call, a load per pair).
* Softmax and ``P V``, as exact attention counts them: per pair a compare, a subtract,
  an exp, an add, ``dv`` multiply-adds; per row a reciprocal and ``dv`` multiplies.
* Selective projection: per token, input bit and output column one ``select`` (the
  bit gates the weight, which is what replaces the multiply; priced as an int32 add,
  an upper bound, see :mod:`mcattn.cost`), and one ``fp32_add`` per selected row and
  column (plus the bias).
"""

from ._inputs import ALIGNMENTS
from .api import (
    KERNELS,
    PROJECTION_KERNELS,
    EAttInfo,
    attention,
    binarize,
    hamming_scores,
    l1_scores,
    layer,
    pack_bits,
    selective_projection,
    unpack_bits,
)
from .ops import alignment_ops, dense_projection_ops, projection_ops, softmax_value_ops

__all__ = [
    "binarize",
    "pack_bits",
    "unpack_bits",
    "selective_projection",
    "l1_scores",
    "hamming_scores",
    "attention",
    "layer",
    "EAttInfo",
    "ALIGNMENTS",
    "alignment_ops",
    "softmax_value_ops",
    "projection_ops",
    "dense_projection_ops",
    "KERNELS",
    "PROJECTION_KERNELS",
]

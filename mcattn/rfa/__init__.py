"""Random feature attention (Peng et al., "Random Feature Attention", ICLR 2021).

``exp(q . k)`` is replaced by ``phi(q) . phi(k)`` with random features ``phi``
(:class:`RandomFeatures`), so attention becomes

``out_i = phi(q_i)^T S / (phi(q_i) . z)``, ``S = sum_j phi(k_j) v_j^T``, ``z = sum_j phi(k_j)``:

linear time in the sequence length, and a constant-size state ``(S, z)`` for causal
decoding (:meth:`RandomFeatures.decoder`). An optional gate ``g_t`` in (0, 1) gives the
paper's recency bias: ``S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T``.

Which function is estimated
---------------------------
``exp(s q.k) = exp(s|q|^2/2) exp(s|k|^2/2) exp(-s|q - k|^2/2)``: the query factor
cancels in the softmax ratio, the key factor does not.

* ``normalize=None`` (drop-in): rows ``q' = sqrt(s) q``, ``k' = sqrt(s) k`` and the key
  factor is kept, so numerator and denominator are unbiased estimates of those of exact
  softmax attention (``positive`` and ``sincos`` features). ``sigma`` plays no role.
* ``normalize="unit"`` (the paper): ``q`` and ``k`` are scaled to unit norm and divided
  by ``sigma``; the estimated attention is ``softmax(q^.k^ / sigma^2)``, a different
  function (meant for training, where ``sigma`` is learned).
* ``arccos`` features estimate the arc-cosine kernel instead of ``exp``: the attention
  weights are ``k1(q', k')`` (Cho & Saul), a different attention in both modes.

Denominators: with sin/cos features ``phi(q) . z`` can be zero or negative. It is
floored at ``eps * |phi(q)| * sum_j |phi(k_j)|`` (``eps`` times its Cauchy-Schwarz bound;
default ``mcattn.config.RFA_EPS``) and the floored rows are counted in ``info.clamped``.

Backends: ``numpy`` (:mod:`mcattn.rfa.naive`, the readable definition), ``numba``
(:mod:`mcattn.rfa.cpu`), ``cuda`` (:mod:`mcattn.rfa.cuda`) and ``cupy``
(:mod:`mcattn.rfa.cupy`). Causal and gated attention run the chunked parallel form
(exact products inside chunks of ``chunk_size`` tokens, a carried state between them).
Bounds: :mod:`mcattn.rfa.bounds`.
"""

from . import bounds
from .api import KERNELS, RFAInfo, attention
from .decoding import RFACrossAttention, RFADecoder
from .features import KINDS, RandomFeatures
from .naive import RFAState
from .ops import rfa_ops

__all__ = [
    "attention",
    "RandomFeatures",
    "RFADecoder",
    "RFACrossAttention",
    "RFAState",
    "RFAInfo",
    "rfa_ops",
    "bounds",
    "KINDS",
    "KERNELS",
]

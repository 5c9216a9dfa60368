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

from dataclasses import dataclass

import numpy as np

from .._array import import_arrays
from .._device import on_input_device
from .._dispatch import Kernel, select_kernel
from .._validate import check_flags
from ..cost import CallInfo, OpCounts
from ..errors import ShapeError
from . import bounds
from ._inputs import prepare_rfa
from .decoding import RFACrossAttention, RFADecoder
from .features import KINDS, RandomFeatures
from .naive import RFAState

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

_ALL = frozenset({"mask", "causal", "gate"})

#: The random-feature-attention kernels, one per backend.
KERNELS = (
    Kernel("numba", "mcattn.rfa.cpu", "forward", features=_ALL),
    Kernel("numpy", "mcattn.rfa.naive", "forward", features=_ALL),
    Kernel("cupy", "mcattn.rfa.cupy", "forward", max_head_dim=128, features=_ALL),
    Kernel("cuda", "mcattn.rfa.cuda", "forward", max_head_dim=128, features=_ALL),
)


@dataclass(frozen=True)
class RFAInfo(CallInfo):
    """What one :func:`attention` call did.

    Attributes
    ----------
    method, backend, ops, dense_ops
        As :class:`~mcattn.cost.CallInfo`; ``dense_ops`` is exact attention's count for
        the same inputs (visible pairs only).
    kind : str
        Feature map.
    num_features : int
        ``D``, random projections.
    feature_dim : int
        ``m``, length of a feature vector.
    normalize : str or None
    chunk_size : int or None
        Tokens per chunk of the chunked form (None for non-causal attention).
    clamped : int
        Query rows whose denominator was floored at ``eps`` times its Cauchy-Schwarz
        bound (their output is unreliable).
    rows : int
        Query rows computed (``BH x Nq``).
    seed : int
        Seed of the projections.
    """

    kind: str = "positive"
    num_features: int = 0
    feature_dim: int = 0
    normalize: str | None = None
    chunk_size: int | None = None
    clamped: int = 0
    rows: int = 0
    seed: int = 0

    @property
    def clamped_fraction(self):
        """``clamped / rows``."""
        return self.clamped / self.rows if self.rows else 0.0


def rfa_ops(rinp):
    """Operations of the RFA algorithm for canonical inputs (as the CPU and NumPy backends run it).

    Per row of ``q`` and ``k``: scaling and squared norm (``3d``; unit rows ``+d`` and a
    divide), the projection (``D d`` multiply-adds), the feature map (``positive``: a
    max, a subtract, an exp and a multiply per projection; ``sincos``: a sin and a cos —
    each counted as one ``fp32_exp``, a polynomial of the same size after range
    reduction — and 2 multiplies; ``arccos``: a compare and a multiply) and the feature
    norm (``m`` multiply-adds and a square root, counted as a divide). Per key: its weight
    (an add, a compare, an exp) applied to ``m`` features. Non-causal: ``S`` and ``z``
    (``m (dv + 1)`` multiply-adds per key) and the read-out (``m (dv + 1)`` per query, a
    divide, ``dv`` multiplies, the floor's compare). Causal, per chunk of ``L`` tokens:
    ``L^2 (m + dv + 2)`` multiply-adds for the intra-chunk products, the decay mask
    (``L^2`` multiplies; gated: ``L^2`` exps and adds), ``2 L m (dv + 1)`` for the state's
    read-out and update.

    Returns
    -------
    OpCounts
    """
    bh, nq, nk = rinp.q.shape[0], rinp.nq, rinp.nk
    d, dv, D, m = rinp.q.shape[2], rinp.value_dim, rinp.num_features, rinp.feature_dim
    rows = bh * (nq + nk)
    keys = bh * nk
    mul = rows * (2 * d + D * d + m) + keys * m
    add = rows * (d + D * d + m) + keys
    exp = keys
    cmp = keys
    div = rows
    if rinp.unit:
        mul += rows * d
        add += rows * d
        div += rows
    if rinp.kind == "positive":
        cmp += rows * D
        add += rows * D
        exp += rows * D
        mul += rows * D
    elif rinp.kind == "sincos":
        exp += rows * 2 * D
        mul += rows * 2 * D
    else:
        cmp += rows * D
        mul += rows * D
    if rinp.is_causal:
        chunk = rinp.chunk_size
        full, rest = divmod(nq, chunk)
        sq = full * chunk * chunk + rest * rest
        n_chunks = full + (1 if rest else 0)
        intra = bh * sq * (m + dv + 2)
        mul += intra + bh * sq + 2 * bh * nq * m * (dv + 1)
        add += intra + 2 * bh * nq * m * (dv + 1)
        if rinp.log_gate is not None:
            exp += bh * (sq + 2 * nq)
            add += bh * (sq + nq)
        mul += bh * n_chunks * m * (dv + 1)
    else:
        mul += bh * (nk + nq) * m * (dv + 1)
        add += bh * (nk + nq) * m * (dv + 1)
    mul += bh * nq * (dv + 1)
    div += bh * nq
    cmp += bh * nq
    return OpCounts({"fp32_mul": mul, "fp32_add": add, "fp32_exp": exp, "fp32_cmp": cmp, "fp32_div": div})


def _resolve_features(features, num_features, kind, seed, q):
    """``features``, or features drawn from ``num_features``/``kind``/``seed`` for ``q``."""
    if features is not None:
        if num_features is not None or seed is not None or kind != "positive":
            raise TypeError("give either features= or num_features= (with kind=, seed=), not both")
        if not isinstance(features, RandomFeatures):
            raise TypeError(f"features must be a mcattn.rfa.RandomFeatures; got {type(features).__name__}")
        return features
    if num_features is None:
        raise TypeError("random feature attention needs features= (a RandomFeatures) or num_features=")
    shape = tuple(q.shape)
    if len(shape) < 2:
        raise ShapeError(f"q must have shape [..., Nq, d]; got shape {shape}")
    # Zero heads: nothing to compute, one shared draw keeps the call's seed and info.
    heads = int(shape[-3]) if len(shape) >= 3 and shape[-3] else None
    return RandomFeatures(int(shape[-1]), num_features, kind=kind, num_heads=heads, seed=seed)


@on_input_device
@check_flags
def attention(q, k, v, *, features=None, num_features=None, kind="positive", seed=None,
              is_causal=False, gate=None, normalize=None, attn_mask=None,
              key_padding_mask=None, scale=None, chunk_size=None, eps=None, backend=None,
              check_finite=True, return_info=False):
    """Random feature attention.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
        Queries. NumPy, CuPy, or a torch / JAX / TensorFlow tensor (through DLPack).
    k : array, shape ``[..., Nk, d]``
    v : array, shape ``[..., Nk, dv]``
        Leading dims broadcast (``[B, H]`` typical; ``[..., H]`` when the features were
        drawn per head).
    features : RandomFeatures, optional
        Projections and feature map (``head_dim`` must equal ``d``). Build them once and
        reuse them across calls; or give ``num_features`` instead.
    num_features, kind, seed : optional
        Without ``features``: draw ``RandomFeatures(d, num_features, kind=kind,
        num_heads=H, seed=seed)`` for this call (``H = q.shape[-3]``, one draw per head;
        shared by every head when ``q`` has fewer than 3 dims). ``seed=None`` draws a
        fresh seed (``info.seed`` reports it). Not allowed together with ``features``.
    is_causal : bool, default False
        Query ``i`` sees keys ``j <= i`` (top-left aligned).
    gate : array, shape ``[..., N]``, optional
        Recency gate ``g_t`` in (0, 1) per token (broadcast to the batch dims), causal
        self-attention only: ``S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T``. A padded
        (masked) token neither adds to nor decays the state.
    normalize : {None, "unit"}, default None
        None: the drop-in estimator of softmax attention (key norm factor kept).
        ``"unit"``: the paper's unit-norm rows, attention ``softmax(q^.k^ / sigma^2)``.
    attn_mask : array, optional
        Must be the same for every query: boolean (True = may attend) or additive, of
        shape ``[..., 1, Nk]`` (or ``[..., Nq, Nk]`` with identical rows). An arbitrary
        ``Nq x Nk`` mask is not representable in linear attention: it raises.
    key_padding_mask : array of bool, optional
        ``[B, Nk]``, True = a real key.
    scale : float, optional
        Score scale of the drop-in form, default ``1/sqrt(d)``. Must be None with
        ``normalize="unit"`` (the temperature is ``1/sigma^2`` there).
    chunk_size : int, optional
        Tokens per chunk of the causal/gated form (default ``config.RFA_CHUNK_SIZE``).
    eps : float, optional
        Denominator floor relative to its Cauchy-Schwarz bound (default ``config.RFA_EPS``).
    backend : {None, "numpy", "numba", "cuda", "cupy"}
    check_finite : bool, default True
    return_info : bool, default False
        Also return an :class:`RFAInfo`.

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
        Same array type, device and dtype as ``q``. Rows with no visible key are zero.
    info : RFAInfo
        Only with ``return_info=True``.

    Raises
    ------
    ShapeError, DTypeError, NonFiniteError, BackendError, ValueError

    Examples
    --------
    >>> import numpy as np
    >>> from mcattn import rfa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 12, 1024, 64), dtype=np.float32) for _ in range(3))
    >>> feats = rfa.RandomFeatures(64, 64, kind="positive", num_heads=12)
    >>> out, info = rfa.attention(q, k, v, features=feats, is_causal=True, return_info=True)
    >>> out.shape, info.clamped
    ((1, 12, 1024, 64), 0)
    """
    bridge, a = import_arrays(
        {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask,
         "gate": gate},
        float_names=("q", "k", "v"),
    )
    features = _resolve_features(features, num_features, kind, seed, a["q"])
    rinp, inp = prepare_rfa(
        features, a["q"], a["k"], a["v"], attn_mask=a["attn_mask"],
        key_padding_mask=a["key_padding_mask"], gate=a["gate"], is_causal=is_causal,
        normalize=normalize, scale=scale, chunk_size=chunk_size, eps=eps, check_finite=check_finite,
    )
    problem = inp.problem(extra_features=("gate",) if gate is not None else ())
    kernel = select_kernel("random feature attention", KERNELS, problem, backend)
    bh = rinp.q.shape[0]
    if inp.empty:
        out, clamped = inp.zero_output(), np.zeros(bh, np.int64)
    else:
        out, clamped = kernel(rinp)
    result = bridge.export(out.reshape(inp.out_shape))
    if not return_info:
        return result
    from ..exact import exact_ops

    info = RFAInfo(
        method="rfa", backend=kernel.backend, ops=rfa_ops(rinp), dense_ops=exact_ops(inp),
        kind=features.kind, num_features=features.num_features, feature_dim=features.feature_dim,
        normalize=normalize, chunk_size=rinp.chunk_size if is_causal else None,
        clamped=int(clamped.sum()), rows=bh * rinp.nq, seed=features.seed,
    )
    return result, info

"""Random feature attention's public function, :func:`attention`."""

from dataclasses import dataclass, field

import numpy as np

from .._device import on_input_device
from .._dispatch import Kernel
from .._door import door
from .._validate import check_flags
from ..cost import CallInfo
from ..exact.ops import exact_ops
from ..posterior import gaussian_factor
from ._inputs import prepare_rfa, resolve_features
from .ops import rfa_ops
from .posterior import attention_bound

__all__ = ["attention", "RFAInfo", "KERNELS"]

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
    posterior : mcattn.posterior.PosteriorBound or None
        Per-row error bound at confidence ``1 - delta`` (:mod:`mcattn.rfa.posterior`);
        None for ``sincos`` calls that are causal, gated or ``normalize="unit"``.
        Computed when first read.
    """

    kind: str = "positive"
    num_features: int = 0
    feature_dim: int = 0
    normalize: str | None = None
    chunk_size: int | None = None
    clamped: int = 0
    rows: int = 0
    seed: int = 0
    posterior_source: object = field(default=None, repr=False, compare=False)

    @property
    def clamped_fraction(self):
        """``clamped / rows``."""
        return self.clamped / self.rows if self.rows else 0.0


@on_input_device
@check_flags
def attention(q, k, v, *, features=None, num_features=None, kind="positive", seed=None,
              is_causal=False, gate=None, normalize=None, attn_mask=None,
              key_padding_mask=None, scale=None, chunk_size=None, eps=None, backend=None,
              check_finite=True, return_info=False, delta=0.05):
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
    delta : float, default 0.05
        Failure probability of ``info.posterior`` (:mod:`mcattn.rfa.posterior`), in ``(0, 1)``.

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
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask,
              "key_padding_mask": key_padding_mask, "gate": gate}

    def prepare(a):
        gaussian_factor(delta)  # a bad delta fails before any work
        feats = resolve_features(features, num_features, kind, seed, a["q"])
        rinp, inp = prepare_rfa(
            feats, a["q"], a["k"], a["v"], attn_mask=a["attn_mask"],
            key_padding_mask=a["key_padding_mask"], gate=a["gate"], is_causal=is_causal,
            normalize=normalize, scale=scale, chunk_size=chunk_size, eps=eps,
            check_finite=check_finite,
        )
        return (feats, rinp, inp), inp.problem(extra_features=("gate",) if gate is not None else ())

    def info(call, kernel, extra):
        return _info(call, kernel, extra, delta)

    return door("random feature attention", arrays, ("q", "k", "v"), prepare, _run, info,
                kernels=KERNELS, backend=backend, return_info=return_info)


def _run(call, kernel):
    _, rinp, inp = call
    if inp.empty:
        out, clamped = inp.zero_output(), np.zeros(rinp.q.shape[0], np.int64)
    else:
        out, clamped = kernel(rinp)
    out = out.reshape(inp.out_shape)
    return out, (clamped, out)


def _info(call, kernel, extra, delta=0.05):
    feats, rinp, inp = call
    clamped, out = extra
    return RFAInfo(
        method="rfa", backend=kernel.backend, ops=rfa_ops(rinp), dense_ops=exact_ops(inp),
        kind=feats.kind, num_features=feats.num_features, feature_dim=feats.feature_dim,
        normalize="unit" if rinp.unit else None,
        chunk_size=rinp.chunk_size if rinp.is_causal else None,
        clamped=int(clamped.sum()), rows=rinp.q.shape[0] * rinp.nq, seed=feats.seed,
        posterior_source=None if inp.empty else (lambda: attention_bound(rinp, out, delta, clamped)),
    )

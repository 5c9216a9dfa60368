"""Checked, canonical inputs of one random-feature-attention call (shared by the backends)."""

import math
from dataclasses import dataclass

import numpy as np

from .. import config
from .._validate import QKVShapes, check_finite_array, prepare_attention
from ..errors import DTypeError, GradientNotSupportedError, ShapeError
from .features import RandomFeatures

__all__ = ["RFAInputs", "prepare_rfa", "check_normalize", "row_scales", "resolve_features",
           "resolve_training_features"]


def check_normalize(normalize):
    if normalize not in (None, "unit"):
        raise ValueError(f'normalize must be None (drop-in softmax estimator) or "unit"; got {normalize!r}')
    return normalize == "unit"


def row_scales(features, unit, scale, head_dim):
    """``(q_scale, k_scale)``: the rows fed to the feature map are ``x' = scale * x``.

    Drop-in form: ``q' . k' = scale q . k`` (``sqrt|scale|`` on both sides, the sign on
    the keys). Unit form: ``q / |q| / sigma`` and ``k / |k| / sigma``.
    """
    if unit:
        if scale is not None:
            raise ValueError(
                'scale is not used with normalize="unit": the temperature of the unit-norm form '
                "is 1/sigma**2 of the features; leave scale=None"
            )
        return 1.0 / features.sigma, 1.0 / features.sigma
    if scale is None:
        s = 1.0 / math.sqrt(head_dim)
    else:
        try:
            s = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a real number or None; got {scale!r}") from None
        if not math.isfinite(s):
            raise ValueError(f"scale must be finite; got {scale}")
    root = math.sqrt(abs(s))
    return root, math.copysign(root, s)


def _check_eps(eps):
    eps = config.RFA_EPS if eps is None else eps
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a positive real number or None; got {eps!r}") from None
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"eps must be in (0, 1); got {eps}")
    return eps


def _check_chunk(chunk_size):
    chunk = config.RFA_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    return int(chunk)


@dataclass(frozen=True)
class RFAInputs(QKVShapes):
    """Canonical inputs of one call.

    Attributes
    ----------
    q : array ``[BH, Nq, d]``
    k : array ``[BH, Nk, d]``
    v : array ``[BH, Nk, dv]``
        C-contiguous, compute dtype. With ``is_causal`` and ``Nq != Nk`` the keys are cut
        or padded (padding masked) to ``Nq``, which makes causal visibility ``j <= i``.
    omega : array ``[H, D, d]``
        Projections; batch row ``b`` uses ``omega[b % H]``.
    kind : str
    unit : bool
        Rows are normalised to unit length before ``q_scale`` / ``k_scale`` apply.
    q_scale, k_scale : float
        The rows fed to the feature map are ``q_scale * q`` and ``k_scale * k``.
    key_bias : array ``[BH, Nk]`` or None
        Additive log-weight of each key: the per-key mask (``-inf`` = absent) plus
        ``log(1 - g)`` of the gate.
    log_gate : array ``[BH, Nk]`` or None
        ``log g`` of the gate (0 at masked keys: padding neither adds nor decays).
    is_causal : bool
    chunk_size : int
    eps : float
    batch_shape : tuple
    """

    q: object
    k: object
    v: object
    omega: object
    kind: str
    unit: bool
    q_scale: float
    k_scale: float
    key_bias: object
    log_gate: object
    is_causal: bool
    chunk_size: int
    eps: float
    batch_shape: tuple

    @property
    def heads(self):
        return self.omega.shape[0]

    @property
    def num_features(self):
        return self.omega.shape[1]

    @property
    def feature_dim(self):
        return 2 * self.num_features if self.kind == "sincos" else self.num_features



def _key_bias(mask, bh, xp):
    """Per-key additive bias ``[BH, Nk]`` from a canonical mask, or a clear refusal."""
    bias = mask.bias
    if bias is None:
        return None
    if bias.shape[1] > 1 and not bool(xp.all(bias == bias[:, :1])):
        raise ShapeError(
            "attn_mask differs between queries (an [Nq, Nk] pattern), which random feature "
            "attention cannot apply: linear attention never forms the Nq x Nk score matrix. "
            "Representable masks are the same for every query: key_padding_mask [B, Nk], or "
            "attn_mask of shape [..., 1, Nk] (boolean or additive per key), plus is_causal."
        )
    index = xp.asarray(mask.mask_index)
    return xp.ascontiguousarray(bias[index, 0, :]).reshape(bh, bias.shape[-1])


def _gate(gate, batch_shape, n, dtype, xp, check_finite):
    if gate.dtype.kind != "f":
        raise DTypeError(f"gate must be a floating-point array of values in (0, 1); got dtype {gate.dtype}")
    target = tuple(batch_shape) + (n,)
    try:
        shape = np.broadcast_shapes(gate.shape, target)
    except ValueError:
        shape = None
    if shape != target:
        raise ShapeError(f"gate must be broadcastable to {target} (batch dims + [N]); got shape {gate.shape}")
    if check_finite:
        check_finite_array("gate", gate)
    g = xp.broadcast_to(gate.astype(dtype, copy=False), target).reshape(int(np.prod(batch_shape)), n)
    if g.size and not bool(((g > 0) & (g < 1)).all()):
        raise ValueError("gate values must lie strictly between 0 and 1 (g = 1 would drop the key, "
                         "g = 0 would forget everything before it)")
    return xp.log(g), xp.log1p(-g)


def prepare_rfa(features, q, k, v, *, attn_mask, key_padding_mask, gate, is_causal, normalize,
                scale, chunk_size, eps, check_finite):
    """Check everything and build :class:`RFAInputs` (native NumPy/CuPy arrays in)."""
    unit = check_normalize(normalize)
    d = q.shape[-1] if getattr(q, "ndim", 0) >= 1 else None
    if d is not None and d != features.head_dim:
        raise ShapeError(
            f"q has head_dim {d} but the features were drawn for head_dim={features.head_dim}"
        )
    q_scale, k_scale = row_scales(features, unit, scale, features.head_dim)
    inp = prepare_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=None, check_finite=check_finite)
    features.check_heads(inp.batch_shape)
    xp = inp.xp
    bh = inp.q.shape[0]
    key_bias = _key_bias(inp.mask, bh, xp)
    log_gate = None
    qq, kk, vv = inp.q, inp.k, inp.v
    nq, nk = inp.nq, inp.nk
    if gate is not None:
        if not is_causal:
            raise ValueError("gate is a recency gate over past tokens: it needs is_causal=True")
        if nq != nk:
            raise ShapeError(f"gate needs as many queries as keys (one gate per step); got Nq={nq}, Nk={nk}")
        log_gate, log_keep = _gate(gate, inp.batch_shape, nk, inp.dtype, xp, check_finite)
        key_bias = log_keep if key_bias is None else key_bias + log_keep
        log_gate = xp.ascontiguousarray(xp.where(key_bias == -np.inf, inp.dtype.type(0), log_gate))
    if is_causal and nq != nk:  # top-left causal: key j is visible to query i iff j <= i < Nq
        if nk > nq:
            kk, vv = kk[:, :nq], vv[:, :nq]
            key_bias = None if key_bias is None else key_bias[:, :nq]
        else:
            pad = nq - nk
            kk = xp.concatenate([kk, xp.zeros((bh, pad, kk.shape[2]), kk.dtype)], axis=1)
            vv = xp.concatenate([vv, xp.zeros((bh, pad, vv.shape[2]), vv.dtype)], axis=1)
            base = xp.zeros((bh, nk), inp.dtype) if key_bias is None else key_bias
            key_bias = xp.concatenate([base, xp.full((bh, pad), -np.inf, inp.dtype)], axis=1)
        kk, vv = xp.ascontiguousarray(kk), xp.ascontiguousarray(vv)
    if key_bias is not None:
        key_bias = xp.ascontiguousarray(key_bias.astype(inp.dtype, copy=False))
    return RFAInputs(
        q=qq, k=kk, v=vv, omega=features.omega_for(inp.dtype, xp), kind=features.kind, unit=unit,
        q_scale=q_scale, k_scale=k_scale, key_bias=key_bias, log_gate=log_gate,
        is_causal=bool(is_causal), chunk_size=_check_chunk(chunk_size), eps=_check_eps(eps),
        batch_shape=inp.batch_shape,
    ), inp


def resolve_features(features, num_features, kind, seed, q):
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


def resolve_training_features(q, features, num_features, kind, seed):
    """:func:`resolve_features` for training: a seed or features required, positive features only."""
    if features is None and seed is None:
        raise GradientNotSupportedError(
            "training with random features needs the same features in the forward and the "
            "backward: give seed= (or features=)")
    feats = resolve_features(features, num_features, kind, seed, q)
    if feats.kind != "positive":
        raise GradientNotSupportedError(f"rfa gradients are implemented for kind='positive'; got "
                                        f"{feats.kind!r}")
    return feats

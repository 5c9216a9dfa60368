"""Checks and canonical forms shared by every method.

:func:`prepare_attention` is the one place where ``q, k, v`` and masks are checked and
brought to the layout kernels take:

* ``q`` ``[BH, Nq, d]``, ``k`` ``[BH, Nk, d]``, ``v`` ``[BH, Nk, dv]``, C-contiguous, in
  the compute dtype (``BH`` = product of the broadcast leading dims);
* masks as one additive bias ``bias [M, R, Nk]`` (``R`` = 1 or ``Nq``; entries 0, -inf or
  the caller's additive values) plus ``mask_index [BH]`` telling which of the ``M``
  slices each batch row uses. A key padding mask ``[B, Nk]`` therefore costs ``B * Nk``
  numbers, not ``B * H * Nq * Nk``, whatever the broadcast.
"""

import functools
import inspect
import math
from dataclasses import dataclass

import numpy as np

from ._array import check_same_dtype, host_copy, is_cupy
from ._dispatch import Problem
from .errors import DTypeError, NonFiniteError, ShapeError

__all__ = [
    "QKVShapes",
    "AttentionInputs",
    "MaskSpec",
    "prepare_attention",
    "namespace_of",
    "check_finite_array",
    "default_scale",
    "sum_to_shape",
    "check_bool",
    "check_flags",
    "positive_real",
]


def namespace_of(x):
    """``numpy`` or ``cupy``: the module whose functions operate on ``x``."""
    if is_cupy(x):
        import cupy

        return cupy
    return np


def check_finite_array(name, x, *, allow_neg_inf=False):
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or Inf (optionally allowing -inf)."""
    xp = namespace_of(x)
    if x.size == 0:
        return
    if allow_neg_inf:
        bad = bool(xp.isnan(x).any()) or bool(xp.isposinf(x).any())
        what = "NaN or +Inf (-Inf is allowed: it masks)"
    else:
        bad = not bool(xp.isfinite(x).all())
        what = "NaN or Inf"
    if bad:
        raise NonFiniteError(
            f"{name} contains {what}; pass finite inputs or check_finite=False to skip this check"
        )


def check_bool(name, value):
    """``value`` as a bool, or :class:`TypeError` naming ``name`` unless it is a ``bool`` or
    ``numpy.bool_`` (a truthy string such as ``"no"`` is refused, not read as True)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False (a bool); got {value!r} of type "
                    f"{type(value).__name__}")


def check_flags(func):
    """Decorator of a public function: every parameter whose default is a bool
    (``is_causal``, ``return_info``, ``shared_draws``, ...) must be given a bool
    (:func:`check_bool`), read from the signature once."""
    params = inspect.signature(func).parameters
    flags = [name for name, p in params.items() if isinstance(p.default, bool)]
    positional = {name: i for i, (name, p) in enumerate(params.items())
                  if name in flags and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        for name in flags:
            if name in kwargs:
                check_bool(name, kwargs[name])
            elif positional.get(name, len(args)) < len(args):
                check_bool(name, args[positional[name]])
        return func(*args, **kwargs)

    return wrapper


def positive_real(name, value):
    """``value`` as a float, or an error naming ``name`` unless it is a finite real > 0."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
        raise TypeError(f"{name} must be a positive real number; got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive real number; got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return x


def default_scale(head_dim, scale):
    """``1/sqrt(head_dim)`` when ``scale`` is None, else ``scale`` checked to be finite."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number or None; got {scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite; got {scale}")
    return s


@dataclass(frozen=True)
class MaskSpec:
    """Canonical attention mask (see the module docstring).

    Attributes
    ----------
    bias : array or None
        ``[M, R, Nk]`` additive bias in the compute dtype, or None for no mask.
    mask_index : numpy.ndarray of int64 or None
        ``[BH]``: batch row -> slice of ``bias``.
    is_causal : bool
        Key ``j`` is visible to query ``i`` only if ``j <= i`` (top-left aligned, as
        torch's SDPA).
    """

    bias: object
    mask_index: object
    is_causal: bool

    def visible_keys(self, nq, nk):
        """Host bool array ``[BH or 1, Nk]``: keys at least one query may attend to."""
        causal = np.arange(nk) < nq if self.is_causal else np.ones(nk, dtype=bool)
        if self.bias is None:
            return causal[None, :]
        finite = host_copy(self.bias) > -np.inf  # [M, R, Nk]
        if self.is_causal and finite.shape[1] == 1:  # rows broadcast: no [M, Nq, Nk] array
            per_slice = finite[:, 0, :] & causal[None, :]
        elif self.is_causal:
            keep = np.arange(nk)[None, :] <= np.arange(nq)[:, None]
            per_slice = (finite & keep[None]).any(axis=1)
        else:
            per_slice = finite.any(axis=1)
        return per_slice[self.mask_index]

    def allowed_per_row(self, nq, nk):
        """Host array ``[BH or 1, Nq]``: keys each query row may attend to."""
        causal_count = np.minimum(np.arange(nq) + 1, nk) if self.is_causal else np.full(nq, nk)
        if self.bias is None:
            return causal_count[None, :]
        finite = host_copy(self.bias) > -np.inf  # [M, R, Nk]
        if self.is_causal and finite.shape[1] == 1 and nk > 0:  # rows broadcast: running count
            seen = np.cumsum(finite[:, 0, :], axis=-1)  # [M, Nk]: finite keys j' <= j
            per_slice = seen[:, np.minimum(np.arange(nq), nk - 1)]
        elif self.is_causal:
            keep = np.arange(nk)[None, :] <= np.arange(nq)[:, None]  # [Nq, Nk]
            per_slice = (finite & keep[None]).sum(-1)  # [M, Nq]
        else:
            per_slice = np.broadcast_to(finite.sum(-1), (finite.shape[0], nq))
        return per_slice[self.mask_index]


class QKVShapes:
    """Shape properties of canonical ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]``.

    Mixed into the frozen dataclasses that carry checked inputs to kernels.
    """

    @property
    def xp(self):
        return namespace_of(self.q)

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nq(self):
        return self.q.shape[1]

    @property
    def nk(self):
        return self.k.shape[1]

    @property
    def head_dim(self):
        return self.q.shape[2]

    @property
    def value_dim(self):
        return self.v.shape[2]

    @property
    def out_shape(self):
        return tuple(self.batch_shape) + (self.nq, self.value_dim)

    @property
    def empty(self):
        """No (query, key) pair: a zero batch, ``Nq = 0`` or ``Nk = 0``."""
        return self.q.shape[0] == 0 or self.nq == 0 or self.nk == 0

    def zero_output(self):
        """``[BH, Nq, dv]`` zeros: the result of an :attr:`empty` call, whatever the method
        (docs/conventions.md, zero sizes)."""
        return self.xp.zeros((self.q.shape[0], self.nq, self.value_dim), self.dtype)


@dataclass(frozen=True)
class AttentionInputs(QKVShapes):
    """Checked, canonical inputs of one attention call.

    Attributes
    ----------
    q, k, v : array
        ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]`` C-contiguous, compute dtype.
    mask : MaskSpec
    scale : float
    batch_shape : tuple of int
        Broadcast leading dims (output is ``batch_shape + (Nq, dv)``).
    """

    q: object
    k: object
    v: object
    mask: MaskSpec
    scale: float
    batch_shape: tuple

    def problem(self, extra_features=()):
        """The :class:`~mcattn._dispatch.Problem` kernels are selected on."""
        features = set(extra_features)
        if self.mask.bias is not None:
            features.add("mask")
        if self.mask.is_causal:
            features.add("causal")
        return Problem(
            device="cuda" if is_cupy(self.q) else "cpu",
            dtype=self.q.dtype.name,
            head_dim=self.head_dim,
            value_dim=self.value_dim,
            features=frozenset(features),
        )


def sum_to_shape(grad, shape):
    """The gradient of an input of ``shape`` that was broadcast to ``grad.shape``.

    Sums ``grad`` over the leading dims the input lacked and over the dims where the
    input had size 1 (the adjoint of broadcasting).
    """
    shape = tuple(shape)
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise ShapeError(f"cannot reduce a gradient of shape {grad.shape} to {shape}")
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    ones = tuple(i for i, (n, g) in enumerate(zip(shape, grad.shape)) if n == 1 and g != 1)
    if ones:
        grad = grad.sum(axis=ones, keepdims=True)
    return grad.reshape(shape)


def _compute_dtype(named):
    check_same_dtype({name: a.dtype.name for name, a in named.items()})
    dt = next(iter(named.values())).dtype
    if dt not in (np.float32, np.float64):
        raise DTypeError(f"{', '.join(named)} must be float32 or float64 here; got {dt}")
    return dt


def _check_rank(name, x, layout):
    if x.ndim < 2:
        raise ShapeError(f"{name} must have shape {layout} (at least 2 dims); got shape {x.shape}")


def _as_bias(name, mask, dtype, xp, check_finite):
    """A boolean (True = may attend) or additive float mask -> additive bias."""
    if mask.dtype == bool:
        return xp.where(mask, dtype.type(0), dtype.type(-np.inf)).astype(dtype)
    if mask.dtype.kind != "f":
        raise DTypeError(
            f"{name} must be boolean (True = may attend) or floating point (added to the "
            f"scores); got dtype {mask.dtype}"
        )
    if check_finite:
        check_finite_array(name, mask, allow_neg_inf=True)
    return mask.astype(dtype, copy=False)


def _pad_left(shape, ndim):
    return (1,) * (ndim - len(shape)) + tuple(shape)


def canonical_mask(attn_mask, key_padding_mask, is_causal, batch_shape, nq, nk, dtype, xp,
                   check_finite=True):
    """Bring ``attn_mask`` / ``key_padding_mask`` to a :class:`MaskSpec`.

    Parameters
    ----------
    attn_mask : array or None
        Broadcastable to ``batch_shape + (Nq, Nk)``; boolean (True = may attend) or an
        additive float bias (-inf masks).
    key_padding_mask : array or None
        Boolean ``[B, Nk]`` (True = a real key, False = padding), with ``B`` the first
        batch dim; ``[Nk]`` when there are no batch dims.
    is_causal : bool
    batch_shape : tuple of int
    nq, nk : int
    dtype : numpy.dtype
    xp : module
    check_finite : bool
    """
    rank = len(batch_shape) + 2
    target = tuple(batch_shape) + (nq, nk)
    biases = []
    if attn_mask is not None:
        shape = _pad_left(attn_mask.shape, rank)
        if attn_mask.ndim > rank or any(s not in (1, t) for s, t in zip(shape, target)):
            raise ShapeError(
                f"attn_mask must be broadcastable to {target} (batch dims + [Nq, Nk]); "
                f"got shape {attn_mask.shape}"
            )
        biases.append(_as_bias("attn_mask", attn_mask, dtype, xp, check_finite).reshape(shape))
    if key_padding_mask is not None:
        if key_padding_mask.dtype != bool:
            raise DTypeError(
                f"key_padding_mask must be boolean (True = real key); got {key_padding_mask.dtype}"
            )
        expected = tuple(batch_shape[:1]) + (nk,)
        kshape = tuple(key_padding_mask.shape)
        if kshape != expected and kshape != (1,) * len(batch_shape[:1]) + (nk,):
            raise ShapeError(
                f"key_padding_mask must have shape {expected} ([B, Nk] with B the first batch "
                f"dim); got shape {kshape}"
            )
        if batch_shape:  # [B, Nk] -> [B, 1, ..., 1, Nk] (rows broadcast)
            shape = (kshape[0],) + (1,) * (len(batch_shape) - 1) + (1, nk)
        else:
            shape = (1, nk)
        biases.append(_as_bias("key_padding_mask", key_padding_mask, dtype, xp, False).reshape(shape))
    if not biases:
        return MaskSpec(None, None, bool(is_causal))
    bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
    shape = _pad_left(bias.shape, rank)
    bias = bias.reshape(shape)
    if shape[-1] == 1 and nk != 1:
        bias = xp.broadcast_to(bias, shape[:-1] + (nk,))
    lead = shape[:-2]
    m = int(np.prod(lead, dtype=np.int64))
    bias = xp.ascontiguousarray(bias.reshape((m, shape[-2], nk)))
    # Which slice each flattened batch row uses: a broadcast (size-1) dim indexes 0.
    if batch_shape:
        grids = np.indices(batch_shape, dtype=np.int64).reshape(len(batch_shape), -1)
        coords = [g if size > 1 else np.zeros_like(g) for size, g in zip(lead, grids)]
        mask_index = np.ravel_multi_index(coords, lead)
    else:
        mask_index = np.zeros(1, np.int64)
    return MaskSpec(bias, np.ascontiguousarray(mask_index, dtype=np.int64), bool(is_causal))


def prepare_attention(q, k, v, *, attn_mask=None, key_padding_mask=None, is_causal=False,
                      scale=None, check_finite=True):
    """Check ``q, k, v`` and masks and bring them to the canonical layout.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    v : array, shape ``[..., Nk, dv]``
        Native (NumPy or CuPy) arrays of one float dtype; leading dims broadcast.
    attn_mask, key_padding_mask, is_causal : see :func:`canonical_mask`
    scale : float or None
        ``None`` means ``1/sqrt(d)``.
    check_finite : bool
        Raise on NaN/Inf in ``q``, ``k``, ``v`` (and NaN/+Inf in a float mask).

    Returns
    -------
    AttentionInputs
    """
    is_causal = check_bool("is_causal", is_causal)
    check_finite = check_bool("check_finite", check_finite)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rank(name, x, {"q": "[..., Nq, d]", "k": "[..., Nk, d]", "v": "[..., Nk, dv]"}[name])
    dtype = _compute_dtype({"q": q, "k": k, "v": v})
    xp = namespace_of(q)
    nq, d = q.shape[-2:]
    nk, dk = k.shape[-2:]
    nv, dv = v.shape[-2:]
    if dk != d:
        raise ShapeError(f"q and k must share the last dim (head_dim); got q {q.shape} and k {k.shape}")
    if nv != nk:
        raise ShapeError(
            f"k and v must have the same number of keys (dim -2); got k {k.shape} and v {v.shape}"
        )
    if d < 1:
        raise ShapeError(f"head_dim (the last dim of q and k) must be >= 1; got {d}")
    try:
        batch_shape = tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    except ValueError:
        raise ShapeError(
            f"the leading (batch) dims of q {q.shape[:-2]}, k {k.shape[:-2]} and v {v.shape[:-2]} "
            "do not broadcast"
        ) from None
    if check_finite:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite_array(name, x)
    scale = default_scale(d, scale)
    mask = canonical_mask(attn_mask, key_padding_mask, is_causal, batch_shape, nq, nk, dtype, xp,
                          check_finite)
    bh = int(np.prod(batch_shape, dtype=np.int64))

    def to3(x, n, width):
        if x.shape[:-2] != batch_shape:
            x = xp.broadcast_to(x, batch_shape + (n, width))
        return xp.ascontiguousarray(x.reshape((bh, n, width)))

    return AttentionInputs(
        q=to3(q, nq, d), k=to3(k, nk, d), v=to3(v, nk, dv), mask=mask, scale=scale,
        batch_shape=batch_shape,
    )

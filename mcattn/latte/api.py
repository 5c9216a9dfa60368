"""LATTE's public functions: :func:`attention`, :func:`quantize`, :func:`estimate_scores`,
:func:`kept_mask`."""

from dataclasses import dataclass, field

import numpy as np

from .._array import host_copy
from .._device import on_input_device
from .._dispatch import Kernel
from .._door import door
from .._validate import check_flags, positive_real
from ..cost import CallInfo, OpCounts
from ..errors import ShapeError
from ..exact.ops import exact_ops
from . import naive
from ._inputs import prepare_latte
from .ops import latte_ops, visible_per_row
from .posterior import attention_bound

__all__ = ["attention", "quantize", "estimate_scores", "kept_mask", "LatteInfo", "MODES", "KERNELS",
           "MASK_KERNELS"]

MODES = tuple(naive.MODES)

_ALL = frozenset({"mask", "causal", "topk"})

#: LATTE attention kernels: ``forward(lat) -> (out, kept per row, dropped mass per row or None)``.
KERNELS = (
    Kernel("numba", "mcattn.latte.cpu", "forward", max_head_dim=1024, features=_ALL),
    Kernel("numpy", "mcattn.latte.naive", "forward", features=_ALL | {"soft"}),
    Kernel("cupy", "mcattn.latte.cupy", "forward", max_head_dim=128, features=_ALL),
    Kernel("cuda", "mcattn.latte.cuda", "forward", max_head_dim=128, features=_ALL),
)
#: Kept-set kernels: ``kept_mask(lat) -> bool [BH, Nq, Nk]``.
MASK_KERNELS = (
    Kernel("numba", "mcattn.latte.cpu", "kept_mask", max_head_dim=1024, features=_ALL),
    Kernel("numpy", "mcattn.latte.naive", "kept_mask", features=_ALL),
    Kernel("cupy", "mcattn.latte.cupy", "kept_mask", max_head_dim=128, features=_ALL),
    Kernel("cuda", "mcattn.latte.cuda", "kept_mask", max_head_dim=128, features=_ALL),
)


@dataclass(frozen=True)
class LatteInfo(CallInfo):
    """What one :func:`attention` call did.

    Attributes
    ----------
    method, backend, ops, dense_ops
        As :class:`~mcattn.cost.CallInfo`.
    mode, exact_scores : str
    thresholds : numpy.ndarray, ``[H]``
        The thresholds used, per head.
    keep_fraction : float
        Kept (query, key) pairs over visible pairs.
    keep_fraction_per_head : numpy.ndarray, ``[H]``
    kept, visible : int
        Kept and visible (query, key) pairs.
    dropped_mass : float
        Realised exact-attention mass of the dropped keys, mean over the query rows that
        see a key (soft mode: the mean of ``1 - mask`` weighted by attention, not computed: nan).
    dropped_mass_max : float
        Its maximum over rows.
    dropped_mass_rows : numpy.ndarray, ``[..., Nq]``
        Per row.
    reuse_saved : OpCounts
        int4 multiply-adds the ``hi.hi`` reuse avoided (int8 kept scores).
    posterior : mcattn.posterior.PosteriorBound or None
        Certified per-row bound on the output error (:mod:`mcattn.latte.posterior`);
        None in soft mode. Computed when first read (it costs more than the call).
    """

    mode: str = "relative"
    exact_scores: str = "int8"
    thresholds: np.ndarray | None = None
    keep_fraction: float = 1.0
    keep_fraction_per_head: np.ndarray | None = None
    kept: int = 0
    visible: int = 0
    dropped_mass: float = 0.0
    dropped_mass_max: float = 0.0
    dropped_mass_rows: np.ndarray | None = None
    reuse_saved: OpCounts | None = None
    posterior_source: object = field(default=None, repr=False, compare=False)


def _info(lat, kernel, rows):
    inp = lat.inp
    backend = kernel.backend
    kept_rows, dropped_rows, out, soft = rows
    bound = None if soft else (lambda: attention_bound(lat, out))  # computed when read
    kept_rows = np.rint(host_copy(kept_rows))
    kept_rows = host_copy(kept_rows).astype(np.int64)
    vis_rows = visible_per_row(inp)
    heads = lat.num_heads
    kept_h = kept_rows.sum(-1).reshape(-1, heads).sum(0) if heads else np.zeros(0, np.int64)
    vis_h = vis_rows.sum(-1).reshape(-1, heads).sum(0) if heads else np.zeros(0, np.int64)
    ops, saved = latte_ops(lat, kept_rows)
    seen = vis_rows > 0
    if dropped_rows is not None:
        dropped_rows = host_copy(dropped_rows).astype(np.float64)
        mean = float(dropped_rows[seen].mean()) if seen.any() else 0.0
        worst = float(dropped_rows[seen].max()) if seen.any() else 0.0
        rows_out = dropped_rows.reshape(tuple(inp.batch_shape) + (inp.nq,))
    else:
        mean = worst = float("nan")
        rows_out = None
    vis, kept = int(vis_rows.sum()), int(kept_rows.sum())
    return LatteInfo(
        method="latte", backend=backend, ops=ops, dense_ops=exact_ops(inp), mode=lat.mode,
        exact_scores=lat.exact_scores, thresholds=lat.thresholds.copy(),
        keep_fraction=kept / vis if vis else 1.0,
        keep_fraction_per_head=np.where(vis_h > 0, kept_h / np.maximum(vis_h, 1), 1.0),
        kept=kept, visible=vis, dropped_mass=mean, dropped_mass_max=worst,
        dropped_mass_rows=rows_out, reuse_saved=saved, posterior_source=bound,
    )


@on_input_device
@check_flags
def attention(q, k, v, *, threshold, mode="relative", attn_mask=None, key_padding_mask=None,
              is_causal=False, scale=None, exact_scores="int8", soft=False, temperature=1.0,
              backend=None, check_finite=True, return_info=False):
    """LATTE attention: softmax over the keys each query keeps, times ``v``.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    v : array, shape ``[..., Nk, dv]``
        NumPy or CuPy arrays, or torch / JAX / TensorFlow tensors (through DLPack);
        leading dims broadcast, the last of them is the head dim ``H``.
    threshold : float or array of shape ``[H]``
        Per head. ``relative`` / ``safe``: distance below the row's best estimate in
        logit units (``>= 0``; ``inf`` keeps every key); ``absolute``: the estimate a
        key must reach; ``topk``: keys kept per query (whole number ``>= 1``).
    mode : {"relative", "absolute", "topk", "safe"}
        The keep rule (see :func:`kept_mask`).
    attn_mask, key_padding_mask, is_causal, scale
        As :func:`mcattn.attention` (``scale`` must be > 0). Masked and future keys are
        never kept.
    exact_scores : {"int8", "float"}
        Kept scores from the int8 values (``s_q s_k q8.k8``, reusing ``hi.hi``) or in
        full precision (``q.k``).
    soft : bool, default False
        The trainable form's forward: every visible key weighted by
        ``sigmoid((est - (max est - threshold)) / temperature)`` (relative mode, numpy
        backend; the backward pass belongs to the autograd adapters).
    temperature : float, default 1.0
        Of the soft mask, > 0.
    backend : {None, "numpy", "numba", "cuda", "cupy"}
        ``None`` picks the fastest capable backend for the inputs' device (GPU kernels:
        head dims <= 128).
    check_finite : bool, default True
    return_info : bool, default False
        Also return a :class:`LatteInfo` (this computes the exact attention mass of the
        dropped keys too, an extra pass over the scores; ``info.posterior``, the certified
        per-row error bound of :mod:`mcattn.latte.posterior`, is computed when read).

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
        Same array type, device and dtype as ``q``; rows with no visible key are zero.
    info : LatteInfo
        Only with ``return_info=True``.

    Raises
    ------
    ShapeError, DTypeError, NonFiniteError, BackendError, ValueError
        ``ValueError``: threshold NaN, negative (relative/safe), not a whole number >= 1
        (topk), unknown mode or ``exact_scores``, ``scale <= 0``, ``temperature <= 0``.

    Examples
    --------
    >>> import numpy as np, mcattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 4, 256, 64), dtype=np.float32) for _ in range(3))
    >>> out, info = mcattn.latte.attention(q, k, v, threshold=3.0, return_info=True)
    >>> out.shape, 0 < info.keep_fraction < 1
    ((1, 4, 256, 64), True)
    """
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        nonlocal temperature
        if soft:
            if mode != "relative":
                raise ValueError(f"soft=True takes mode='relative'; got mode={mode!r}")
            temperature = positive_real("temperature", temperature)
        lat = prepare_latte(a["q"], a["k"], a["v"], threshold=threshold, mode=mode,
                            attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
                            is_causal=is_causal, scale=scale, exact_scores=exact_scores,
                            check_finite=check_finite, want_mass=return_info and not soft)
        features = ({"soft"} if soft else set()) | ({"topk"} if mode == "topk" else set())
        return lat, lat.inp.problem(features)

    def run(lat, kernel):
        inp = lat.inp
        if inp.empty:  # no (query, key) pair: zeros, on every backend (docs/conventions.md)
            out, kept_rows = inp.zero_output(), np.zeros((inp.q.shape[0], inp.nq))
            dropped = kept_rows if lat.want_mass else None
        elif soft:
            out, frac = naive.soft_forward(lat, temperature)
            kept_rows, dropped = frac * visible_per_row(inp), None
        else:
            out, kept_rows, dropped = kernel(lat)
        out = out.reshape(inp.out_shape)
        return out, (kept_rows, dropped, out, soft)

    return door("latte attention", arrays, ("q", "k", "v"), prepare, run, _info,
                kernels=KERNELS, backend=backend, return_info=return_info)


@on_input_device
def quantize(x):
    """Symmetric int8 quantisation per row.

    Parameters
    ----------
    x : array, shape ``[..., N, d]``, float

    Returns
    -------
    x8 : array of int8, shape ``[..., N, d]``
        ``clip(rint(x / scale), -127, 127)``.
    scale : array of float32, shape ``[..., N, 1]``
        ``max|x_row| / 127`` (stored in float32); 1 for a zero row. Elementwise
        ``|x - scale * x8| <= scale / 2``.
    """
    def prepare(a):
        xa = a["x"]
        if xa.ndim < 1:
            raise ShapeError(f"x must have shape [..., N, d]; got shape {xa.shape}")
        return (xa if xa.dtype in (np.float32, np.float64) else xa.astype(np.float32)), None

    return door("latte quantize", {"x": x}, ("x",), prepare,
                lambda xa, _: (naive.quantize_rows(xa), None))


def _plain_inputs(a, is_causal, scale, threshold=0.0, mode="relative", check_finite=True):
    """:class:`LatteInputs` of native ``q``, ``k`` and masks ``a`` (``v``: a slice of ``k``)."""
    return prepare_latte(a["q"], a["k"], a["k"][..., :1], threshold=threshold, mode=mode,
                         attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
                         is_causal=is_causal, scale=scale, exact_scores="int8",
                         check_finite=check_finite, want_mass=False)


@on_input_device
def estimate_scores(q, k, *, scale=None):
    """The MS4B score estimate ``scale s_q s_k 256 hi(q8) . hi(k8)``.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    scale : float, optional
        Default ``1/sqrt(d)``.

    Returns
    -------
    array, shape ``[..., Nq, Nk]``
        In the compute dtype of ``q`` (float32 or float64), computed in float64. For
        analysis and plots: it is ``Nq x Nk`` by nature.
    """
    arrays = {"q": q, "k": k, "attn_mask": None, "key_padding_mask": None}

    def run(lat, _):
        inp = lat.inp
        out = inp.xp.zeros((inp.q.shape[0], inp.nq, inp.nk), dtype=inp.dtype)
        for b in range(out.shape[0]):
            u, c = naive.estimate_units(lat, b)
            out[b] = (c[:, None] * u).astype(inp.dtype)
        return out.reshape(tuple(inp.batch_shape) + (inp.nq, inp.nk)), None

    return door("latte estimate_scores", arrays, ("q", "k"),
                lambda a: (_plain_inputs(a, False, scale), None), run)


@on_input_device
@check_flags
def kept_mask(q, k, *, threshold, mode="relative", attn_mask=None, key_padding_mask=None,
              is_causal=False, scale=None, backend=None, check_finite=True):
    """The keys each query keeps.

    Modes (``est`` the estimate of :func:`estimate_scores` plus an additive mask):

    * ``"relative"``: ``est >= row_max(est) - threshold``;
    * ``"absolute"``: ``est >= threshold``;
    * ``"topk"``: ``est >=`` the ``threshold``-th largest ``est`` of the row (ties at the
      cut are all kept; a row with fewer visible keys keeps them all);
    * ``"safe"``: ``est + eps >= max(est - eps) - threshold`` with ``eps`` the
      estimate's error bound (:func:`mcattn.latte.bounds.estimate_error_bound`): no key
      whose true score is within ``threshold`` of the true row maximum is dropped.

    Every row keeps at least its best key; masked and (causal) future keys are never
    kept. The rules are evaluated in exact arithmetic (see :mod:`mcattn.latte.naive`),
    so every backend keeps the same keys.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    threshold : float or array ``[H]``
    mode, attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As :func:`attention`.

    Returns
    -------
    array of bool, shape ``[..., Nq, Nk]``
    """
    arrays = {"q": q, "k": k, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        lat = _plain_inputs(a, is_causal, scale, threshold, mode, check_finite)
        return lat, lat.inp.problem({"topk"} if mode == "topk" else ())

    def run(lat, kernel):
        inp = lat.inp
        return kernel(lat).reshape(tuple(inp.batch_shape) + (inp.nq, inp.nk)), None

    return door("latte kept_mask", arrays, ("q", "k"), prepare, run, kernels=MASK_KERNELS,
                backend=backend)

"""Hybrid attention's public function, :func:`attention`."""

from dataclasses import dataclass, field

import numpy as np

from .._array import host_copy
from .._device import on_input_device
from .._dispatch import Kernel
from .._door import door
from .._validate import check_flags
from ..cost import CallInfo
from ..exact.ops import exact_ops
from ..latte._inputs import prepare_latte
from ..latte.ops import visible_per_row
from .naive import REMAINDERS
from .ops import hybrid_ops
from .posterior import attention_bound

__all__ = ["attention", "HybridInfo", "KERNELS", "MODES", "REMAINDERS"]

#: Keep rules of the kept set (LATTE's, without ``safe``).
MODES = ("relative", "absolute", "topk")

#: ``forward(lat, remainder, block) -> (out, kept per row, remainder share per row)``.
KERNELS = (
    Kernel("numba", "mcattn.hybrid.cpu", "forward", max_head_dim=1024, features={"mask", "causal", "topk"}),
    Kernel("numpy", "mcattn.hybrid.naive", "forward", features={"mask", "causal", "topk"}),
    # the reference in CuPy array operations (no RawKernel yet: the GPU-methods issue)
    Kernel("cupy", "mcattn.hybrid.naive", "forward", features={"mask", "causal", "topk"}),
)


@dataclass(frozen=True)
class HybridInfo(CallInfo):
    """What one :func:`attention` call did.

    Attributes
    ----------
    method, backend, ops, dense_ops
        As :class:`~mcattn.cost.CallInfo`.
    mode, remainder : str
    block : int
    thresholds : numpy.ndarray ``[H]``
    keep_fraction : float
        Kept (exactly scored) pairs over visible pairs.
    kept, visible : int
    remainder_share : float
        Mean over rows of the remainder's share of the row's weight.
    remainder_share_rows : numpy.ndarray ``[..., Nq]``
    posterior : mcattn.posterior.PosteriorBound
        Certified per-row bound on the output error (:mod:`mcattn.hybrid.posterior`),
        computed when first read.
    """

    mode: str = "topk"
    remainder: str = "pooled"
    block: int = 16
    thresholds: np.ndarray | None = None
    keep_fraction: float = 1.0
    kept: int = 0
    visible: int = 0
    remainder_share: float = 0.0
    remainder_share_rows: np.ndarray | None = None
    posterior_source: object = field(default=None, repr=False, compare=False)


def _check(remainder, mode, block):
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {', '.join(map(repr, REMAINDERS))}; got {remainder!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be an int >= 1; got {block!r}")
    return int(block)


@on_input_device
@check_flags
def attention(q, k, v, *, threshold, mode="topk", remainder="pooled", block=16, attn_mask=None,
              key_padding_mask=None, is_causal=False, scale=None, backend=None, check_finite=True,
              return_info=False):
    """Hybrid sparse + pooled attention: exact scores on the keys LATTE's estimate keeps,
    each key block's dropped keys pooled into one estimated mass and their mean value.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    v : array, shape ``[..., Nk, dv]``
        Leading dims broadcast; the last of them is the head dim ``H``.
    threshold : float or array ``[H]``
        LATTE's keep threshold per head (:func:`mcattn.latte.kept_mask`): keys per query
        for ``topk``, logit units below the row's best estimate for ``relative``.
    mode : {"topk", "relative", "absolute"}
    remainder : {"pooled", "none"}
        ``"none"`` is LATTE with exact float kept scores. See :mod:`mcattn.hybrid.naive`.
    block : int, default 16
        Keys per block of the pooled remainder.
    attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As :func:`mcattn.attention`. Masked and future keys are neither kept nor pooled.
        ``backend``: ``"numba"``, ``"numpy"`` (the reference) or ``"cupy"`` (the reference in
        CuPy array operations; no RawKernel yet).
    return_info : bool
        Also return a :class:`HybridInfo`.

    Returns
    -------
    out : array ``[..., Nq, dv]``
        Same array type, device and dtype as ``q``; rows with no visible key are zero.
    info : HybridInfo
        Only with ``return_info=True``.

    Examples
    --------
    >>> import numpy as np, mcattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 64, 16)) for _ in range(3))
    >>> out = mcattn.attention(q, k, v, method="hybrid", threshold=16)
    >>> out.shape
    (1, 2, 64, 16)
    """
    block = _check(remainder, mode, block)
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        lat = prepare_latte(a["q"], a["k"], a["v"], threshold=threshold, mode=mode,
                            attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
                            is_causal=is_causal, scale=scale, exact_scores="float",
                            check_finite=check_finite, want_mass=False)
        return lat, lat.inp.problem({"topk"} if mode == "topk" else set())

    def run(lat, kernel):
        inp = lat.inp
        if inp.empty:
            rows = np.zeros((inp.q.shape[0], inp.nq))
            out = inp.zero_output().reshape(inp.out_shape)
            return out, (rows, rows, out)
        out, kept, share = kernel(lat, remainder, block)
        out = out.reshape(inp.out_shape)
        return out, (kept, share, out)

    def info(lat, kernel, rows):
        inp = lat.inp
        kept_rows = host_copy(rows[0]).astype(np.int64)
        share = host_copy(rows[1]).astype(np.float64)
        vis_rows = visible_per_row(inp)
        seen = vis_rows > 0
        vis, kept = int(vis_rows.sum()), int(kept_rows.sum())
        return HybridInfo(method="hybrid", backend=kernel.backend,
                          ops=hybrid_ops(lat, kept_rows, remainder, block), dense_ops=exact_ops(inp),
                          mode=mode, remainder=remainder, block=block,
                          thresholds=lat.thresholds.copy(), keep_fraction=kept / vis if vis else 1.0,
                          kept=kept, visible=vis,
                          remainder_share=float(share[seen].mean()) if seen.any() else 0.0,
                          remainder_share_rows=share.reshape(tuple(inp.batch_shape) + (inp.nq,)),
                          posterior_source=lambda: attention_bound(lat, rows[2], remainder, block))

    return door("hybrid attention", arrays, ("q", "k", "v"), prepare, run, info,
                kernels=KERNELS, backend=backend, return_info=return_info)

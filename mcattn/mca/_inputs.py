"""Input checks of Monte-Carlo attention: the value weight, the sampling, the tables and
the arrays of one :func:`mcattn.mca.attention` call."""

import numpy as np

from .._validate import check_finite_array, prepare_attention
from ..errors import DTypeError, ShapeError
from .naive import WeightTables

__all__ = ["SAMPLINGS", "check_weight", "check_sampling", "check_tables", "prepare_mca"]

SAMPLINGS = ("weight", "optimal")


def check_weight(w, b, num_heads, d_in=None):
    if w.ndim != 2:
        raise ShapeError(f"w must have shape [d_in, num_heads * d_head]; got shape {w.shape}")
    if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer; got {num_heads!r}")
    if w.shape[1] % num_heads:
        raise ShapeError(
            f"num_heads={num_heads} does not divide the projection width w.shape[1]={w.shape[1]}"
        )
    if d_in is not None and w.shape[0] != d_in:
        raise ShapeError(f"w must have d_in={d_in} rows to match x's last dim; got w {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ShapeError(f"b must have shape [{w.shape[1]}] (the projection width); got {b.shape}")


def check_sampling(sampling, shared_draws):
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}")
    if shared_draws and sampling != "weight":
        raise ValueError("shared_draws=True needs sampling='weight' (per-token probabilities "
                         "cannot share one draw sequence)")


def check_tables(tables, w, num_heads):
    if tables is None:
        return
    if not isinstance(tables, WeightTables):
        raise TypeError(f"tables must come from mcattn.mca.weight_tables; got {type(tables).__name__}")
    if tables.shape != tuple(w.shape) or tables.num_heads != num_heads:
        raise ShapeError(f"tables were built for a {tables.shape} weight with {tables.num_heads} "
                         f"heads; this call has w {tuple(w.shape)} and num_heads={num_heads}")


def prepare_mca(a, *, num_heads, sampling, shared_draws, tables, is_causal, scale, check_finite):
    """Checked inputs of :func:`mcattn.mca.attention` from its native arrays ``a``.

    Returns
    -------
    inp : mcattn._validate.AttentionInputs
        ``prepare_attention(q, k, k, ...)`` (the values are estimated, not given).
    x, w, b : arrays
        ``x [..., Nk, d_in]`` as given (not yet broadcast), ``w_v``, ``b_v``.
    """
    q, k, x, w, b = a["q"], a["k"], a["x"], a["w_v"], a["b_v"]
    check_sampling(sampling, shared_draws)
    for name, arr, layout in (("q", q, "[..., H, Nq, d_head]"), ("k", k, "[..., H, Nk, d_head]")):
        if arr.ndim < 3:
            raise ShapeError(f"{name} must have shape {layout}; got {arr.shape}")
    if x.ndim < 2:
        raise ShapeError(f"x must have shape [..., Nk, d_in]; got {x.shape}")
    if q.shape[-3] != num_heads or k.shape[-3] not in (1, num_heads):  # k may be shared by the heads
        raise ShapeError(f"q must have num_heads={num_heads} heads in dim -3 and k as many or 1; "
                         f"got q {q.shape} and k {k.shape}")
    if num_heads:  # zero heads: mcattn.mca.api checks w_v (it must have no columns)
        check_weight(w, b, num_heads, x.shape[-1])
        check_tables(tables, w, num_heads)
    nk = x.shape[-2]
    if k.shape[-2] != nk:
        raise ShapeError(f"x must have one row per key: k has Nk={k.shape[-2]}, x has {nk} rows")
    if x.dtype != q.dtype or w.dtype != q.dtype or (b is not None and b.dtype != q.dtype):
        raise DTypeError(f"q, k, x, w_v, b_v must share one dtype; got q={q.dtype}, x={x.dtype}, "
                         f"w_v={w.dtype}" + ("" if b is None else f", b_v={b.dtype}"))
    if check_finite:
        for name, arr in (("x", x), ("w_v", w), ("b_v", b)):
            if arr is not None:
                check_finite_array(name, arr)
    inp = prepare_attention(q, k, k, attn_mask=a["attn_mask"],
                            key_padding_mask=a["key_padding_mask"], is_causal=is_causal,
                            scale=scale, check_finite=check_finite)
    batch_shape = tuple(inp.batch_shape)  # [..., H]
    lead = batch_shape[:-1]
    try:
        np.broadcast_shapes(lead, x.shape[:-2])
    except ValueError:
        raise ShapeError(f"the batch dims of q/k {lead} and x {x.shape[:-2]} do not broadcast") from None
    return inp, x, w, b

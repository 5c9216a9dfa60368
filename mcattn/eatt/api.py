"""E-Att's public functions: codes, selective projection, scores, :func:`attention`, :func:`layer`."""

from dataclasses import dataclass, field

import numpy as np

from .._array import import_arrays, is_cupy
from .._device import on_input_device
from .._dispatch import Kernel, select_kernel
from .._door import door, qkv_inputs
from .._validate import check_finite_array, check_flags, default_scale, namespace_of, prepare_attention
from ..cost import CallInfo, OpCounts
from ..errors import DTypeError, ShapeError
from ..exact.ops import exact_ops
from . import naive
from ._inputs import (
    check_alignment,
    check_bias,
    check_binary,
    check_matrix,
    check_packed,
    import_any,
    positive_scale,
)
from .ops import alignment_ops, attention_counts, dense_projection_ops, pairs_rows, projection_ops

__all__ = ["binarize", "pack_bits", "unpack_bits", "selective_projection", "l1_scores",
           "hamming_scores", "attention", "layer", "EAttInfo", "KERNELS", "PROJECTION_KERNELS"]

_ALL = frozenset({"mask", "causal"})

#: E-Att attention kernels, one per backend (each runs both alignments).
KERNELS = (
    Kernel("numba", "mcattn.eatt.cpu", "forward", features=_ALL),
    Kernel("numpy", "mcattn.eatt.naive", "forward", features=_ALL),
    Kernel("cupy", "mcattn.eatt.cupy", "forward", max_head_dim=128, features=_ALL),
    Kernel("cuda", "mcattn.eatt.cuda", "forward", max_head_dim=128, features=_ALL),
)
#: Selective-projection kernels (packed bits in, rows of ``w`` summed).
PROJECTION_KERNELS = (
    Kernel("numba", "mcattn.eatt.cpu", "selective_projection"),
    Kernel("numpy", "mcattn.eatt.naive", "selective_projection"),
    Kernel("cupy", "mcattn.eatt.naive", "selective_projection"),
)


@dataclass(frozen=True)
class EAttInfo(CallInfo):
    """What an E-Att call did (``return_info=True``).

    Attributes
    ----------
    alignment : str
        ``"l1"`` or ``"hamming"``.
    alignment_ops : OpCounts
        The alignment's share of ``ops``: query/key projections (in :func:`layer`) and
        the scores, up to the softmax.
    dense_alignment_ops : OpCounts
        The same for dot-product attention: dense query/key projections and ``q k^T``.
    """

    alignment: str = "l1"
    alignment_ops: OpCounts = field(default_factory=OpCounts)
    dense_alignment_ops: OpCounts = field(default_factory=OpCounts)


# ----------------------------------------------------------------------------- codes


@on_input_device
def binarize(x):
    """``1[x > 0]``: the binary codes E-Att projects.

    Parameters
    ----------
    x : array, shape ``[..., d]``
        Floating point (the paper binarises the layer-normalised hidden states).

    Returns
    -------
    array of bool, shape ``[..., d]``
        Same array type and device as ``x``.
    """
    return door("eatt binarize", {"x": x}, None, lambda a: (a["x"], None),
                lambda x, _: (naive.binarize(x), None))


@on_input_device
def pack_bits(b):
    """Pack 0/1 codes 64 to a ``uint64`` word.

    Parameters
    ----------
    b : array, shape ``[..., d]``
        Booleans or numbers that are all 0 or 1.

    Returns
    -------
    array of uint64, shape ``[..., ceil(d / 64)]``
        Bit ``i`` of word ``w`` is ``b[..., 64 w + i]``; the padding bits of the last
        word are 0. Same array type and device as ``b``.

    Raises
    ------
    ValueError
        ``b`` holds a value other than 0 and 1.
    DTypeError, ShapeError
    """
    bridge, native = import_any("b", b)
    if native.ndim < 1 or native.shape[-1] < 1:
        raise ShapeError(f"b must have shape [..., d] with d >= 1; got {native.shape}")
    return bridge.export(naive.pack_bits(check_binary("b", native)))


@on_input_device
def unpack_bits(words, d):
    """Inverse of :func:`pack_bits`.

    Parameters
    ----------
    words : array of uint64, shape ``[..., W]``
    d : int
        Number of codes, ``64 (W - 1) < d <= 64 W``.

    Returns
    -------
    array of bool, shape ``[..., d]``
    """
    bridge, native = import_any("words", words)
    check_packed("words", native, d)
    return bridge.export(naive.unpack_bits(native, int(d)))


# ----------------------------------------------------------------------------- projection


def _projection(bits_or_words, w, bias, packed, backend):
    """``[T, d_out]`` selective projection of native 2-D inputs; returns (out, kernel, ones)."""
    from .._dispatch import Problem

    d_in, d_out = w.shape
    words = bits_or_words if packed else naive.pack_bits(bits_or_words)
    problem = Problem(device="cuda" if is_cupy(w) else "cpu", dtype=w.dtype.name, head_dim=1,
                      value_dim=1)
    kernel = select_kernel("selective projection", PROJECTION_KERNELS, problem, backend)
    if kernel.backend == "numba":
        out = kernel(words, w, bias)
    else:
        out = kernel(naive.unpack_bits(words, d_in), w, bias)
    ones = int(naive.popcount64(words).sum()) if words.size else 0
    return out, kernel, ones


@on_input_device
@check_flags
def selective_projection(b, w, bias=None, *, backend=None, check_finite=True, return_info=False):
    """``b @ w + bias`` for binary ``b``, as sums of the selected rows of ``w`` (no multiplies).

    Parameters
    ----------
    b : array, shape ``[..., d_in]`` or ``[..., ceil(d_in / 64)]``
        Binary codes: booleans or 0/1 numbers, or ``uint64`` words from :func:`pack_bits`
        (recognised by the dtype; ``d_in`` then comes from ``w``).
    w : array, shape ``[d_in, d_out]``
        Floating point; decides the output dtype.
    bias : array, shape ``[d_out]``, optional
    backend : {None, "numpy", "numba", "cupy"}
    check_finite : bool, default True
    return_info : bool, default False
        Also return a :class:`~mcattn.cost.CallInfo` (``dense_ops``: the dense product).

    Returns
    -------
    out : array, shape ``[..., d_out]``
    info : CallInfo
        Only with ``return_info=True``.

    Raises
    ------
    ValueError
        ``b`` holds values other than 0/1, or packed words with padding bits set.
    ShapeError
        The width of ``b`` does not match ``w`` (``d_in`` codes or ``ceil(d_in/64)`` words).
    DTypeError
    """
    bridge, a = import_arrays({"w": w, "bias": bias}, float_names=("w", "bias"))
    w, bias = a["w"], a["bias"]
    _, codes = import_any("b", b)
    if w.ndim != 2:
        raise ShapeError(f"w must have shape [d_in, d_out]; got {w.shape}")
    d_in, d_out = w.shape
    if w.dtype not in (np.float32, np.float64):
        raise DTypeError(f"w must be float32 or float64 here; got {w.dtype}")
    if bias is not None:
        if bias.shape != (d_out,):
            raise ShapeError(f"bias must have shape ({d_out},) (d_out of w); got {bias.shape}")
    if check_finite:
        check_finite_array("w", w)
        if bias is not None:
            check_finite_array("bias", bias)
    if (is_cupy(codes)) != is_cupy(w):
        raise ValueError("b and w live on different devices; move them first")
    packed = codes.dtype == np.uint64
    if packed:
        check_packed("b", codes, d_in)
    else:
        if codes.ndim < 1 or codes.shape[-1] != d_in:
            raise ShapeError(f"b must have d_in={d_in} codes in its last dim (the rows of w), or "
                             f"{(d_in + 63) // 64} packed uint64 words; got shape {codes.shape}")
        codes = check_binary("b", codes)
    lead = codes.shape[:-1]
    xp = namespace_of(w)
    flat = xp.ascontiguousarray(codes.reshape((-1, codes.shape[-1])))
    out, kernel, ones = _projection(flat, xp.ascontiguousarray(w), bias, packed, backend)
    result = bridge.export(out.reshape(lead + (d_out,)))
    if not return_info:
        return result
    tokens = int(np.prod(lead, dtype=np.int64))
    info = CallInfo(method="eatt", backend=kernel.backend,
                    ops=projection_ops(tokens, ones, d_in, d_out, bias is not None),
                    dense_ops=dense_projection_ops(tokens, d_in, d_out, bias is not None))
    return result, info


# ----------------------------------------------------------------------------- scores


@on_input_device
@check_flags
def l1_scores(q, k, *, scale=None, check_finite=True):
    """E-Att's alignment scores ``-||q_i - k_j||_1 * scale``.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
        Leading dims broadcast.
    scale : float, optional
        Positive; default ``1/sqrt(d)`` (the paper's ``c = sqrt(d)``).
    check_finite : bool, default True

    Returns
    -------
    array, shape ``[..., Nq, Nk]``
        In the dtype of ``q`` (float16/bfloat16 computed in float32).
    """
    def prepare(a):
        inp = prepare_attention(a["q"], a["k"], a["k"], check_finite=check_finite)  # shapes, dtypes
        return (a["q"], a["k"], positive_scale(default_scale(inp.head_dim, scale))), None

    def run(call, _):
        q, k, s = call
        out = naive.l1_distance(q, k)
        out *= -out.dtype.type(s)
        return out, None

    return door("eatt l1_scores", {"q": q, "k": k}, None, prepare, run)


@on_input_device
def hamming_scores(qb, kb):
    """Hamming distances ``popcount(qb xor kb)`` of packed binary codes.

    Parameters
    ----------
    qb : array of uint64, shape ``[..., Nq, W]``
    kb : array of uint64, shape ``[..., Nk, W]``
        Codes packed by :func:`pack_bits` (for example ``pack_bits(binarize(q))``).

    Returns
    -------
    array of int64, shape ``[..., Nq, Nk]``
        The number of differing bits (the L1 distance of the 0/1 codes). As a score,
        ``-scale * distance`` is what ``attention(..., alignment="hamming")`` uses.
    """
    bridge, qn = import_any("qb", qb)
    _, kn = import_any("kb", kb)
    for name, x in (("qb", qn), ("kb", kn)):
        if x.dtype != np.uint64:
            raise DTypeError(f"{name} must be packed uint64 words (see pack_bits); got {x.dtype}")
        if x.ndim < 2:
            raise ShapeError(f"{name} must have shape [..., N, W]; got {x.shape}")
    if qn.shape[-1] != kn.shape[-1]:
        raise ShapeError(f"qb and kb must have the same number of words; got {qn.shape} and {kn.shape}")
    if is_cupy(qn) != is_cupy(kn):
        raise ValueError("qb and kb live on different devices; move them first")
    try:
        np.broadcast_shapes(qn.shape[:-2], kn.shape[:-2])
    except ValueError:
        raise ShapeError(f"the batch dims of qb {qn.shape} and kb {kn.shape} do not broadcast") from None
    return bridge.export(naive.hamming_distance(qn, kn))


# ----------------------------------------------------------------------------- attention


def _run_attention(inp, alignment, backend):
    """Kernel output ``[BH, Nq, dv]`` and the kernel, for canonical inputs."""
    positive_scale(inp.scale)
    kernel = select_kernel("eatt attention", KERNELS, inp.problem(), backend)
    return _kernel_output(inp, alignment, kernel), kernel


def _kernel_output(inp, alignment, kernel):
    """``kernel``'s output ``[BH, Nq, dv]`` for canonical inputs (zeros with no pair)."""
    if inp.empty:
        return inp.zero_output()
    codes = None
    if alignment == "hamming":
        codes = (naive.pack_bits(inp.q > 0), naive.pack_bits(inp.k > 0))
    return kernel(inp, alignment, codes)


@on_input_device
@check_flags
def attention(q, k, v, *, alignment="l1", attn_mask=None, key_padding_mask=None, is_causal=False,
              scale=None, backend=None, check_finite=True, return_info=False):
    """E-Att attention on projected queries and keys: ``softmax(-scale * dist(q, k)) v``.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    v : array, shape ``[..., Nk, dv]``
        Leading dims broadcast (``[B, H]`` typical).
    alignment : {"l1", "hamming"}
        ``"l1"``: ``dist = ||q_i - k_j||_1`` (the paper). ``"hamming"``: the number of
        differing signs, ``popcount(pack(q > 0) xor pack(k > 0))``, i.e. the L1 distance
        of the binarised ``q`` and ``k`` (beyond the paper).
    attn_mask, key_padding_mask, is_causal
        As in :func:`mcattn.attention` (``key_padding_mask`` ``[B, Nk]``, True = real key).
    scale : float, optional
        Positive; default ``1/sqrt(d)``.
    backend : {None, "numpy", "numba", "cuda", "cupy"}
    check_finite : bool, default True
    return_info : bool, default False
        Also return an :class:`EAttInfo` (``ops``: no multiplication in the alignment).

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
        Same array type, device and dtype as ``q``; rows with no visible key are zero.
    info : EAttInfo
        Only with ``return_info=True``.

    Raises
    ------
    ShapeError, DTypeError, NonFiniteError, BackendError, ValueError
    """
    check_alignment(alignment)
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        inp = qkv_inputs(a, is_causal=is_causal, scale=scale, check_finite=check_finite)
        positive_scale(inp.scale)
        return inp, inp.problem()

    def run(inp, kernel):
        return _kernel_output(inp, alignment, kernel).reshape(inp.out_shape), None

    def info(inp, kernel, _):
        align, rest, dense_align = attention_counts(inp, alignment)
        return EAttInfo(method="eatt", backend=kernel.backend, ops=align + rest,
                        dense_ops=exact_ops(inp), alignment=alignment, alignment_ops=align,
                        dense_alignment_ops=dense_align)

    return door("eatt attention", arrays, ("q", "k", "v"), prepare, run, info, kernels=KERNELS,
                backend=backend, return_info=return_info)


@on_input_device
@check_flags
def layer(x, w_q, w_k, w_v, *, num_heads, b_q=None, b_k=None, b_v=None, w_o=None, b_o=None,
          alignment="l1", attn_mask=None, key_padding_mask=None, is_causal=False, scale=None,
          backend=None, check_finite=True, return_info=False):
    """The paper's attention block from hidden states.

    ``b = binarize(x)``; ``Q = b W_Q + b_Q`` and ``K = b W_K + b_K`` by selective
    projection (their total width is ``d_model / h`` in the paper, ``d_model / h^2`` per
    head); ``V = x W_V + b_V`` in full precision; per head ``softmax(-scale ||q_i -
    k_j||_1) V``; heads concatenated, then ``@ W_O + b_O`` if ``w_o`` is given.

    Parameters
    ----------
    x : array, shape ``[B, N, d_model]``
        Hidden states (the paper binarises the layer-normalised input: pass that).
    w_q, w_k : array, shape ``[d_model, d_qk]``
        ``d_qk`` divisible by ``num_heads`` (the paper: ``d_qk = d_model / num_heads``).
    w_v : array, shape ``[d_model, d_v]``
        ``d_v`` divisible by ``num_heads``.
    num_heads : int
    b_q, b_k, b_v : array, shape ``[d_qk]`` / ``[d_v]``, optional
    w_o : array, shape ``[d_v, d_out]``, optional
    b_o : array, shape ``[d_out]``, optional
    alignment, attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As in :func:`attention` (masks over ``[B, H, N, N]``; ``scale`` default
        ``1/sqrt(d_qk / num_heads)``).
    return_info : bool, default False
        Also return an :class:`EAttInfo`. Its ``dense_ops`` are the vanilla block with
        the same ``d_model``, heads and value width: dense ``Q, K, V`` projections of
        width ``d_v``, dot-product attention, the same output projection; all tokens are
        counted on both sides (the kernels compute every token).

    Returns
    -------
    out : array, shape ``[B, N, d_v]`` (or ``[B, N, d_out]`` with ``w_o``)
    info : EAttInfo
        Only with ``return_info=True``.
    """
    check_alignment(alignment)
    names = ("x", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o", "b_o")
    values = (x, w_q, w_k, w_v, b_q, b_k, b_v, w_o, b_o)
    bridge, a = import_arrays({**dict(zip(names, values)), "attn_mask": attn_mask,
                               "key_padding_mask": key_padding_mask}, float_names=names)
    x = a["x"]
    if x.ndim != 3:
        raise ShapeError(f"x must have shape [B, N, d_model]; got {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise DTypeError(f"x must be float32 or float64 here; got {x.dtype}")
    batch, n, d_model = x.shape
    heads = int(num_heads)
    for name in ("w_q", "w_k", "w_v"):
        if a[name] is None:
            raise ValueError(f"{name} is required")
        check_matrix(name, a[name], d_model, x.dtype)
    d_qk, d_v = a["w_q"].shape[1], a["w_v"].shape[1]
    if a["w_k"].shape[1] != d_qk:
        raise ShapeError(f"w_q and w_k must have the same width; got {a['w_q'].shape} and {a['w_k'].shape}")
    if heads < 1 or d_qk % heads or d_v % heads:
        raise ShapeError(f"num_heads={num_heads} must divide the widths of w_q/w_k ({d_qk}) and "
                         f"w_v ({d_v})")
    check_bias("b_q", a["b_q"], d_qk, x.dtype)
    check_bias("b_k", a["b_k"], d_qk, x.dtype)
    check_bias("b_v", a["b_v"], d_v, x.dtype)
    if a["w_o"] is not None:
        check_matrix("w_o", a["w_o"], d_v, x.dtype)
        check_bias("b_o", a["b_o"], a["w_o"].shape[1], x.dtype)
    elif a["b_o"] is not None:
        raise ValueError("b_o is given without w_o")
    if check_finite:
        for name in names:
            if a[name] is not None:
                check_finite_array(name, a[name])
    xp = namespace_of(x)
    tokens = batch * n
    words = naive.pack_bits(naive.binarize(x.reshape(tokens, d_model)))
    q, proj_kernel, ones = _projection(words, a["w_q"], a["b_q"], True, _projection_backend(backend))
    k, _, _ = _projection(words, a["w_k"], a["b_k"], True, _projection_backend(backend))
    v = x.reshape(tokens, d_model) @ a["w_v"]
    if a["b_v"] is not None:
        v += a["b_v"]

    def heads_first(t, width):
        return t.reshape(batch, n, heads, width // heads).transpose(0, 2, 1, 3)

    kpm = a["key_padding_mask"]
    inp = prepare_attention(heads_first(q, d_qk), heads_first(k, d_qk), heads_first(v, d_v),
                            attn_mask=a["attn_mask"], key_padding_mask=kpm, is_causal=is_causal,
                            scale=scale, check_finite=False)
    out, kernel = _run_attention(inp, alignment, backend)
    out = out.reshape(batch, heads, n, d_v // heads).transpose(0, 2, 1, 3).reshape(batch, n, d_v)
    if a["w_o"] is not None:
        out = out @ a["w_o"]
        if a["b_o"] is not None:
            out += a["b_o"]
    result = bridge.export(xp.ascontiguousarray(out))
    if not return_info:
        return result
    has = {name: a[name] is not None for name in names}
    sel = (projection_ops(tokens, ones, d_model, d_qk, has["b_q"])
           + projection_ops(tokens, ones, d_model, d_qk, has["b_k"]))
    binarise = OpCounts({"fp32_cmp": tokens * d_model})
    align, rest, _ = attention_counts(inp, alignment)
    value_proj = dense_projection_ops(tokens, d_model, d_v, has["b_v"])
    out_proj = OpCounts()
    if has["w_o"]:
        out_proj = dense_projection_ops(tokens, d_v, a["w_o"].shape[1], has["b_o"])
    # The vanilla block: dense Q, K, V of width d_v, dot-product attention, same W_O.
    dense_inp = prepare_attention(heads_first(v, d_v), heads_first(v, d_v), heads_first(v, d_v),
                                  attn_mask=a["attn_mask"], key_padding_mask=kpm,
                                  is_causal=is_causal, check_finite=False)
    dense_qk = (dense_projection_ops(tokens, d_model, d_v, has["b_q"])
                + dense_projection_ops(tokens, d_model, d_v, has["b_k"]))
    pairs, _ = pairs_rows(dense_inp)
    dense_align = dense_qk + alignment_ops("dot", pairs, batch * heads * n, batch * heads * n,
                                           d_v // heads)
    info = EAttInfo(
        method="eatt", backend=kernel.backend,
        ops=binarise + sel + align + rest + value_proj + out_proj,
        dense_ops=dense_qk + exact_ops(dense_inp) + value_proj + out_proj,
        alignment=alignment, alignment_ops=binarise + sel + align, dense_alignment_ops=dense_align,
    )
    return result, info


def _projection_backend(backend):
    """The selective projection's backend for an attention ``backend`` (``cuda``: by device)."""
    return None if backend == "cuda" else backend

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

from dataclasses import dataclass, field

import numpy as np

from .._array import ArrayBridge, _framework_to_native, array_kind, import_arrays, is_cupy
from .._device import on_input_device
from .._dispatch import Kernel, select_kernel
from .._validate import (
    check_finite_array,
    check_flags,
    default_scale,
    namespace_of,
    prepare_attention,
)
from ..cost import CallInfo, OpCounts
from ..errors import DTypeError, ShapeError
from ..exact import exact_ops
from . import naive

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

ALIGNMENTS = ("l1", "hamming")
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


# ----------------------------------------------------------------------------- counts


def alignment_ops(alignment, pairs, queries, keys, head_dim, scale=None):
    """Operations of the scores, for ``pairs`` visible (query, key) pairs.

    Parameters
    ----------
    alignment : {"l1", "hamming", "dot"}
        ``"dot"`` is exact attention's ``scale * q k^T`` (``q`` scaled once per row).
    pairs : int
        Visible (query, key) pairs.
    queries, keys : int
        Rows of ``q`` and ``k`` (over every batch row).
    head_dim : int
    scale : float, optional
        With ``scale == 1`` the L1 alignment scales nothing (no multiplication at all).

    Returns
    -------
    OpCounts
    """
    d = int(head_dim)
    if alignment == "dot":
        return OpCounts({"fp32_mul": pairs * d + queries * d, "fp32_add": pairs * d})
    if alignment == "l1":
        scaling = 0 if scale == 1.0 else (queries + keys) * d
        return OpCounts({"fp32_mul": scaling, "fp32_add": 2 * pairs * d})
    if alignment == "hamming":
        words = (d + 63) // 64
        return OpCounts({"fp32_cmp": (queries + keys) * d, "bit_xor64": pairs * words,
                         "popcount64": pairs * words, "int32_add": pairs * words,
                         "fp32_mul": d + 1})
    raise ValueError(f"alignment must be one of {ALIGNMENTS + ('dot',)}; got {alignment!r}")


def softmax_value_ops(pairs, rows, value_dim, has_bias=False):
    """Softmax and ``P V`` for ``pairs`` visible pairs and ``rows`` rows with a visible key.

    Per pair: a compare (max), a subtract, an exp, an add (sum), ``dv`` multiply-adds;
    an add for an additive mask; per row a reciprocal and ``dv`` multiplies.
    """
    dv = int(value_dim)
    return OpCounts({"fp32_mul": pairs * dv + rows * dv,
                     "fp32_add": pairs * (dv + 2) + (pairs if has_bias else 0),
                     "fp32_cmp": pairs, "fp32_exp": pairs, "fp32_div": rows})


def projection_ops(tokens, ones, d_in, d_out, has_bias=False):
    """Selective projection of ``tokens`` binary rows holding ``ones`` set bits in all.

    One ``select`` per (token, input bit, output column) and one ``fp32_add`` per
    selected row and output column, plus ``d_out`` adds per token for a bias.
    """
    return OpCounts({"select": tokens * d_in * d_out,
                     "fp32_add": ones * d_out + (tokens * d_out if has_bias else 0)})


def dense_projection_ops(tokens, d_in, d_out, has_bias=False):
    """A dense projection ``x @ w (+ b)`` of ``tokens`` rows: multiply-adds (and the bias adds)."""
    return OpCounts({"fp32_mul": tokens * d_in * d_out,
                     "fp32_add": tokens * (d_in + (1 if has_bias else 0)) * d_out})


def _pairs_rows(inp):
    per_row = inp.mask.allowed_per_row(inp.nq, inp.nk)  # [BH or 1, Nq]
    bh = inp.q.shape[0]
    times = bh if per_row.shape[0] == 1 else 1
    return int(per_row.sum()) * times, int(np.count_nonzero(per_row)) * times


def _attention_counts(inp, alignment):
    pairs, rows = _pairs_rows(inp)
    bh = inp.q.shape[0]
    align = alignment_ops(alignment, pairs, bh * inp.nq, bh * inp.nk, inp.head_dim, inp.scale)
    rest = softmax_value_ops(pairs, rows, inp.value_dim, inp.mask.bias is not None)
    dense_align = alignment_ops("dot", pairs, bh * inp.nq, bh * inp.nk, inp.head_dim)
    return align, rest, dense_align


# ----------------------------------------------------------------------------- codes


def _import_any(name, x):
    """One array argument of any dtype -> (bridge, native NumPy/CuPy array)."""
    kind = array_kind(x)
    if kind in ("numpy", "cupy"):
        native = x
    elif kind == "other":
        native = np.asarray(x)
    else:
        native = _framework_to_native(x, kind, name)
    device = "cuda" if is_cupy(native) else "cpu"
    return ArrayBridge(kind=kind, device=device, input_dtype=str(native.dtype)), native


def _check_binary(name, b):
    """``b`` holds only 0/1 (or booleans); returns it as bool."""
    if b.dtype == bool:
        return b
    if b.dtype.kind not in "iuf":
        raise DTypeError(f"{name} must hold 0/1 values (bool, integer or float); got dtype {b.dtype}")
    xp = namespace_of(b)
    if b.size and not bool(xp.all((b == 0) | (b == 1))):
        bad = b[(b != 0) & (b != 1)].ravel()[:3]
        raise ValueError(f"{name} must hold only 0 and 1 (binarize first); found values such as "
                         f"{[float(v) for v in bad]}")
    return b != 0


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
    bridge, a = import_arrays({"x": x})
    return bridge.export(naive.binarize(a["x"]))


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
    bridge, native = _import_any("b", b)
    if native.ndim < 1 or native.shape[-1] < 1:
        raise ShapeError(f"b must have shape [..., d] with d >= 1; got {native.shape}")
    return bridge.export(naive.pack_bits(_check_binary("b", native)))


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
    bridge, native = _import_any("words", words)
    _check_packed("words", native, d)
    return bridge.export(naive.unpack_bits(native, int(d)))


def _check_packed(name, words, d):
    if words.dtype != np.uint64:
        raise DTypeError(f"{name} must be packed uint64 words (see pack_bits); got dtype {words.dtype}")
    expected = (int(d) + 63) // 64
    if words.ndim < 1 or words.shape[-1] != expected:
        raise ShapeError(f"{name} must have {expected} uint64 words in its last dim for {d} codes "
                         f"(ceil({d}/64)); got shape {words.shape}")
    pad = expected * 64 - int(d)
    if pad and words.size:
        xp = namespace_of(words)
        spill = words[..., -1] >> np.uint64(64 - pad)
        if bool(xp.any(spill != 0)):
            raise ValueError(f"{name} has bits set beyond code {d} (the padding of its last word "
                             "must be 0)")


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
    _, codes = _import_any("b", b)
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
        _check_packed("b", codes, d_in)
    else:
        if codes.ndim < 1 or codes.shape[-1] != d_in:
            raise ShapeError(f"b must have d_in={d_in} codes in its last dim (the rows of w), or "
                             f"{(d_in + 63) // 64} packed uint64 words; got shape {codes.shape}")
        codes = _check_binary("b", codes)
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
    bridge, a = import_arrays({"q": q, "k": k})
    q, k = a["q"], a["k"]
    inp = prepare_attention(q, k, k, check_finite=check_finite)  # shapes, dtypes, finiteness
    s = _positive_scale(default_scale(inp.head_dim, scale))
    out = naive.l1_distance(q, k)
    out *= -out.dtype.type(s)
    return bridge.export(out)


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
    bridge, qn = _import_any("qb", qb)
    _, kn = _import_any("kb", kb)
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


def _positive_scale(s):
    if not s > 0:
        raise ValueError(f"scale must be positive for a distance alignment; got {s}")
    return s


# ----------------------------------------------------------------------------- attention


def _check_alignment(alignment):
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}; got {alignment!r}")


def _run_attention(inp, alignment, backend):
    """Kernel output ``[BH, Nq, dv]`` and the kernel, for canonical inputs."""
    _positive_scale(inp.scale)
    kernel = select_kernel("eatt attention", KERNELS, inp.problem(), backend)
    if inp.empty:
        return inp.zero_output(), kernel
    codes = None
    if alignment == "hamming":
        codes = (naive.pack_bits(inp.q > 0), naive.pack_bits(inp.k > 0))
    return kernel(inp, alignment, codes), kernel


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
    _check_alignment(alignment)
    bridge, a = import_arrays(
        {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask},
        float_names=("q", "k", "v"),
    )
    inp = prepare_attention(
        a["q"], a["k"], a["v"], attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
        is_causal=is_causal, scale=scale, check_finite=check_finite,
    )
    out, kernel = _run_attention(inp, alignment, backend)
    result = bridge.export(out.reshape(inp.out_shape))
    if not return_info:
        return result
    align, rest, dense_align = _attention_counts(inp, alignment)
    return result, EAttInfo(method="eatt", backend=kernel.backend, ops=align + rest,
                            dense_ops=exact_ops(inp), alignment=alignment, alignment_ops=align,
                            dense_alignment_ops=dense_align)


def _check_matrix(name, w, d_in, dtype):
    if w is None:
        return
    if w.ndim != 2 or w.shape[0] != d_in:
        raise ShapeError(f"{name} must have shape [{d_in}, width] (d_model rows); got {w.shape}")
    if w.dtype != dtype:
        raise DTypeError(f"{name} must have the dtype of x ({dtype}); got {w.dtype}")


def _check_bias(name, b, width, dtype):
    if b is None:
        return
    if b.shape != (width,):
        raise ShapeError(f"{name} must have shape ({width},); got {b.shape}")
    if b.dtype != dtype:
        raise DTypeError(f"{name} must have the dtype of x ({dtype}); got {b.dtype}")


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
    _check_alignment(alignment)
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
        _check_matrix(name, a[name], d_model, x.dtype)
    d_qk, d_v = a["w_q"].shape[1], a["w_v"].shape[1]
    if a["w_k"].shape[1] != d_qk:
        raise ShapeError(f"w_q and w_k must have the same width; got {a['w_q'].shape} and {a['w_k'].shape}")
    if heads < 1 or d_qk % heads or d_v % heads:
        raise ShapeError(f"num_heads={num_heads} must divide the widths of w_q/w_k ({d_qk}) and "
                         f"w_v ({d_v})")
    _check_bias("b_q", a["b_q"], d_qk, x.dtype)
    _check_bias("b_k", a["b_k"], d_qk, x.dtype)
    _check_bias("b_v", a["b_v"], d_v, x.dtype)
    if a["w_o"] is not None:
        _check_matrix("w_o", a["w_o"], d_v, x.dtype)
        _check_bias("b_o", a["b_o"], a["w_o"].shape[1], x.dtype)
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
    align, rest, _ = _attention_counts(inp, alignment)
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
    pairs, _ = _pairs_rows(dense_inp)
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

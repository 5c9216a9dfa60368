"""Exact softmax attention: the baseline every approximation is measured against.

``out = softmax(scale * q k^T + mask) v`` with the conventions of
``torch.nn.functional.scaled_dot_product_attention`` (argument names, boolean masks
with True = may attend, additive float masks, top-left causal mask, ``scale=None``
meaning ``1/sqrt(d)``). A query row with no visible key returns zeros.
"""

from .._array import import_arrays
from .._device import on_input_device
from .._dispatch import Kernel, select_kernel
from .._validate import check_flags, prepare_attention
from ..cost import CallInfo, OpCounts

__all__ = ["attention", "attention_probs", "exact_ops", "KERNELS", "PROBS_KERNELS"]

_ALL = frozenset({"mask", "causal"})

#: The exact-attention kernels, one per backend.
KERNELS = (
    Kernel("numba", "mcattn.exact.cpu", "forward", features=_ALL),
    Kernel("numpy", "mcattn.exact.naive", "forward", features=_ALL),
    Kernel("cupy", "mcattn.exact.cupy", "forward", max_head_dim=128, features=_ALL),
    Kernel("cuda", "mcattn.exact.cuda", "forward", max_head_dim=128, features=_ALL),
)
#: The probability-matrix kernels (array-namespace code: NumPy on the host, CuPy on GPU).
PROBS_KERNELS = (
    Kernel("numpy", "mcattn.exact.naive", "probs", features=_ALL),
    Kernel("cupy", "mcattn.exact.naive", "probs", features=_ALL),
)


def exact_ops(inp, value_dim=None):
    """Operations exact attention needs for canonical inputs ``inp``.

    Only visible (query, key) pairs are counted: masked keys and the causal upper
    triangle cost nothing to a mask-aware kernel, so padding does not flatter a method
    compared with this baseline. Per visible pair: ``d`` multiply-adds for the score, a
    compare (max), a subtract, an exp and an add (sum), ``dv`` multiply-adds for ``P V``;
    per query row: ``d`` multiplies to scale ``q``, one reciprocal and ``dv`` multiplies
    to normalise; plus an add per pair for an additive mask.

    Parameters
    ----------
    inp : mcattn._validate.AttentionInputs
    value_dim : int, optional
        Width of the values (default: that of ``inp.v``).

    Returns
    -------
    OpCounts
    """
    import numpy as np

    per_row = inp.mask.allowed_per_row(inp.nq, inp.nk)  # [BH or 1, Nq]
    bh = inp.q.shape[0]
    pairs = int(per_row.sum()) * (bh if per_row.shape[0] == 1 else 1)
    rows = int(np.count_nonzero(per_row)) * (bh if per_row.shape[0] == 1 else 1)
    d, dv = inp.head_dim, inp.value_dim if value_dim is None else value_dim
    counts = {
        "fp32_mul": pairs * (d + dv) + bh * inp.nq * d + rows * dv,
        "fp32_add": pairs * (d + dv + 2) + (pairs if inp.mask.bias is not None else 0),
        "fp32_cmp": pairs,
        "fp32_exp": pairs,
        "fp32_div": rows,
    }
    return OpCounts(counts)


@on_input_device
@check_flags
def attention(q, k, v, *, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None,
              backend=None, check_finite=True, return_info=False):
    """Exact softmax attention.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
        Queries. NumPy, CuPy, or a torch / JAX / TensorFlow tensor (through DLPack).
    k : array, shape ``[..., Nk, d]``
        Keys.
    v : array, shape ``[..., Nk, dv]``
        Values. The leading dims of ``q``, ``k``, ``v`` broadcast (``[B, H]`` typical).
    attn_mask : array, optional
        Broadcastable to ``[..., Nq, Nk]``. Boolean: True = may attend. Float: added
        to the scores (``-inf`` masks).
    key_padding_mask : array of bool, optional
        ``[B, Nk]`` with ``B`` the first batch dim: True = a real key, False = padding
        (the convention of Hugging Face's ``attention_mask``; note that
        ``torch.nn.MultiheadAttention`` uses the opposite).
    is_causal : bool, default False
        Query ``i`` sees keys ``j <= i`` (top-left aligned, as torch's SDPA). May be
        combined with the masks.
    scale : float, optional
        Score scale; default ``1/sqrt(d)``.
    backend : {None, "numpy", "numba", "cuda", "cupy"}
        ``None`` picks the fastest capable backend for the inputs' device.
    check_finite : bool, default True
        Raise :class:`~mcattn.errors.NonFiniteError` on NaN/Inf inputs.
    return_info : bool, default False
        Also return a :class:`~mcattn.cost.CallInfo` with the operation counts.

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
        Same array type, device and dtype as ``q`` (float16/bfloat16 are computed in
        float32). Rows with no visible key are zero.
    info : CallInfo
        Only with ``return_info=True``.

    Raises
    ------
    ShapeError, DTypeError, NonFiniteError, BackendError, GradientNotSupportedError

    Examples
    --------
    >>> import numpy as np, mcattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 128, 64), dtype=np.float32) for _ in range(3))
    >>> mcattn.attention(q, k, v, is_causal=True).shape
    (2, 4, 128, 64)
    """
    bridge, a = import_arrays(
        {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask},
        float_names=("q", "k", "v"),
    )
    inp = prepare_attention(
        a["q"], a["k"], a["v"], attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
        is_causal=is_causal, scale=scale, check_finite=check_finite,
    )
    kernel = select_kernel("exact attention", KERNELS, inp.problem(), backend)
    out = (inp.zero_output() if inp.empty else kernel(inp)).reshape(inp.out_shape)
    result = bridge.export(out)
    if not return_info:
        return result
    ops = exact_ops(inp)
    return result, CallInfo(method="exact", backend=kernel.backend, ops=ops, dense_ops=ops)


@on_input_device
@check_flags
def attention_probs(q, k, *, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None,
                    backend=None, check_finite=True, return_info=False):
    """The attention probability matrix ``softmax(scale * q k^T + mask)``.

    This matrix is ``Nq x Nk`` by nature: use it when the probabilities themselves are
    needed (Monte-Carlo attention's budgets, analysis), not to compute attention
    outputs (use :func:`attention`, which never builds it).

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., Nk, d]``
    attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As in :func:`attention`.
    return_info : bool, default False
        Also return a :class:`~mcattn.cost.CallInfo`: the scores, the softmax and one
        multiply per visible entry to normalise it (no ``P V``).

    Returns
    -------
    array, shape ``[..., Nq, Nk]``
        Rows sum to 1; a row with no visible key is all zeros.
    info : CallInfo
        Only with ``return_info=True``.
    """
    bridge, a = import_arrays(
        {"q": q, "k": k, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask},
        float_names=("q", "k"),
    )
    # The value argument is irrelevant here: k stands in for it (shape [..., Nk, d]).
    inp = prepare_attention(
        a["q"], a["k"], a["k"], attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
        is_causal=is_causal, scale=scale, check_finite=check_finite,
    )
    kernel = select_kernel("attention_probs", PROBS_KERNELS, inp.problem(), backend)
    out = kernel(inp).reshape(tuple(inp.batch_shape) + (inp.nq, inp.nk))
    result = bridge.export(out)
    if not return_info:
        return result
    scores = exact_ops(inp, value_dim=0)
    ops = scores + OpCounts({"fp32_mul": scores["fp32_exp"]})  # one normalising multiply per entry
    return result, CallInfo(method="attention_probs", backend=kernel.backend, ops=ops, dense_ops=ops)

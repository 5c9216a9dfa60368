"""Exact attention's public functions: :func:`attention` and :func:`attention_probs`."""

from .._device import on_input_device
from .._dispatch import Kernel
from .._door import door, qkv_inputs
from .._validate import check_flags
from ..cost import CallInfo, OpCounts
from .ops import exact_ops

__all__ = ["attention", "attention_probs", "KERNELS", "PROBS_KERNELS"]

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
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        inp = qkv_inputs(a, is_causal=is_causal, scale=scale, check_finite=check_finite)
        return inp, inp.problem()

    return door("exact attention", arrays, ("q", "k", "v"), prepare, _run, _info,
                kernels=KERNELS, backend=backend, return_info=return_info)


def _run(inp, kernel):
    return (inp.zero_output() if inp.empty else kernel(inp)).reshape(inp.out_shape), None


def _info(inp, kernel, _):
    ops = exact_ops(inp)
    return CallInfo(method="exact", backend=kernel.backend, ops=ops, dense_ops=ops)


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
    arrays = {"q": q, "k": k, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        # The value argument is irrelevant here: k stands in for it (shape [..., Nk, d]).
        inp = qkv_inputs(a, is_causal=is_causal, scale=scale, check_finite=check_finite, v="k")
        return inp, inp.problem()

    return door("attention_probs", arrays, ("q", "k"), prepare, _run_probs, _probs_info,
                kernels=PROBS_KERNELS, backend=backend, return_info=return_info)


def _run_probs(inp, kernel):
    return kernel(inp).reshape(tuple(inp.batch_shape) + (inp.nq, inp.nk)), None


def _probs_info(inp, kernel, _):
    scores = exact_ops(inp, value_dim=0)
    ops = scores + OpCounts({"fp32_mul": scores["fp32_exp"]})  # one normalising multiply per entry
    return CallInfo(method="attention_probs", backend=kernel.backend, ops=ops, dense_ops=ops)

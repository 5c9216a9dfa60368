"""The one way into a method: import -> prepare -> choose a kernel -> run -> export -> info.

Every method's public array functions (``mcattn.<method>.api``) do the same around their
kernel: bring the caller's arrays to native NumPy/CuPy arrays (:func:`import_arrays`),
check and canonicalise them, choose the backend (:func:`select_kernel`), run it, give the
result back in the caller's array type (:meth:`ArrayBridge.export`) and, with
``return_info=True``, describe the call (a :class:`~mcattn.cost.CallInfo`). :func:`door`
is that sequence written once; a method supplies only its own pieces.

The order is part of the contract: errors of the arrays themselves (mixed libraries,
dtypes) come before the method's checks, which come before a :class:`BackendError`.
"""

from ._array import import_arrays
from ._dispatch import select_kernel
from ._validate import prepare_attention

__all__ = ["door", "qkv_inputs"]


def door(what, arrays, float_names, prepare, run, info=None, *, kernels=(), backend=None,
         return_info=False):
    """Run one public call of a method.

    Parameters
    ----------
    what : str
        What is computed, for :class:`~mcattn.errors.BackendError` (``"exact attention"``).
    arrays : dict[str, array or None]
        The caller's arrays by argument name (masks and array knobs included).
    float_names : sequence of str or None
        The data arrays among them (floating point, one dtype; ``None``: every array; see
        :func:`import_arrays`).
    prepare : callable ``(a) -> (call, problem)``
        Checks and canonicalises the native arrays ``a`` (a dict like ``arrays``):
        ``call`` is what the kernel and the info need (e.g.
        :class:`~mcattn._validate.AttentionInputs`), ``problem`` the
        :class:`~mcattn._dispatch.Problem` the kernel is chosen for, or ``None`` when
        ``run`` chooses its kernels itself.
    run : callable ``(call, kernel) -> (out, extra)``
        Computes the native output in its final shape (an array, or a tuple of arrays
        exported one by one); ``extra`` is passed to ``info``.
        ``kernel`` is ``None`` when ``problem`` was.
    info : callable ``(call, kernel, extra) -> CallInfo``, optional
        Builds what ``return_info=True`` returns beside the output.
    kernels : sequence of Kernel
        The method's kernel table for this function.
    backend : str or None
        The caller's choice (``None``: the fastest capable kernel).
    return_info : bool

    Returns
    -------
    out : array
        In the caller's array type, device and dtype.
    info : CallInfo
        Only with ``return_info=True``.
    """
    bridge, a = import_arrays(arrays, float_names=float_names)
    call, problem = prepare(a)
    kernel = None if problem is None else select_kernel(what, kernels, problem, backend)
    out, extra = run(call, kernel)
    result = tuple(map(bridge.export, out)) if isinstance(out, tuple) else bridge.export(out)
    if not return_info:
        return result
    return result, info(call, kernel, extra)


def qkv_inputs(a, *, is_causal, scale, check_finite, v="v"):
    """:func:`~mcattn._validate.prepare_attention` of a door's native ``q``, ``k``, ``v`` and
    masks ``a`` (``v="k"``: ``k`` stands in for values a function does not take)."""
    return prepare_attention(a["q"], a["k"], a[v], attn_mask=a["attn_mask"],
                             key_padding_mask=a["key_padding_mask"], is_causal=is_causal,
                             scale=scale, check_finite=check_finite)

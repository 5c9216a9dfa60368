"""Helpers shared by the tests: references, error measures, optional imports."""

import importlib
import os

import numpy as np
import pytest

__all__ = ["require", "rel_error", "dense_attention", "GPU_PRESENT", "to_device", "host", "torch_grads",
           "method_knobs"]

GPU_PRESENT = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0")


def require(module):
    """Import an optional dependency; a missing one FAILS the test.

    CI installs every optional dependency, so a missing one there is a broken install,
    not a reason to skip. On a developer machine without them, set
    ``MCATTN_ALLOW_MISSING=1`` to skip instead.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = (f"optional dependency {module!r} is missing ({exc}); install "
                   "'mcattn[all]' or set MCATTN_ALLOW_MISSING=1 to skip")
        if os.environ.get("MCATTN_ALLOW_MISSING") == "1":
            pytest.skip(message)
        pytest.fail(message)


def rel_error(out, ref):
    """``||out - ref|| / ||ref||`` in float64 (0 when both are 0)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    if denom == 0:
        return float(num)
    return float(num / denom)


def dense_attention(q, k, v, *, mask=None, is_causal=False, scale=None):
    """Float64 dense reference, independent of mcattn: full score matrix, then softmax.

    ``mask`` is boolean (True = may attend) or additive float, broadcast to the scores.
    Rows with no visible key are zeros.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if mask is not None:
        mask = np.asarray(mask)
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        nq, nk = s.shape[-2:]
        s = np.where(np.tril(np.ones((nq, nk), dtype=bool)), s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    total = p.sum(axis=-1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    return p @ v


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar ``f()`` with respect to the array ``x``
    (changed in place and restored), float64."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        a = f()
        x[i] = old - eps
        b = f()
        x[i] = old
        g[i] = (a - b) / (2 * eps)
    return g


def grad_problem(seed=0, nq=7, nk=9, d=8):
    """``q [2,3,nq,d]``, ``k [2,1,nk,d]`` (broadcast over heads), ``v [2,3,nk,5]``, a boolean
    ``[nq, nk]`` mask (key 0 always visible), a key-padding mask and a ``dout``, float64."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 3, nq, d))
    k = rng.standard_normal((2, 1, nk, d))  # broadcast over heads: its gradient sums them
    v = rng.standard_normal((2, 3, nk, 5))
    mask = rng.random((nq, nk)) > 0.3
    mask[:, 0] = True
    kpm = np.ones((2, nk), bool)
    kpm[1, nk - 3:] = False
    return q, k, v, mask, kpm, rng.standard_normal((2, 3, nq, 5))


def to_device(*arrays):
    """The arrays on the GPU (CuPy) when one is present; as they are under the simulator
    (numba.cuda's simulated kernels take host arrays). None stays None."""
    if not GPU_PRESENT:
        return arrays
    import cupy

    return tuple(None if a is None else cupy.asarray(a) for a in arrays)


def host(a):
    """A NumPy copy of a CuPy or host array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def torch_grads(fn, tensors, dout):
    """Gradients of ``sum(fn(*tensors) * dout)`` with respect to ``tensors`` (torch)."""
    for t in tensors:
        t.grad = None
    (fn(*tensors) * dout).sum().backward()
    return [t.grad.clone() for t in tensors]


def method_knobs(method, heads, nk, dv, seed=0):
    """Sample knobs of ``method`` for ``mcattn.attention`` with ``heads`` heads, ``nk`` keys and
    values of width ``dv``: the method's own ``Method.knobs_for`` (mcattn/<method>/spec.py), so
    the tests that cover every registered method cover a new one with no edit here."""
    from mcattn.registry import get_method

    return get_method(method).knobs_for(np.random.default_rng(seed), heads, nk, dv)

"""Exact attention as the library runs it (:class:`mcattn._plugin.Method`)."""

import numpy as np

from .._plugin import Check, Method, random_qkv
from . import attention

__all__ = ["METHOD"]

_KPM = np.ones((2, 37), bool)
_KPM[1, 30:] = False


def _forward(put, backend, dtype):
    q, k, v = random_qkv(np.random.default_rng(0), (2, 3, 37, 16), dtype, put)
    return attention(q, k, v, key_padding_mask=put(_KPM), is_causal=True, backend=backend)


def _forward_bench(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(0), (1, 8, n, 64), np.float32, put)
    return lambda: attention(q, k, v, backend=backend)


def _backward(put, backend, dtype):
    """The training pair: forward with lse, then dq, dk, dv (concatenated)."""
    from .._validate import namespace_of
    from . import grad

    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, (2, 3, 37, 16), dtype, put)
    dout = put(rng.standard_normal((2, 3, 37, 16)).astype(dtype))
    mask = {"key_padding_mask": put(_KPM), "is_causal": True}
    out, res = grad.forward(q, k, v, backend=backend, **mask)
    grads = grad.backward(q, k, v, out, res, dout, backend=backend, **mask)
    return namespace_of(out).concatenate([grads[n].reshape(-1) for n in "qkv"])


def _backward_bench(put, backend, n):
    from . import grad

    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, (1, 8, n, 64), np.float32, put)
    dout = put(rng.standard_normal((1, 8, n, 64)).astype(np.float32))

    def step():
        out, res = grad.forward(q, k, v, backend=backend)
        return grad.backward(q, k, v, out, res, dout, backend=backend)

    return step


_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}

METHOD = Method(
    name="exact",
    description="exact softmax attention (streaming, O(N d) memory): the baseline",
    attention=attention,
    grad="mcattn.exact.grad",
    checks={
        "exact": Check(_forward, _TOLERANCE, _forward_bench),
        # Not a method: exact attention's training kernels (forward with lse + backward).
        "exact-bwd": Check(_backward, _TOLERANCE, _backward_bench),
    },
    kernel_sources={"exact/kernels/exact.cu": (
        "mcattn_exact_forward_f32", "mcattn_exact_forward_f64",
        "mcattn_exact_backward_dq_f32", "mcattn_exact_backward_dq_f64",
        "mcattn_exact_backward_dkdv_f32", "mcattn_exact_backward_dkdv_f64",
    ), "exact/kernels/exact_mma.cu": tuple(
        [f"mcattn_exact_mma_forward_{t}_d{d}" for t in ("f16", "bf16") for d in (32, 64, 128)]
        + [f"mcattn_exact_tf32_forward_d{d}" for d in (32, 64, 128)]),
        "exact/kernels/exact_mma_backward.cu": tuple(
            f"mcattn_exact_mma_backward_{p}_{t}_d{d}" for p in ("dq", "dkdv") for t in ("f16", "bf16")
            for d in (32, 64))},
)

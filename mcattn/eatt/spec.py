"""E-Att as the library runs it (:class:`mcattn._plugin.Method`)."""

import numpy as np

from .._plugin import Check, Method, random_qkv, tensor_core_check
from . import attention

__all__ = ["METHOD"]


def _check(put, backend, dtype):
    """Both alignments: L1 with the causal mask and Hamming, concatenated."""
    from .._validate import namespace_of

    q, k, v = random_qkv(np.random.default_rng(4), (2, 2, 33, 16), dtype, put)
    l1 = attention(q, k, v, alignment="l1", is_causal=True, backend=backend)
    hamming = attention(q, k, v, alignment="hamming", backend=backend)
    return namespace_of(l1).concatenate([l1, hamming], axis=-1)


def _bench(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(4), (1, 8, n, 64), np.float32, put)
    return lambda: attention(q, k, v, alignment="l1", backend=backend)


def _check_hamming_mma(put, backend, dtype):
    """Hamming inputs the tensor-core kernel takes (value dim 32, two query blocks, three key tiles)."""
    rng = np.random.default_rng(9)
    q, k, v = (put(rng.standard_normal((2, 2, n, 32)).astype(dtype)) for n in (70, 130, 130))
    return attention(q, k, v, alignment="hamming", is_causal=True, backend=backend)


def _check_l1_mma(put, backend, dtype):
    """L1 inputs the tensor-core kernel takes (head dim 20 in the 32 bucket, value dim 64)."""
    rng = np.random.default_rng(10)
    q, k = (put(rng.standard_normal((2, 2, n, 20)).astype(dtype)) for n in (70, 130))
    v = put(rng.standard_normal((2, 2, 130, 64)).astype(dtype))
    return attention(q, k, v, alignment="l1", is_causal=True, backend=backend)


def _bench_hamming(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(4), (1, 8, n, 64), np.float32, put)
    return lambda: attention(q, k, v, alignment="hamming", backend=backend, check_finite=False)


METHOD = Method(
    name="eatt",
    description="energy-friendly attention (E-Att): L1 or Hamming alignment, no multiplications in "
                "the scores; a different model, needs training",
    attention=attention,
    grad="mcattn.eatt.grad",
    checks={"eatt": Check(_check, {"float32": 1e-5, "float64": 1e-12}, _bench),
            "eatt-mma": tensor_core_check("EATT_TENSOR_CORES", _check_hamming_mma, _bench_hamming),
            "eatt-mma-l1": tensor_core_check("EATT_TENSOR_CORES", _check_l1_mma, _bench)},
    kernel_sources={"eatt/kernels/eatt.cu": ("mcattn_eatt_forward_f32", "mcattn_eatt_forward_f64"),
                    "eatt/kernels/eatt_mma.cu": tuple(f"mcattn_eatt_mma_hamming_{t}_dv{dv}"
                                                      for t in ("f16", "bf16") for dv in (32, 64, 128))
                    + tuple(f"mcattn_eatt_mma_l1_{t}_d{d}_dv{dv}" for t in ("f16", "bf16")
                            for d, dv in ((32, 32), (32, 64), (32, 128), (64, 32), (64, 64)))},
)

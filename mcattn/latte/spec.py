"""LATTE as the library runs it (:class:`mcattn._plugin.Method`).

Inside a transformers model, ``use_method(model, "latte", target_mass=...)`` calibrates
per-head relative thresholds on each layer's own attention (the calibration batch, or
the first batch the layer sees) with :func:`mcattn.latte.calibrate`.
"""

import dataclasses

import numpy as np

from .._plugin import Check, Method, ModelHooks, random_qkv, tensor_core_check
from . import attention, calibrate

__all__ = ["METHOD", "dask_plan"]


def dask_plan(knobs, batch_shape):
    """latte on dask chunks: a per-head threshold ``[H]`` is split with the head dim."""
    from .._dask import ChunkedArray, DaskPlan, is_dask

    knobs = dict(knobs)
    theta = knobs.pop("threshold")
    for name, value in knobs.items():
        if is_dask(value):
            raise TypeError(f"latte's knob {name!r} cannot be a dask array")
    arrays = {}
    if getattr(theta, "ndim", 0) == 1 and len(batch_shape) >= 1:
        arrays["threshold"] = ChunkedArray(theta, (len(batch_shape) - 1,))

    def run(q, k, v, arrays, coords, **common):
        return attention(q, k, v, threshold=arrays.get("threshold", theta), **common, **knobs)

    return DaskPlan(run=run, arrays=arrays)


def _calibrate(layer, options):
    """Per-head thresholds keeping ``target_mass`` of this layer's attention mass."""
    theta = calibrate(layer["q"], layer["k"], target_mass=float(options["target_mass"]),
                      key_padding_mask=layer["key_padding_mask"], scale=layer["scale"])
    return {"threshold": np.asarray(theta, dtype=np.float32)}


def _check(put, backend, dtype):
    q, k, v = random_qkv(np.random.default_rng(5), (2, 3, 29, 16), dtype, put)
    theta = put(np.array([1.0, 2.5, 4.0], dtype))  # per head, logit units
    return attention(q, k, v, threshold=theta, is_causal=True, backend=backend)


def _bench(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(5), (1, 8, n, 64), np.float32, put)
    return lambda: attention(q, k, v, threshold=4.0, backend=backend)


def _check_mma(put, backend, dtype):
    """Inputs the tensor-core kernel takes (head dim 32, two query blocks, three key tiles)."""
    rng = np.random.default_rng(6)
    q, k, v = (put(rng.standard_normal((2, 2, n, 32)).astype(dtype)) for n in (70, 130, 130))
    theta = put(np.array([2.0, 4.0], dtype))
    return attention(q, k, v, threshold=theta, is_causal=True, backend=backend)


def _check_mma_backward(put, backend, dtype):
    """The hard-mask backward on inputs the tensor-core backward takes (head dim 32, causal,
    two query blocks, three key tiles): dq, dk, dv concatenated."""
    from .._validate import namespace_of
    from . import grad

    rng = np.random.default_rng(7)
    q, k, v, dout = (put(rng.standard_normal((2, 2, n, 32)).astype(dtype)) for n in (70, 90, 90, 70))
    theta = put(np.array([2.0, 4.0], dtype))
    grads = grad.backward(q, k, v, None, (), dout, threshold=theta, is_causal=True, backend=backend)
    return namespace_of(q).concatenate([grads[n].reshape(-1) for n in "qkv"])


def _bench_mma_backward(put, backend, n):
    from . import grad

    rng = np.random.default_rng(7)
    q, k, v, dout = random_qkv(rng, (1, 8, n, 64), np.float32, put) + (
        put(rng.standard_normal((1, 8, n, 64)).astype(np.float32)),)

    def step():
        out, res = grad.forward(q, k, v, threshold=4.0, backend=backend)
        return grad.backward(q, k, v, out, res, dout, threshold=4.0, backend=backend)

    return step


METHOD = Method(
    name="latte",
    description="LATTE: a 4-bit (high-nibble) score estimate filters keys per head (thresholds); "
                "exact softmax over the kept keys, reusing the int8 products",
    attention=attention,
    knobs_for=lambda rng, heads, nk, dv: dict(threshold=1.0),
    grad="mcattn.latte.grad",
    dask_plan=dask_plan,
    model=ModelHooks(supplies=("threshold",), consumes=("target_mass",), calibrate=_calibrate,
                     needs_calibration=lambda options: options.get("target_mass") is not None),
    checks={"latte": Check(_check, {"float32": 1e-5, "float64": 1e-12}, _bench),
            "latte-mma": tensor_core_check("LATTE_TENSOR_CORES", _check_mma, _bench),
            # the training step (forward, then backward) up to N = 4k: on_device.sh's selftest time
            "latte-mma-bwd": dataclasses.replace(
                tensor_core_check("LATTE_TENSOR_CORES", _check_mma_backward, _bench_mma_backward),
                bench_max_n=4096)},
    kernel_sources={"latte/kernels/latte.cu": ("mcattn_latte_forward_f32", "mcattn_latte_forward_f64"),
                    "latte/kernels/latte_mma.cu": tuple(f"mcattn_latte_mma_forward_{t}_d{d}"
                                                        for t in ("f16", "bf16") for d in (32, 64, 128)),
                    "latte/kernels/latte_mma_backward.cu": tuple(
                        f"mcattn_latte_mma_backward_{p}_{t}_d{d}" for p in ("dq", "dkdv")
                        for t in ("f16", "bf16") for d in (32, 64))},
)

"""Random feature attention as the library runs it (:class:`mcattn._plugin.Method`)."""

import numpy as np

from .._plugin import Check, Method, random_qkv, tensor_core_check
from . import attention
from .features import RandomFeatures

__all__ = ["METHOD", "dask_plan"]


def dask_plan(knobs, batch_shape):
    """rfa on dask chunks: one draw of features for the whole batch, sliced per head chunk."""
    from .. import random as mrandom
    from .._dask import ChunkedArray, DaskPlan, is_dask

    knobs = dict(knobs)
    features = knobs.pop("features", None)
    num_features = knobs.pop("num_features", None)
    kind = knobs.pop("kind", "positive")
    seed = knobs.pop("seed", None)
    if features is None and num_features is not None:
        seed = mrandom.resolve_seed(seed)  # one seed for every chunk
    gate = knobs.pop("gate", None)
    for name, value in knobs.items():
        if is_dask(value):
            raise TypeError(f"rfa's knob {name!r} cannot be a dask array")
    arrays = {}
    if gate is not None:
        if gate.ndim < 1:
            raise ValueError(f"gate must have shape [..., N]; got {gate.shape}")
        if is_dask(gate):
            import dask.array as da

            gate = da.broadcast_to(gate, tuple(batch_shape) + gate.shape[-1:])
        else:
            gate = np.broadcast_to(gate, tuple(batch_shape) + gate.shape[-1:])
        arrays["gate"] = ChunkedArray(gate, tuple(range(len(batch_shape))))
    drawn = {}

    def run(q, k, v, arrays, coords, **common):
        feats = features
        if feats is None:
            if "all" not in drawn:  # per head of the whole batch, as in memory
                heads = int(batch_shape[-1]) if len(batch_shape) >= 1 and q.ndim >= 3 else None
                drawn["all"] = RandomFeatures(q.shape[-1], num_features, kind=kind, num_heads=heads,
                                              seed=seed)
            feats = drawn["all"]
        if feats.num_heads is not None and coords:
            feats = feats.select_heads(coords[-1])
        return attention(q, k, v, features=feats, gate=arrays.get("gate"), **common, **knobs)

    return DaskPlan(run=run, arrays=arrays)


def _check(put, backend, dtype):
    q, k, v = random_qkv(np.random.default_rng(2), (2, 2, 31, 8), dtype, put)
    feats = RandomFeatures(8, 16, num_heads=2, seed=3)
    return attention(q * 0.5, k * 0.5, v, features=feats, is_causal=True, chunk_size=8, backend=backend)


def _bench(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(2), (1, 8, n, 64), np.float32, put)
    feats = RandomFeatures(64, 128, num_heads=8, seed=3)
    return lambda: attention(q, k, v, features=feats, backend=backend)


def _check_mma(put, backend, dtype):
    # non-causal, value dim 32: the shapes rfa_mma.cu takes (config.RFA_TENSOR_CORES)
    q, k, v = random_qkv(np.random.default_rng(5), (2, 2, 70, 32), dtype, put)
    feats = RandomFeatures(32, 48, num_heads=2, seed=6)
    return attention(q * 0.5, k * 0.5, v, features=feats, backend=backend)


def _check_mma_causal(put, backend, dtype):
    # causal and gated over three chunks of 64 (the last one short): rfa_mma.cu's chunk
    # states, rfa.cu's float32 scan and the causal tile kernel
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, (2, 2, 150, 32), dtype, put)
    gate = put(rng.uniform(0.8, 1.0, (2, 2, 150)).astype(dtype))
    feats = RandomFeatures(32, 48, num_heads=2, seed=8)
    return attention(q * 0.5, k * 0.5, v, features=feats, gate=gate, is_causal=True, backend=backend)


def _bench_causal(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(2), (1, 8, n, 64), np.float32, put)
    feats = RandomFeatures(64, 64, num_heads=8, seed=3)
    return lambda: attention(q, k, v, features=feats, is_causal=True, backend=backend)


METHOD = Method(
    name="rfa",
    description="random feature attention: exp(q.k) by random features, linear time, gate, O(1) decoding",
    attention=attention,
    knobs_for=lambda rng, heads, nk, dv: dict(num_features=8, seed=0),
    grad="mcattn.rfa.grad",
    dask_plan=dask_plan,
    checks={"rfa": Check(_check, {"float32": 1e-4, "float64": 1e-11}, _bench),
            "rfa-mma": tensor_core_check("RFA_TENSOR_CORES", _check_mma, _bench),
            "rfa-mma-causal": tensor_core_check("RFA_TENSOR_CORES", _check_mma_causal, _bench_causal)},
    kernel_sources={"rfa/kernels/rfa_step.cu": ("mcattn_rfa_step_f32", "mcattn_rfa_step_f64"),
                    "rfa/kernels/rfa.cu": (
        "mcattn_rfa_features_f32", "mcattn_rfa_states_f32", "mcattn_rfa_scan_f32", "mcattn_rfa_output_f32",
        "mcattn_rfa_features_f64", "mcattn_rfa_states_f64", "mcattn_rfa_scan_f64", "mcattn_rfa_output_f64",
    ), "rfa/kernels/rfa_mma.cu": tuple(f"mcattn_rfa_mma_{part}_{t}_dv{dv}"
                                       for part in ("states", "output", "chunk_states", "causal")
                                       for t in ("f16", "bf16") for dv in (32, 64, 128))},
)

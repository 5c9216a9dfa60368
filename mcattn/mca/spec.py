"""Monte-Carlo attention as the library runs it (:class:`mcattn._plugin.Method`).

The front door calls :func:`door` (``mcattn.attention(q, k, method="mca", x=, w_v=)``: the
values come from the value projection's input and weight); dask chunks draw by global
batch row (:func:`row_seed`); inside a transformers model the value Linear supplies
``x``, ``w_v`` and ``b_v``.
"""

import numpy as np

from .._plugin import Check, Method, ModelHooks
from .._validate import namespace_of
from ..errors import ShapeError
from . import attention

__all__ = ["METHOD", "door", "dask_plan", "row_seed"]


def door(q, k, v=None, *, x, w_v, b_v=None, alpha, seed=None, sampling="weight", shared_draws=False,
         share="row", tables=None, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None,
         backend=None, check_finite=True, return_info=False):
    """:func:`mcattn.mca.attention` as ``mcattn.attention(q, k, method="mca", x=, w_v=, alpha=)``.

    ``v`` must be None: MCA estimates the values from the value projection's input ``x``
    and weight ``w_v`` (``[d_in, H * d_v]``); the number of heads is ``q.shape[-3]``.
    """
    if v is not None:
        raise TypeError("mca computes the values from x, w_v and b_v; pass v=None")
    shape = np.shape(q)  # any array, or nested lists (imported by mca.attention)
    if len(shape) < 3:
        raise ShapeError(f"mca needs q of shape [..., H, Nq, d]; got {tuple(shape)}")
    return attention(q, k, x, w_v, b_v, num_heads=int(shape[-3]), alpha=alpha, seed=seed,
                     sampling=sampling, shared_draws=shared_draws, share=share, tables=tables,
                     attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                     scale=scale,
                     backend=backend, check_finite=check_finite, return_info=return_info)


def row_seed(seed, row):
    """The seed of global batch row ``row`` when mca runs on dask chunks."""
    return int(np.random.SeedSequence([int(seed), int(row)]).generate_state(1, np.uint64)[0])


def dask_plan(knobs, batch_shape):
    """mca on dask chunks: heads stay whole (``w_v`` holds them all), the batch is split.

    Each batch row draws with :func:`row_seed` of its *global* index, so the result does
    not depend on the chunking (it differs from an in-memory call with the same seed,
    which keys its draws by position in the call).
    """
    from .. import random as mrandom
    from .._dask import ChunkedArray, DaskPlan, is_dask

    if len(batch_shape) < 1:
        raise ValueError("mca needs batch dims [..., H]")
    knobs = dict(knobs)
    x = knobs.pop("x")
    seed = mrandom.resolve_seed(knobs.pop("seed", None))
    for name in ("w_v", "b_v"):
        if is_dask(knobs.get(name)):
            knobs[name] = knobs[name].compute()  # a weight: small, needed whole by every chunk
    lead = tuple(batch_shape[:-1])
    if is_dask(x):
        import dask.array as da

        x = da.broadcast_to(x, lead + x.shape[-2:])
    else:
        x = np.broadcast_to(x, lead + tuple(x.shape[-2:]))
    heads = int(batch_shape[-1])
    value_dim = int(knobs["w_v"].shape[1]) // heads

    def run(q, k, v, arrays, coords, **common):
        xs = arrays["x"]
        rows = np.ravel_multi_index(np.ix_(*coords[:-1]), lead).reshape(-1) if lead else np.zeros(1, int)
        shape = q.shape[:-3]
        q3 = q.reshape((-1,) + q.shape[-3:])
        k3 = k.reshape((-1,) + k.shape[-3:])
        x3 = xs.reshape((-1,) + xs.shape[-2:])
        outs = []
        for i, row in enumerate(rows):
            one = {}
            for name in ("attn_mask", "key_padding_mask"):
                m = common.get(name)
                if m is None:
                    continue
                if name == "key_padding_mask":
                    idx = np.unravel_index(i, shape)[0] if m.shape[0] > 1 else 0
                    one[name] = m[idx: idx + 1]
                else:
                    mm = m.reshape((1,) * (q.ndim - m.ndim) + m.shape)
                    sel = tuple(j if s > 1 else 0 for j, s in zip(np.unravel_index(i, shape), mm.shape))
                    one[name] = mm[sel][None]
            rest = {key: val for key, val in common.items() if key not in one}
            rest.pop("attn_mask", None), rest.pop("key_padding_mask", None)
            outs.append(door(q3[i:i + 1], k3[i:i + 1], x=x3[i:i + 1], seed=row_seed(seed, row),
                             **one, **rest, **knobs))
        xp = namespace_of(outs[0])
        return xp.concatenate(outs).reshape(shape + outs[0].shape[1:])

    return DaskPlan(run=run, arrays={"x": ChunkedArray(x, tuple(range(len(lead))))},
                    value_dim=value_dim, split_dims=tuple(range(len(lead))))


def _knobs_for(rng, heads, nk, dv):
    return dict(x=rng.standard_normal((1, nk, 5)), w_v=rng.standard_normal((5, heads * dv)) / 2,
                alpha=0.5, seed=1)


def _model_knobs(module, q, knobs, calls):
    """mca's knobs from the model: the value Linear's input, weight and bias, a seed per call."""
    import torch

    x = getattr(module.value, "_mcattn_input", None) if module is not None else None
    if x is None:
        raise RuntimeError("mca needs the value projection's input; use_method installs a hook "
                           "on module.value that was not run")
    # With grad on, the live tensors: the value Linear's weight and bias (and what feeds
    # x) get mca's sampled gradients (mcattn.mca.grad); otherwise detached copies.
    keep = (lambda t: t) if torch.is_grad_enabled() else (lambda t: t.detach())  # noqa: E731
    bias = module.value.bias
    extra = dict(knobs, x=keep(x), w_v=keep(module.value.weight).T.contiguous(),
                 b_v=keep(bias) if bias is not None else None)
    seed = knobs.get("seed")
    if seed is not None:  # a different, reproducible seed for every call
        extra["seed"] = int(seed) * 1_000_003 + next(calls)
    return extra


def _check(put, backend, dtype):
    rng = np.random.default_rng(1)
    q, k = (put(rng.standard_normal((2, 3, 29, 8)).astype(dtype)) for _ in range(2))
    x = put(rng.standard_normal((2, 29, 48)).astype(dtype))
    w = put(rng.standard_normal((48, 24)).astype(dtype))
    return attention(q, k, x, w, num_heads=3, alpha=0.5, seed=7, sampling="optimal", backend=backend)


def _bench(put, backend, n, shared_draws=False):
    from . import weight_tables

    rng = np.random.default_rng(1)
    q, k = (put(rng.standard_normal((1, 8, n, 64)).astype(np.float32)) for _ in range(2))
    x = put(rng.standard_normal((1, n, 512)).astype(np.float32))
    w = put(rng.standard_normal((512, 512)).astype(np.float32))
    tables = weight_tables(w, 8)
    return lambda: attention(q, k, x, w, num_heads=8, alpha=0.5, seed=7, tables=tables,
                             shared_draws=shared_draws, backend=backend)


def _check_shared(put, backend, dtype):
    """Shared draws (one draw sequence per (batch row, head)): on the GPU backends the
    compiled host plan applied by one kernel launch. 29 keys, so the CPU also takes the
    reduced-GEMM path and every backend rounds the budgets alike."""
    rng = np.random.default_rng(8)
    q, k = (put(rng.standard_normal((2, 3, 29, 8)).astype(dtype)) for _ in range(2))
    x = put(rng.standard_normal((2, 29, 48)).astype(dtype))
    w = put(rng.standard_normal((48, 24)).astype(dtype))
    b = put(rng.standard_normal(24).astype(dtype))
    return attention(q, k, x, w, b, num_heads=3, alpha=0.5, seed=9, shared_draws=True, backend=backend)


def _kernel_path(fn):
    """``fn`` with CuPy's shared draws on ``mca_shared.cu`` (``config.MCA_SHARED_CUPY = "kernel"``)."""
    from .. import config

    def switched(*args):
        saved = config.MCA_SHARED_CUPY
        config.MCA_SHARED_CUPY = "kernel"
        try:
            return fn(*args)
        finally:
            config.MCA_SHARED_CUPY = saved

    return switched


def _bench_shared_kernel(put, backend, n):
    return _kernel_path(_bench(put, backend, n, True))


_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}

METHOD = Method(
    name="mca",
    description="Monte-Carlo attention: exact probabilities, value projection x @ w_v by importance "
                "sampling (knobs x, w_v, b_v instead of v)",
    attention=door,
    knobs_for=_knobs_for,
    grad="mcattn.mca.grad",
    dask_plan=dask_plan,
    model=ModelHooks(supplies=("x", "w_v", "b_v"), needs_value_input=True, resolve=_model_knobs),
    checks={
        "mca": Check(_check, _TOLERANCE, _bench),
        # Not a method: MCA's shared-draw path (cuBLAS GEMMs on CuPy; benched up to n = 4096),
        # and on CuPy its one-kernel form (mca_shared.cu) beside it.
        "mca-shared": Check(_check_shared, _TOLERANCE, lambda put, b, n: _bench(put, b, n, True), 4096),
        "mca-shared-kernel": Check(_kernel_path(_check_shared), _TOLERANCE, _bench_shared_kernel, 4096),
    },
    kernel_sources={
        "mca/kernels/mca.cu": (
            "mcattn_mca_projection_weight_f32", "mcattn_mca_projection_weight_f64",
            "mcattn_mca_projection_optimal_f32", "mcattn_mca_projection_optimal_f64",
        ),
        "mca/kernels/mca_shared.cu": ("mcattn_mca_shared_apply_f32", "mcattn_mca_shared_apply_f64"),
    },
)

"""Eigen reconstruction as the library runs it (:class:`mcattn._plugin.Method`).

Inside a transformers model, ``use_method(model, "eigen", num_columns=m)`` fits one
position-centred basis per head and layer (rank ``min(24, N)``) on that layer's own
exact scores at each padded length ``N`` (the calibration batch, or the first batch of
that length), and the column plan for ``m`` columns per row; a call with ``N <= m`` keys
(or cross-attention) is exact attention.
"""

import numpy as np

from .._plugin import Check, Method, ModelHooks
from . import attention, fit, fit_heads, score_rows

__all__ = ["METHOD", "dask_plan", "MODEL_RANK"]

#: Rank of the bases fitted inside a model (at most the length).
MODEL_RANK = 24


def dask_plan(knobs, batch_shape):
    """eigen on dask chunks: per-head bases need every head, so the head dim stays whole."""
    from .._dask import DaskPlan

    def run(q, k, v, arrays, coords, **common):
        return attention(q, k, v, **common, **knobs)

    return DaskPlan(run=run, split_dims=tuple(range(max(0, len(batch_shape) - 1))))


def _calibrate(layer, options):
    """Bases per head from this layer's exact scores, and the plan for ``num_columns``."""
    from .plan import make_plan

    q, k = layer["q"], layer["k"]
    n, m = q.shape[-2], int(options["num_columns"])
    bases = fit_heads(q, k, rank=min(MODEL_RANK, n), center="position",
                      key_padding_mask=layer["key_padding_mask"], scale=layer["scale"])
    return {"basis": bases, "columns": make_plan(bases, m, rank=min(bases[0].rank, m))}


def _knobs_for(rng, heads, nk, dv):
    rows = score_rows(rng.standard_normal((4, nk, 3)), rng.standard_normal((4, nk, 3)))
    return dict(basis=fit(rows, rank=min(2, nk)), columns=np.arange(0, nk, 2))


def _check(put, backend, dtype):
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 40, 8)) for _ in range(3))
    basis = fit(score_rows(q, k), rank=6)  # fitted on the host, float64
    q, k, v = (put(a.astype(dtype)) for a in (q, k, v))
    return attention(q, k, v, basis=basis, columns=12, backend=backend)


METHOD = Method(
    name="eigen",
    description="eigen reconstruction: scores of a few key columns computed, the rest of each row "
                "reconstructed from a fitted eigenbasis (knobs basis, columns)",
    attention=attention,
    knobs_for=_knobs_for,
    grad="mcattn.eigen.grad",
    dask_plan=dask_plan,
    model=ModelHooks(supplies=("basis", "columns"), consumes=("num_columns",), calibrate=_calibrate,
                     needs_calibration=lambda options: options.get("num_columns") is not None,
                     per_length=True,
                     exact_when=lambda nq, nk, options: nq <= int(options["num_columns"]) or nk != nq),
    checks={"eigen": Check(_check, {"float32": 1e-5, "float64": 1e-12})},
    kernel_sources={"eigen/kernels/eigen.cu": ("mcattn_eigen_forward_f32", "mcattn_eigen_forward_f64")},
)

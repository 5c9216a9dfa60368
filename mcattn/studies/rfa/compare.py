"""Random feature attention's entry in ``mcattn compare`` (positive features, drop-in form)."""

import numpy as np

from ...registry import MethodEntry, Trial
from ...rfa import attention, bounds
from ...rfa.features import RandomFeatures

__all__ = ["ENTRY", "relative_bound"]

DELTA = 0.1


def _features(inputs, num_features, seed, kind="positive"):
    return RandomFeatures(inputs.q.shape[-1], int(num_features), kind=kind,
                          num_heads=inputs.q.shape[1], seed=seed)


def _run(inputs, num_features, seed, **knobs):
    out, info = attention(inputs.q, inputs.k, inputs.v, features=_features(inputs, num_features, seed),
                          key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                          return_info=True, **knobs)
    return Trial(out=out, info=info)


def relative_bound(inputs, features, exact_out, delta=DELTA):
    """Relative output-error bound per ``[B, H]`` over the real query rows (probability ``1 - delta``).

    :func:`mcattn.rfa.bounds.output_error_bound` bounds every row at once; the rows of
    the real tokens are aggregated in the Frobenius norm and divided by ``|O|`` over the
    same rows.
    """
    b = bounds.output_error_bound(inputs.q, inputs.k, inputs.v, features, delta=delta,
                                  key_padding_mask=inputs.key_padding_mask, scale=inputs.scale)
    rows = np.asarray(inputs.key_padding_mask, dtype=bool)[:, None, :]
    with np.errstate(invalid="ignore"):
        num = np.sqrt(np.where(rows, b.row**2, 0.0).sum(-1))
    ref = np.asarray(exact_out, dtype=np.float64)
    den = np.sqrt(((ref**2) * rows[..., None]).sum(axis=(-1, -2)))
    return num / np.where(den > 0, den, 1.0)


def _bound(inputs, num_features, trial, exact_out):
    return relative_bound(inputs, _features(inputs, num_features, 0), exact_out)


def dask_plan(knobs, batch_shape):
    """rfa on dask chunks: one draw of features for the whole batch, sliced per head chunk."""
    from ... import random as mrandom
    from ..._dask import ChunkedArray, DaskPlan, is_dask

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


ENTRY = MethodEntry(
    name="rfa", knob="num_features", values=(16, 32, 64, 128, 256), run=_run, bound=_bound,
    supplied=("features", "seed"),
    bound_note=f"rfa: positive random features, drop-in estimator; the bound holds for every row with "
               f"probability {1 - DELTA:.0%} (Chebyshev on the ratio estimator, union over rows), "
               "relative to ||O|| (inf: vacuous at this feature count)",
    attention=attention, dask_plan=dask_plan, grad="mcattn.rfa.grad",
    description="random feature attention: exp(q.k) by random features, linear time, gate, O(1) decoding",
)

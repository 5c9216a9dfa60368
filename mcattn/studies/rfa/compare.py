"""Random feature attention's entry in ``mcattn compare`` (positive features, drop-in form)."""

import numpy as np

from ...rfa import attention, bounds
from ...rfa.features import RandomFeatures
from ..entries import MethodEntry, Trial

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




ENTRY = MethodEntry(
    energy="mcattn.studies.rfa.energy",
    finetune="mcattn.studies.rfa.finetune",
    name="rfa", knob="num_features", values=(16, 32, 64, 128, 256), run=_run, bound=_bound,
    supplied=("features", "seed"),
    bound_note=f"rfa: positive random features, drop-in estimator; the bound holds for every row with "
               f"probability {1 - DELTA:.0%} (Chebyshev on the ratio estimator, union over rows), "
               "relative to ||O|| (inf: vacuous at this feature count)",
)

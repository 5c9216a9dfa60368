"""LATTE's entry in ``mcattn compare``: thresholds calibrated per head for a target attention mass."""

import numpy as np

from ...latte import attention, bounds, calibrate, kept_mask
from ..entries import MethodEntry, Trial

__all__ = ["ENTRY", "thresholds_for", "sample_thresholds", "SampleThresholds", "relative_bound"]

_CACHE = {}


def thresholds_for(inputs, target_mass):
    """Per-head thresholds keeping ``target_mass`` of the attention mass on ``inputs`` (cached).

    Calibration runs on the layer being compared (in-sample): it is the setting's
    definition, not part of the timed call.
    """
    key = (id(inputs.q), float(target_mass))
    if key not in _CACHE:
        _CACHE[key] = (inputs.q, calibrate(inputs.q, inputs.k, target_mass=float(target_mass),
                                           key_padding_mask=inputs.key_padding_mask, scale=inputs.scale))
    return _CACHE[key][1]


def sample_thresholds(target_mass):
    """Thresholds ``[L, H]`` per layer and head of all-MiniLM-L6-v2 for ``target_mass``.

    Calibrated on the embedded sample (:func:`mcattn.studies.data.load_sample`: its 8 texts are 2
    Lee documents and 6 polarity sentences, 8 of the 250 texts ``mcattn evaluate`` embeds).
    Used by the torch adapter inside the model.
    """
    from .. import data

    key = ("sample", float(target_mass))
    if key not in _CACHE:
        s = data.load_sample()
        _CACHE[key] = (None, np.stack([
            calibrate(s.q[i], s.k[i], target_mass=float(target_mass),
                      key_padding_mask=s.key_padding_mask, scale=float(s.scale))
            for i in range(s.num_layers)]))
    return _CACHE[key][1]


def _run(inputs, target_mass, seed, **knobs):
    theta = thresholds_for(inputs, target_mass)
    out, info = attention(inputs.q, inputs.k, inputs.v, threshold=theta,
                          key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                          return_info=True, **knobs)
    return Trial(out=out, info=info)


def relative_bound(inputs, theta, exact_out):
    """Relative output-error bound per ``[B, H]`` over the real query rows (deterministic).

    Per row: ``2 * dropped-mass bound * max|v| + (exp(2 eta) - 1) max|v|``
    (:mod:`mcattn.latte.bounds`), aggregated in the Frobenius norm over the real rows and
    divided by ``|O|`` over the same rows.
    """
    kpm = np.asarray(inputs.key_padding_mask, dtype=bool)
    kept = kept_mask(inputs.q, inputs.k, threshold=theta, key_padding_mask=kpm, scale=inputs.scale)
    mass = bounds.dropped_mass_bound(inputs.q, inputs.k, kept, key_padding_mask=kpm, scale=inputs.scale)
    eta = bounds.int8_score_error(inputs.q, inputs.k, scale=inputs.scale)
    v = np.where(kpm[:, None, :, None], inputs.v, 0)
    row = bounds.output_error_bound(mass, v, int8_error=eta)
    rows = kpm[:, None, :]
    num = np.sqrt(np.where(rows, row**2, 0.0).sum(-1))
    ref = np.asarray(exact_out, dtype=np.float64)
    den = np.sqrt(((ref**2) * rows[..., None]).sum(axis=(-1, -2)))
    return num / np.where(den > 0, den, 1.0)


def _bound(inputs, target_mass, trial, exact_out):
    return relative_bound(inputs, thresholds_for(inputs, target_mass), exact_out)




class SampleThresholds:
    """``layer_knobs`` for ``use_method`` in all-MiniLM-L6-v2: each layer's thresholds for
    ``target_mass`` calibrated on the embedded sample (:func:`sample_thresholds`)."""

    supplies = ("threshold",)

    def __init__(self, target_mass):
        self.theta = sample_thresholds(target_mass)

    def __call__(self, attention_module):
        return {"threshold": self.theta[attention_module.layer_idx]}


ENTRY = MethodEntry(
    energy="mcattn.studies.latte.energy",
    finetune="mcattn.studies.latte.finetune",
    name="latte", knob="target_mass", values=(0.9, 0.99, 0.999), run=_run, bound=_bound,
    supplied=("threshold",),
    eval_values=(0.5, 0.7, 0.9, 0.99, 0.999),
    model_options=lambda target_mass: {"layer_knobs": SampleThresholds(target_mass)},
    bound_note="latte: relative thresholds per head calibrated in-sample to keep the target share "
               "of attention mass; deterministic bound from the dropped-mass bound and the int8 "
               "score error, relative to ||O||",
)

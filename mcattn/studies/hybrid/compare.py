"""Hybrid's entry in ``mcattn compare`` and ``mcattn evaluate``: a target keep fraction.

Per head, LATTE's relative thresholds are calibrated (:func:`mcattn.latte.calibrate`) to
keep ``target_keep`` of the visible pairs on the layer being compared (in-sample: the
setting's definition, not part of the timed call); the dropped keys are pooled. Inside
the model ``use_method(..., target_keep=...)`` calibrates on each layer's first call.
"""

from ...hybrid import attention
from ...latte import calibrate
from ..entries import MethodEntry, Trial

__all__ = ["ENTRY"]

_CACHE = {}


def _thresholds(inputs, target_keep):
    key = (id(inputs.q), float(target_keep))
    if key not in _CACHE:
        _CACHE[key] = (inputs.q, calibrate(inputs.q, inputs.k, target_keep=float(target_keep),
                                           key_padding_mask=inputs.key_padding_mask,
                                           scale=inputs.scale))
    return _CACHE[key][1]


def _run(inputs, target_keep, seed, **knobs):
    out, info = attention(inputs.q, inputs.k, inputs.v, threshold=_thresholds(inputs, target_keep),
                          mode="relative", key_padding_mask=inputs.key_padding_mask,
                          scale=inputs.scale, return_info=True, **knobs)
    return Trial(out=out, info=info)


ENTRY = MethodEntry(
    name="hybrid", knob="target_keep", values=(0.125, 0.25, 0.33), run=_run, eval_values=(0.25,),
    model_options=lambda value: {"target_keep": value}, supplied=("threshold", "mode"),
)

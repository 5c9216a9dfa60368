"""E-Att's entry in ``mcattn compare``.

E-Att is a different attention function, meant to be trained: the sample's ``q`` and
``k`` come from a model trained for dot products, so the error measured here is the
cost of swapping L1 (or Hamming) alignment into an untrained model, not E-Att's
accuracy after training (that is the finetune issue's).
"""

from ...eatt import attention
from ..entries import MethodEntry, Trial

__all__ = ["ENTRY"]


def _run(inputs, alignment, seed, **knobs):
    out, info = attention(inputs.q, inputs.k, inputs.v, alignment=alignment,
                          key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                          return_info=True, **knobs)
    return Trial(out=out, info=info, bound=None)


ENTRY = MethodEntry(
    energy="mcattn.studies.eatt.energy",
    name="eatt", knob="alignment", values=("l1", "hamming"), run=_run,
    bound_note="eatt: no bound (a different attention function, not an approximation)",
    table_note="eatt needs training: its rows swap L1 / Hamming alignment into a model trained "
               "for dot products, so their error is not E-Att's accuracy after training",
)

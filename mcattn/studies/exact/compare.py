"""Exact attention's entry in ``mcattn compare`` (the reference row)."""

from ...exact import attention
from ..entries import MethodEntry, Trial


def _run(inputs, value, seed, **knobs):
    out, info = attention(inputs.q, inputs.k, inputs.v, key_padding_mask=inputs.key_padding_mask,
                          scale=inputs.scale, return_info=True, **knobs)
    return Trial(out=out, info=info, bound=0.0)


ENTRY = MethodEntry(name="exact", knob=None, values=(None,), run=_run,
                    bound_note="exact: no error")

"""Arguments shared by the two GPU launchers: the plan on the inputs' device, in their dtype."""

import numpy as np

__all__ = ["plan_arrays"]


def plan_arrays(inp, plan, xp):
    """``(cols, weights, base, bias, mask_index, has_bias)`` as ``xp`` arrays for the kernels."""
    dt = inp.dtype
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), dt)
    index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    return (xp.ascontiguousarray(xp.asarray(plan.columns, dtype=np.int64)),
            xp.ascontiguousarray(xp.asarray(plan.weights, dtype=dt)),
            xp.ascontiguousarray(xp.asarray(plan.base, dtype=dt)),
            xp.ascontiguousarray(xp.asarray(bias)), xp.ascontiguousarray(xp.asarray(index)), has_bias)

"""numba.cuda device functions shared by the methods' kernels (the CUDA C twins are in
``mcattn/kernels/common.cuh``)."""

import math

from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

__all__ = ["softmax_tile"]


@cuda.jit(device=True, inline=True)  # inlined: compile_ptx then needs no driver
def softmax_tile(scores, width, top, v_tile, dv, m, l, acc):
    """One thread's streaming-softmax step over a tile of ``width`` scores.

    ``top`` is the maximum of the tile's scores and the running maximum ``m``. Rescales
    the running sum ``l`` and output ``acc`` to ``top`` and adds ``exp(score - top)`` and
    its share of ``v_tile`` rows. A tile with nothing visible yet (``top`` = -inf) adds
    nothing. Returns the new ``(m, l)`` (scalars are passed by value). The arithmetic
    stays in the type of its arguments (float32 kernels stay float32).
    """
    if math.isinf(top):  # -inf: nothing visible yet
        return m, l
    rescale = math.exp(m - top)  # 0 on the first visible tile
    l *= rescale
    for c in range(dv):
        acc[c] *= rescale
    for r in range(width):
        p = math.exp(scores[r] - top)
        l += p
        for c in range(dv):
            acc[c] += p * v_tile[r, c]
    return top, l

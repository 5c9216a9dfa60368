"""numba.cuda device functions shared by the methods' kernels (the CUDA C twins are in
``mcattn/kernels/common.cuh``)."""

import math

from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

__all__ = ["softmax_tile", "load_tile", "block_key_end"]


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


@cuda.jit(device=True, inline=True)
def load_tile(tile, src, bh, row0, rows, cols, factor):
    """The block's threads copy ``src[bh, row0:row0 + rows, :cols] * factor`` into
    ``tile[:rows, :cols]`` (a shared-memory tile); ``factor`` typed as the tile (a bare
    float would promote float32 kernels to float64)."""
    for e in range(cuda.threadIdx.x, rows * cols, cuda.blockDim.x):
        tile[e // cols, e % cols] = src[bh, row0 + e // cols, e % cols] * factor


@cuda.jit(device=True, inline=True)
def block_key_end(nq, nk, is_causal):
    """The keys a block of query rows may see: causal masking hides every key after the
    block's last row from the whole block."""
    if is_causal:
        return min(nk, min(nq, (cuda.blockIdx.x + 1) * cuda.blockDim.x))
    return nk

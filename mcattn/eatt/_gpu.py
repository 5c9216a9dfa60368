"""What the GPU launchers of E-Att share: the per-alignment arrays the kernels read."""

import numpy as np

__all__ = ["MAX_WORDS", "kernel_arrays"]

#: Packed code words per row the GPU kernels hold in registers (head dims up to 128).
MAX_WORDS = 2


def kernel_arrays(inp, alignment, codes, xp):
    """``(q, k, qc, kc, neg_table)`` for the kernels; the unused ones are 1-element dummies.

    L1: ``q``, ``k`` scaled by ``inp.scale`` (no multiply per pair in the kernel).
    Hamming: the packed codes and ``neg_table[h] = -scale * h``, ``h = 0 .. d``.
    """
    dt = inp.dtype
    scale = dt.type(inp.scale)
    if alignment == "hamming":
        qc, kc = (xp.ascontiguousarray(c) for c in codes)
        dummy = xp.zeros((1, 1, 1), dt)
        table = -(scale * xp.arange(inp.head_dim + 1, dtype=dt))
        return dummy, dummy, qc, kc, table
    dummy = xp.zeros((1, 1, 1), np.uint64)
    q, k = (inp.q, inp.k) if inp.scale == 1.0 else (inp.q * scale, inp.k * scale)
    return xp.ascontiguousarray(q), xp.ascontiguousarray(k), dummy, dummy, xp.zeros(1, dt)

"""LATTE on CUDA GPUs through a CuPy RawKernel (``kernels/latte.cu``).

The algorithm is that of :mod:`mcattn.latte.cuda`.
"""

import numpy as np

from .. import config
from .._cupy import raw_module
from .naive import MODES

__all__ = ["forward", "kept_mask", "kernel_arguments"]

_SOURCE = "latte/kernels/latte.cu"
_MAX_GRID_Y = 65535


def kernel_arguments(lat, xp, *, do_output, write_mask):
    """Outputs and the argument tuple of ``mcattn_latte_forward_*`` (arrays of ``xp``)."""
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    out = xp.zeros((bh, nq, dv), dtype=q.dtype)
    kept = xp.zeros((bh, nq), dtype=np.int64)
    dropped = xp.zeros((bh, nq), dtype=np.float64)
    mask_out = xp.zeros((bh, nq, nk) if write_mask else (1, 1, 1), dtype=np.bool_)
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else xp.zeros((1, 1, 1), q.dtype)
    mask_index = xp.asarray(inp.mask.mask_index if has_bias else np.zeros(1, np.int64))
    sk256 = 256.0 * lat.s_k.astype(np.float64)
    args = [lat.q8, lat.k8, q, k, v, lat.s_q, lat.s_k, sk256, xp.asarray(lat.theta),
            xp.ascontiguousarray(bias), mask_index, out, kept, dropped, mask_out, np.int32(nq),
            np.int32(nk), np.int32(d), np.int32(dv), np.float64(inp.scale), np.int32(MODES[lat.mode]),
            np.int32(lat.exact_scores == "int8"), np.int32(has_bias), np.int32(bias.shape[1]),
            np.int32(inp.mask.is_causal), np.int32(lat.want_mass), np.int32(write_mask),
            np.int32(do_output)]
    return (out, kept, dropped, mask_out), args


def _run(lat, *, do_output, write_mask):
    import cupy

    (out, kept, dropped, mask_out), args = kernel_arguments(lat, cupy, do_output=do_output,
                                                             write_mask=write_mask)
    bh, nq = lat.inp.q.shape[:2]
    if bh == 0 or nq == 0 or lat.inp.nk == 0:
        return out, kept, dropped, mask_out
    suffix = "f32" if lat.inp.dtype == np.float32 else "f64"
    kernel = raw_module(_SOURCE).get_function(f"mcattn_latte_forward_{suffix}")
    threads = int(config.CUDA_THREADS_PER_BLOCK)
    per_row = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)  # arguments with a leading [BH] axis
    for b0 in range(0, bh, _MAX_GRID_Y):  # gridDim.y is at most 65535
        b1 = min(bh, b0 + _MAX_GRID_Y)
        call = list(args)
        for p in per_row:
            call[p] = args[p][b0:b1]
        if write_mask:
            call[14] = args[14][b0:b1]
        kernel(((nq + threads - 1) // threads, b1 - b0), (threads,), tuple(call))
    return out, kept, dropped, mask_out


def forward(lat):
    """LATTE attention of canonical CuPy inputs; as :func:`mcattn.latte.cpu.forward`."""
    out, kept, dropped, _ = _run(lat, do_output=True, write_mask=False)
    return out, kept, dropped if lat.want_mass else None


def kept_mask(lat):
    """The kept sets, bool ``[BH, Nq, Nk]``."""
    return _run(lat, do_output=False, write_mask=True)[3]

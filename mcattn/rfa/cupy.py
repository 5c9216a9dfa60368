"""Random feature attention on CUDA GPUs through CuPy RawKernels (``kernels/rfa.cu``).

The algorithm and the array code between the kernels are in :mod:`mcattn.rfa._gpu`.
"""

import numpy as np

from .._cupy import block_threads, raw_module
from . import _gpu

__all__ = ["forward", "KERNEL_NAMES", "SOURCE"]

SOURCE = "rfa/kernels/rfa.cu"
KERNEL_NAMES = tuple(f"mcattn_rfa_{part}_{suffix}" for suffix in ("f32", "f64")
                     for part in ("features", "states", "scan", "output"))


class _Launch:
    """The four RawKernel launches (scalars passed as explicitly typed NumPy scalars)."""

    def __init__(self, rinp):
        self.rinp = rinp
        suffix = "f32" if rinp.dtype == np.float32 else "f64"
        module = raw_module(SOURCE)
        self.kernel = {part: module.get_function(f"mcattn_rfa_{part}_{suffix}")
                       for part in ("features", "states", "scan", "output")}
        self.threads = min(block_threads(k) for k in self.kernel.values())
        self.dt = rinp.dtype.type

    def _grid(self, total):
        return ((total + self.threads - 1) // self.threads,), (self.threads,)

    def features(self, x, factor, f, logw, fnorm):
        rinp = self.rinp
        bh, n, d = x.shape
        if bh * n == 0:
            return
        omega = rinp.omega
        self.kernel["features"](
            *self._grid(bh * n),
            (x, omega, f, logw, fnorm, np.int64(bh * n), np.int32(n), np.int32(d),
             np.int32(omega.shape[1]), np.int32(omega.shape[0]), self.dt(factor), np.int32(rinp.unit),
             np.int32(_gpu.KIND_CODE[rinp.kind])),
        )

    def states(self, kw, v, knorm, cum, has_gate, states, mass, chunk):
        bh, n_chunks, m, w1 = states.shape
        self.kernel["states"](
            *self._grid(bh * n_chunks * (m * w1 + 1)),
            (kw, v, knorm, cum, np.int32(has_gate), states, mass, np.int64(bh), np.int32(kw.shape[1]),
             np.int32(m), np.int32(w1 - 1), np.int32(chunk), np.int32(n_chunks)),
        )

    def scan(self, states, mass, chunk_decay):
        bh, n_chunks, m, w1 = states.shape
        self.kernel["scan"](
            *self._grid(bh * (m * w1 + 1)),
            (states, mass, chunk_decay, np.int64(bh), np.int32(n_chunks), np.int32(m), np.int32(w1 - 1)),
        )

    def output(self, fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk, causal):
        bh, nq, m = fq.shape
        self.kernel["output"](
            *self._grid(bh * nq),
            (fq, qnorm, kw, v, knorm, cum, np.int32(has_gate), states, mass, out, flags, np.int64(bh),
             np.int32(nq), np.int32(kw.shape[1]), np.int32(m), np.int32(v.shape[2]), np.int32(chunk),
             np.int32(states.shape[1]), np.int32(causal), self.dt(self.rinp.eps)),
        )


def forward(rinp):
    """Random feature attention of canonical CuPy inputs.

    Parameters
    ----------
    rinp : mcattn.rfa._inputs.RFAInputs
        CuPy arrays, head dims <= 128.

    Returns
    -------
    out : cupy.ndarray ``[BH, Nq, dv]``
    clamped : cupy.ndarray of int64 ``[BH]``
    """
    return _gpu.run(rinp, _Launch(rinp))

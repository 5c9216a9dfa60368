"""Random feature attention on CUDA GPUs through CuPy RawKernels (``kernels/rfa.cu``,
``kernels/rfa_mma.cu``).

The algorithm and the array code between the kernels are in :mod:`mcattn.rfa._gpu`.
With ``config.RFA_TENSOR_CORES`` set, a float32 call with value dim 32, 64 or 128 forms
the states and the output on tensor cores (:func:`tensor_cores`): non-causal in one
chunk, causal and gated in the chunked form (chunks of a multiple of 64 tokens).
"""

import dataclasses

import numpy as np

from .. import config
from .._cupy import block_threads, raw_module
from ..errors import ConfigError
from . import _gpu

__all__ = ["forward", "tensor_cores", "KERNEL_NAMES", "SOURCE", "MMA_SOURCE", "MMA_VALUE_DIMS"]

MMA_SOURCE = "rfa/kernels/rfa_mma.cu"
#: Value dims of the tensor-core kernels; blocks of 128 threads, 64 rows; keys per split
#: of the state's sum (the splits are summed by CuPy).
MMA_VALUE_DIMS = (32, 64, 128)
_MMA_ROWS, _MMA_THREADS, _MMA_SPAN = 64, 128, 2048
_MMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}
_MAX_GRID_YZ = 65535

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
    precision = tensor_cores(rinp)
    if precision is None:
        return _gpu.run(rinp, _Launch(rinp))
    if rinp.is_causal:  # a 64-row query tile lies in one chunk
        rinp = dataclasses.replace(rinp, chunk_size=mma_chunk(rinp.chunk_size))
    return _gpu.run(rinp, _MmaLaunch(rinp, precision))


def mma_chunk(chunk_size):
    """The chunk of the causal tensor-core path: ``chunk_size`` rounded up to a multiple of 64.

    The chunked form's result does not depend on the chunk (only its rounding does); the
    chunk only trades the intra-chunk products (``O(N C)``) against the states (``O(N / C)``).
    """
    return -(-int(chunk_size) // _MMA_ROWS) * _MMA_ROWS


def tensor_cores(rinp):
    """The 16-bit type ``rfa_mma.cu`` runs these inputs in, or None (``rfa.cu`` then)."""
    precision = config.RFA_TENSOR_CORES
    if precision is None:
        return None
    if precision not in _MMA_TYPES:
        raise ConfigError(f"RFA_TENSOR_CORES must be None, 'float16' or 'bfloat16'; got {precision!r}")
    if rinp.dtype != np.float32 or rinp.value_dim not in MMA_VALUE_DIMS:
        return None
    if rinp.is_causal and -(-rinp.nq // mma_chunk(rinp.chunk_size)) > _MAX_GRID_YZ:
        return None  # the chunk-state kernel's gridDim.y is the chunk count
    return precision


class _MmaLaunch(_Launch):
    """rfa.cu's features (and, causal, its float32 scan of the chunk states), then the
    states and the output on ``rfa_mma.cu``."""

    def __init__(self, rinp, precision):
        super().__init__(rinp)
        module = raw_module(MMA_SOURCE)
        name = f"{_MMA_TYPES[precision]}_dv{rinp.value_dim}"
        self.mma = {part: module.get_function(f"mcattn_rfa_mma_{part}_{name}")
                    for part in ("states", "output", "chunk_states", "causal")}
        self.kscale = self.kkey = None

    def states(self, kw, v, knorm, cum, has_gate, states, mass, chunk):
        import cupy

        if self.rinp.is_causal:
            return self._chunk_states(kw, v, knorm, cum, has_gate, states, mass, chunk)
        bh, _, m, w1 = states.shape
        nk = kw.shape[1]
        splits = max(1, -(-nk // _MMA_SPAN))
        v = cupy.ascontiguousarray(v)
        states[:, 0] = 0
        for b0 in range(0, bh if nk else 0, _MAX_GRID_YZ):  # gridDim.z is at most 65535
            b1 = min(bh, b0 + _MAX_GRID_YZ)
            partial = cupy.empty((splits, b1 - b0, m, w1), np.float32)
            self.mma["states"](((m + _MMA_ROWS - 1) // _MMA_ROWS, splits, b1 - b0), (_MMA_THREADS,),
                               (kw[b0:b1], v[b0:b1], partial, np.int32(nk), np.int32(m), np.int32(_MMA_SPAN)))
            states[b0:b1, 0] = partial.sum(axis=0)
        mass[:, 0] = knorm.sum(axis=1)

    def _chunk_states(self, kw, v, knorm, cum, has_gate, states, mass, chunk):
        """Each chunk's own ``sum_s exp(b_L - b_s) kw_s [v_s, 1]`` on mma, its mass, its key scale."""
        import cupy

        bh, n_chunks, m, _ = states.shape
        n = kw.shape[1]
        if bh * n == 0:
            states[...] = 0
            mass[...] = 0
            self.kscale = cupy.ones((bh, n_chunks), np.float32)
            self.kkey = cupy.ones((bh, n), np.float32)
            return

        def per_chunk(x, fill):  # [BH, n] -> [BH, n_chunks, chunk]
            padded = cupy.full((bh, n_chunks * chunk), fill, np.float32)
            padded[:, :n] = x
            return padded.reshape(bh, n_chunks, chunk)

        if has_gate:  # decay of key s to its chunk's end: exp(b_L - b_s)
            b = per_chunk(cum, 0.0)
            last = np.minimum(np.arange(1, n_chunks + 1) * chunk, n) - 1 - np.arange(n_chunks) * chunk
            tail = cupy.exp(b[:, np.arange(n_chunks), last][..., None] - b).reshape(bh, -1)[:, :n]
            tail = cupy.ascontiguousarray(tail)
        else:
            tail = cupy.ones((bh, n), np.float32)
        mass[...] = per_chunk(knorm * tail, 0.0).sum(axis=2)
        key_top = cupy.abs(kw).max(axis=2)  # [BH, n]: each key's largest |kw| (the causal kernel's)
        self.kkey = cupy.ascontiguousarray(cupy.where(key_top > 0, key_top, 1).astype(np.float32))
        top = per_chunk(key_top, 0.0).max(axis=2)
        self.kscale = cupy.ascontiguousarray(cupy.where(top > 0, top, 1).astype(np.float32))
        v = cupy.ascontiguousarray(v)
        for b0 in range(0, bh, _MAX_GRID_YZ):
            b1 = min(bh, b0 + _MAX_GRID_YZ)
            self.mma["chunk_states"](((m + _MMA_ROWS - 1) // _MMA_ROWS, n_chunks, b1 - b0), (_MMA_THREADS,),
                                     (kw[b0:b1], v[b0:b1], tail[b0:b1], self.kscale[b0:b1], states[b0:b1],
                                      np.int32(n), np.int32(m), np.int32(chunk)))

    def output(self, fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk, causal):
        import cupy

        bh, nq, m = fq.shape
        if bh * nq == 0:
            return
        if causal:
            return self._causal_output(fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags,
                                       chunk)
        # [S | z] over the mass: |S| <= max|v| mass and |z| <= mass, so the rounded state
        # fits float16; the floor's scale qnorm * mass becomes qnorm (or 0: zeros).
        total = mass[:, 0]
        scale = cupy.where(total > 0, 1.0 / cupy.where(total > 0, total, 1), 0).astype(np.float32)
        ts = cupy.ascontiguousarray(states[:, 0] * scale[:, None, None])
        qref = cupy.ascontiguousarray(qnorm * (scale > 0)[:, None])
        for b0 in range(0, bh, _MAX_GRID_YZ):
            b1 = min(bh, b0 + _MAX_GRID_YZ)
            self.mma["output"](((nq + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,),
                               (fq[b0:b1], ts[b0:b1], qref[b0:b1], out[b0:b1], flags[b0:b1], np.int32(nq),
                                np.int32(m), np.float32(self.rinp.eps)))

    def _causal_output(self, fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk):
        import cupy

        bh, n, m = fq.shape
        # The state at each chunk start over its mass (fits float16, as non-causal).
        live = mass > 0
        inv = cupy.where(live, 1.0 / cupy.where(live, mass, 1), 0).astype(np.float32)
        ts = cupy.ascontiguousarray(states * inv[..., None, None])
        cmass = cupy.ascontiguousarray(mass.astype(np.float32))
        ikey = cupy.ascontiguousarray((1.0 / self.kkey).astype(np.float32))
        cum = cum if has_gate else cupy.zeros((1, 1), np.float32)
        v = cupy.ascontiguousarray(v)
        for b0 in range(0, bh, _MAX_GRID_YZ):
            b1 = min(bh, b0 + _MAX_GRID_YZ)
            self.mma["causal"](((n + _MMA_ROWS - 1) // _MMA_ROWS, b1 - b0), (_MMA_THREADS,),
                               (fq[b0:b1], kw[b0:b1], v[b0:b1], knorm[b0:b1], cum[b0:b1] if has_gate else cum,
                                np.int32(has_gate), ts[b0:b1], cmass[b0:b1], self.kkey[b0:b1], ikey[b0:b1],
                                qnorm[b0:b1],
                                out[b0:b1], flags[b0:b1], np.int32(n), np.int32(m), np.int32(chunk),
                                np.float32(self.rinp.eps)))

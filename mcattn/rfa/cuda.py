"""Random feature attention on CUDA GPUs with numba.cuda (same kernels as ``kernels/rfa.cu``).

The algorithm and the array code between the kernels are in :mod:`mcattn.rfa._gpu`.
Takes CuPy arrays (zero-copy through ``__cuda_array_interface__``) or, under the
numba.cuda simulator (``NUMBA_ENABLE_CUDASIM=1``), NumPy arrays. Head dims up to
:data:`MAX_HEAD_DIM` (a thread keeps one output row in registers).
"""

import functools
import math

import numpy as np
from numba import cuda  # module level: the simulator swaps the `cuda` global of kernels

from .._array import is_cupy
from .._cupy import block_threads, numba_stream
from . import _gpu

__all__ = ["forward", "make_kernels", "MAX_HEAD_DIM", "ptx_signatures"]

MAX_HEAD_DIM = 128


@functools.cache
def make_kernels(dtype_name):
    """The four numba.cuda kernels for one compute dtype (``"float32"`` or ``"float64"``)."""
    from numba import float32, float64

    nb_type = float32 if dtype_name == "float32" else float64
    maxd = MAX_HEAD_DIM
    # Typed constants: a bare 0.0 or 1.0 (or `x * 0`) would promote float32 code to float64.
    zero, one, half, neg_inf = nb_type(0.0), nb_type(1.0), nb_type(0.5), nb_type(-math.inf)

    @cuda.jit
    def rfa_features(x, omega, f, logw, fnorm, factor, unit, kind):
        """One thread per row of ``x [BH, N, d]``: ``f [BH, N, m]``, ``logw``, ``fnorm [BH, N]``."""
        row = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        n, d = x.shape[1], x.shape[2]
        if row >= x.shape[0] * n:
            return
        bh = row // n
        i = row % n
        heads, width = omega.shape[0], omega.shape[1]
        h = bh % heads
        sq = zero
        for c in range(d):
            sq += x[bh, i, c] * x[bh, i, c]
        scale = factor
        if unit:
            scale = factor / math.sqrt(sq) if sq > zero else zero
        inv = one / math.sqrt(nb_type(width))
        top = neg_inf
        for r in range(width):
            u = zero
            for c in range(d):
                u += omega[h, r, c] * x[bh, i, c]
            u *= scale
            if kind == 1:
                f[bh, i, r] = math.sin(u) * inv
                f[bh, i, width + r] = math.cos(u) * inv
            elif kind == 2:
                f[bh, i, r] = max(u, zero) * inv
            else:
                f[bh, i, r] = u
                top = max(top, u)
        half_sq = half * scale * scale * sq
        if kind == 0:
            for r in range(width):
                f[bh, i, r] = math.exp(f[bh, i, r] - top) * inv
            logw[bh, i] = top - half_sq
        elif kind == 1:
            logw[bh, i] = half_sq
        else:
            logw[bh, i] = 0.0
        m = f.shape[2]
        acc = zero
        for r in range(m):
            acc += f[bh, i, r] * f[bh, i, r]
        fnorm[bh, i] = math.sqrt(acc)

    @cuda.jit
    def rfa_states(kw, v, knorm, cum, has_gate, states, mass, chunk):
        """One thread per (batch row, chunk, entry of ``[S | z]`` or the mass): the chunk's sum."""
        tid = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        n, m = kw.shape[1], kw.shape[2]
        dv = v.shape[2]
        n_chunks = states.shape[1]
        width = m * (dv + 1) + 1
        if tid >= states.shape[0] * n_chunks * width:
            return
        e = tid % width
        ch = (tid // width) % n_chunks
        bh = tid // (width * n_chunks)
        s0 = ch * chunk
        s1 = min(n, s0 + chunk)
        b_last = cum[bh, s1 - 1] if has_gate else zero
        acc = zero
        if e == width - 1:
            for s in range(s0, s1):
                tail = math.exp(b_last - cum[bh, s]) if has_gate else one
                acc += tail * knorm[bh, s]
            mass[bh, ch] = acc
            return
        r = e // (dv + 1)
        c = e % (dv + 1)
        for s in range(s0, s1):
            tail = math.exp(b_last - cum[bh, s]) if has_gate else one
            val = v[bh, s, c] if c < dv else one
            acc += tail * kw[bh, s, r] * val
        states[bh, ch, r, c] = acc

    @cuda.jit
    def rfa_scan(states, mass, chunk_decay):
        """One thread per (batch row, entry): chunk sums -> state at each chunk's start."""
        tid = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        n_chunks, m, w1 = states.shape[1], states.shape[2], states.shape[3]
        width = m * w1 + 1
        if tid >= states.shape[0] * width:
            return
        bh = tid // width
        e = tid % width
        run = zero
        for ch in range(n_chunks):
            if e == width - 1:
                local = mass[bh, ch]
                mass[bh, ch] = run
            else:
                local = states[bh, ch, e // w1, e % w1]
                states[bh, ch, e // w1, e % w1] = run
            run = chunk_decay[bh, ch] * run + local

    @cuda.jit
    def rfa_output(fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk, causal, eps):
        """One thread per query row: state read-out, intra-chunk products, floored ratio."""
        num = cuda.local.array(maxd, nb_type)
        row = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        nq, m = fq.shape[1], fq.shape[2]
        dv = v.shape[2]
        if row >= fq.shape[0] * nq:
            return
        bh = row // nq
        i = row % nq
        ch = i // chunk if causal else 0
        into = math.exp(cum[bh, i]) if (causal and has_gate) else one
        den = zero
        for c in range(dv):
            num[c] = 0.0
        for r in range(m):
            a = fq[bh, i, r]
            for c in range(dv):
                num[c] += a * states[bh, ch, r, c]
            den += a * states[bh, ch, r, dv]
        for c in range(dv):
            num[c] *= into
        den *= into
        ref = into * mass[bh, ch]
        if causal:
            for s in range(ch * chunk, i + 1):
                dec = math.exp(cum[bh, i] - cum[bh, s]) if has_gate else one
                dot = zero
                for r in range(m):
                    dot += fq[bh, i, r] * kw[bh, s, r]
                a = dec * dot
                for c in range(dv):
                    num[c] += a * v[bh, s, c]
                den += a
                ref += dec * knorm[bh, s]
        ref *= qnorm[bh, i]
        flags[bh, i] = 0
        if ref > zero:
            if den <= eps * ref:
                den = eps * ref
                flags[bh, i] = 1
            inv = one / den
            for c in range(dv):
                out[bh, i, c] = num[c] * inv
        else:
            for c in range(dv):
                out[bh, i, c] = 0.0

    return rfa_features, rfa_states, rfa_scan, rfa_output


def ptx_signatures():
    """``(name, python function, argument types)`` of every kernel, for compile_ptx tests."""
    from numba import boolean, float32, float64, int32, int64

    sigs = []
    for name, nb in (("float32", float32), ("float64", float64)):
        a2, a3, a4 = nb[:, ::1], nb[:, :, ::1], nb[:, :, :, ::1]
        feats, states, scan, output = make_kernels(name)
        sigs += [
            (f"rfa_features_{name}", feats.py_func, (a3, a3, a3, a2, a2, nb, boolean, int64)),
            (f"rfa_states_{name}", states.py_func, (a3, a3, a2, a2, boolean, a4, a2, int64)),
            (f"rfa_scan_{name}", scan.py_func, (a4, a2, a2)),
            (f"rfa_output_{name}", output.py_func,
             (a3, a2, a3, a3, a2, a2, boolean, a4, a2, a3, int32[:, ::1], int64, boolean, nb)),
        ]
    return sigs


class _Launch:
    """The four launches on numba.cuda, for CuPy arrays or (simulator) NumPy arrays."""

    def __init__(self, rinp):
        self.rinp = rinp
        self.kernels = make_kernels(rinp.dtype.name)
        self.threads = block_threads(None)
        self.stream = numba_stream()  # CuPy's current stream: ordered with the array code between
        self.on_device = is_cupy(rinp.q)
        self.omega = self._in(rinp.omega)
        self.dt = rinp.dtype.type

    def _in(self, a):
        return cuda.as_cuda_array(a) if self.on_device else cuda.to_device(np.ascontiguousarray(a))

    def features(self, x, factor, f, logw, fnorm):
        rinp = self.rinp
        feats = self.kernels[0]
        blocks = self._blocks(x.shape[0] * x.shape[1])
        dx, df, dl, dn = (self._in(a) for a in (x, f, logw, fnorm))
        feats[blocks, self.threads, self.stream](dx, self.omega, df, dl, dn, self.dt(factor),
                                                 bool(rinp.unit), _gpu.KIND_CODE[rinp.kind])
        if not self.on_device:
            f[...], logw[...], fnorm[...] = df.copy_to_host(), dl.copy_to_host(), dn.copy_to_host()

    def _blocks(self, total):
        return (total + self.threads - 1) // self.threads

    def states(self, kw, v, knorm, cum, has_gate, states, mass, chunk):
        width = states.shape[2] * states.shape[3] + 1
        blocks = self._blocks(states.shape[0] * states.shape[1] * width)
        args = [self._in(a) for a in (kw, v, knorm, cum)]
        ds, dm = self._in(states), self._in(mass)
        self.kernels[1][blocks, self.threads, self.stream](*args, bool(has_gate), ds, dm, int(chunk))
        if not self.on_device:
            states[...], mass[...] = ds.copy_to_host(), dm.copy_to_host()

    def scan(self, states, mass, chunk_decay):
        blocks = self._blocks(states.shape[0] * (states.shape[2] * states.shape[3] + 1))
        ds, dm = self._in(states), self._in(mass)
        self.kernels[2][blocks, self.threads, self.stream](ds, dm, self._in(chunk_decay))
        if not self.on_device:
            states[...], mass[...] = ds.copy_to_host(), dm.copy_to_host()

    def output(self, fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk, causal):
        blocks = self._blocks(fq.shape[0] * fq.shape[1])
        args = [self._in(a) for a in (fq, qnorm, kw, v, knorm, cum)]
        rest = [self._in(a) for a in (states, mass)]
        do, dflags = self._in(out), self._in(flags)
        self.kernels[3][blocks, self.threads, self.stream](
            *args, bool(has_gate), *rest, do, dflags, int(chunk), bool(causal), self.dt(self.rinp.eps))
        if not self.on_device:
            out[...], flags[...] = do.copy_to_host(), dflags.copy_to_host()


def forward(rinp):
    """Random feature attention of canonical inputs with numba.cuda.

    Parameters
    ----------
    rinp : mcattn.rfa._inputs.RFAInputs
        CuPy arrays (or NumPy arrays under the simulator), head dims <= 128.

    Returns
    -------
    out : array ``[BH, Nq, dv]``
    clamped : array of int64 ``[BH]``
    """
    return _gpu.run(rinp, _Launch(rinp))

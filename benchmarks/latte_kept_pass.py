"""Time of LATTE's kept-key pass alone (``mcattn.latte.cpu._block_output``), per kept key.

Usage::

    python benchmarks/latte_kept_pass.py [CHUNK ...]    # key chunks, default 64 128 512 4096

One block of 64 query rows, N = 4096 keys, dv = 64, float32, 15 % of the keys kept per
row at random. Rows printed, in nanoseconds per kept key (best of 5 x 20 calls, CPU time
of this process, one thread):

* ``pv_loop``: ``sum p v`` as a Numba loop over the value columns, four keys per pass
  (the kernel before issue 22's kept-pass work, kept here as the baseline), on NumPy's
  array (16 bytes past a 64-byte boundary);
* ``pv``: :func:`mcattn.latte.cpu.weighted_values` (the row's accumulator in registers,
  :func:`mcattn._cpu_math.gather_axpy`) on the same array, and ``pv_aligned`` on a
  64-byte aligned copy (:func:`mcattn._cpu_math.aligned_rows`, what the kernel uses);
* ``pass``: the whole kept pass on the aligned copy: the kept keys' int8 scores (gathered
  VNNI dot products, :func:`mcattn.latte.vnni.kept_scores`), the softmax and ``P V``.
"""

import sys
import time

import numpy as np

from mcattn._cpu_math import aligned_rows
from mcattn._jit import njit
from mcattn.latte import cpu


@njit(nogil=True, cache=True, fastmath={"nsz", "contract", "reassoc"})
def pv_loop(v, bh, nrows, idxb, cnt, sc, acc, pos, chunk):
    """The former ``weighted_values``: a column loop LLVM vectorises behind alias checks."""
    nk, dv = v.shape[1], v.shape[2]
    acc[:nrows] = 0.0
    pos[:nrows] = 0
    for c0 in range(0, nk, chunk):
        c1 = min(nk, c0 + chunk)
        for i in range(nrows):
            t = pos[i]
            n = cnt[i]
            while t + 4 <= n and idxb[i, t + 3] < c1:
                j0, j1, j2, j3 = idxb[i, t], idxb[i, t + 1], idxb[i, t + 2], idxb[i, t + 3]
                p0, p1, p2, p3 = sc[i, t], sc[i, t + 1], sc[i, t + 2], sc[i, t + 3]
                for cc in range(dv):
                    acc[i, cc] += (p0 * v[bh, j0, cc] + p1 * v[bh, j1, cc]) + (p2 * v[bh, j2, cc]
                                                                            + p3 * v[bh, j3, cc])
                t += 4
            while t < n and idxb[i, t] < c1:
                j = idxb[i, t]
                p = sc[i, t]
                for cc in range(dv):
                    acc[i, cc] += p * v[bh, j, cc]
                t += 1
            pos[i] = t


def _best(fn, args, keys):
    fn(*args)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(20):
            fn(*args)
        best = min(best, (time.process_time() - start) / 20)
    return best / keys * 1e9


def main(chunks):
    rng = np.random.default_rng(0)
    nk, d, bq = 4096, 64, 64
    v = rng.standard_normal((1, nk, d)).astype(np.float32)
    va = aligned_rows(v, nk)
    va[0] = v[0]
    s_k = rng.random((1, nk)).astype(np.float32)
    keep = rng.random((bq, nk)) < 0.15
    idxb = np.zeros((bq, nk + 16), np.int32)
    cnt = keep.sum(1).astype(np.int64)
    for i in range(bq):
        idxb[i, :cnt[i]] = np.flatnonzero(keep[i])
    q8 = rng.integers(-127, 128, (1, bq, d)).astype(np.int8)
    k8 = rng.integers(-127, 128, (1, nk, d)).astype(np.int8)
    kpad = aligned_rows(np.zeros((1, 1, d), np.int8), nk)[0]  # (d = 64: one vector per row)
    corr128 = np.zeros(nk, np.int32)
    cpu._pad_keys(k8, 0, kpad, corr128)
    qb8 = (q8[0].astype(np.int32) + 128).astype(np.uint8)
    dots = np.empty((bq, nk + 32), np.int32)
    sc = rng.random((bq, nk + 16)).astype(np.float32)
    acc = np.empty((bq, d), np.float32)
    pos = np.zeros(bq, np.int64)
    tot = np.zeros(bq, np.float32)
    cvals = np.full(bq, 1e-5)
    out = np.zeros((1, bq, d), np.float32)
    bias = np.zeros((1, 1, 1), np.float32)
    keys = cnt.sum()
    print("# chunk  pv_loop  pv  pv_aligned  pass   (ns per kept key, one thread, CPU time)")
    for chunk in chunks:
        pv_args = (0, bq, idxb, cnt, sc, acc, pos, chunk)
        row = [_best(pv_loop, (v,) + pv_args, keys), _best(cpu.weighted_values, (v,) + pv_args, keys),
               _best(cpu.weighted_values, (va,) + pv_args, keys)]
        args = (np.zeros((bq, d), np.float32), np.zeros((1, d), np.float32), va, s_k, 0, 0, bq, cvals,
                0.125, True, idxb, cnt, sc, acc, pos, tot, chunk, True, qb8, kpad, corr128, dots, out,
                bias, 0, False, True)
        row.append(_best(cpu._block_output, args, keys))
        print(f"{chunk:7d}  " + "  ".join(f"{x:.2f}" for x in row), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64, 128, 512, 4096])

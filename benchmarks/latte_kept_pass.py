"""Time of LATTE's kept-key pass alone (``mcattn.latte.cpu._block_output``), per kept key.

Usage::

    python benchmarks/latte_kept_pass.py [CHUNK ...]    # key chunks, default 64 128 512 4096

One block of 64 query rows, N = 4096 keys, dv = 64, float32, 15 % of the keys kept per
row at random, int8 kept scores read from a dense score tile (the VNNI path): the scores'
scales and row max, the exponentials and ``P V``. Best of 5 x 20 calls, CPU time of this
process (one thread), printed in nanoseconds per kept key for each key chunk.
"""

import sys
import time

import numpy as np

from mcattn.latte import cpu


def main(chunks):
    rng = np.random.default_rng(0)
    nk, d, bq = 4096, 64, 64
    v = rng.standard_normal((1, nk, d)).astype(np.float32)
    s_k = rng.random((1, nk)).astype(np.float32)
    qblk = np.zeros((bq, d), np.float32)  # unused with dense scores
    krows = np.zeros((1, d), np.float32)
    s8 = rng.integers(-30000, 30000, (bq, nk)).astype(np.float32)
    keep = rng.random((bq, nk)) < 0.15
    idxb = np.zeros((bq, nk + 16), np.int32)
    cnt = keep.sum(1).astype(np.int64)
    for i in range(bq):
        idxb[i, :cnt[i]] = np.flatnonzero(keep[i])
    sc = np.empty((bq, nk + 1), np.float32)
    bits = np.empty((1, nk + 1), np.int32)
    acc = np.empty((bq, d), np.float32)
    pos = np.zeros(bq, np.int64)
    tot = np.zeros(bq, np.float32)
    cvals = np.full(bq, 1e-4)
    out = np.zeros((1, bq, d), np.float32)
    print("# chunk  ns_per_kept_key (one thread, CPU time)")
    for chunk in chunks:
        args = (qblk, krows, v, s_k, 0, 0, bq, cvals, 0.125, True, idxb, cnt, sc, bits, acc, pos,
                tot, chunk, True, s8, out)
        cpu._block_output(*args)
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(20):
                cpu._block_output(*args)
            best = min(best, (time.process_time() - start) / 20)
        print(f"{chunk:7d}  {best / cnt.sum() * 1e9:.2f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64, 128, 512, 4096])

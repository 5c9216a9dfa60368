"""Where exact attention's CPU time goes: the kernel against its own two BLAS products.

Usage::

    python benchmarks/exact_phases.py                  # N = 4096, 2 heads, one thread
    python benchmarks/exact_phases.py --n 16384 --causal --rounds 5

On one thread (no scheduling between the two cores in the figures), interleaved, best of
``--rounds``: mcattn's exact kernel (``mcattn.exact.cpu``), the same loop over blocks
doing only the two BLAS products per block (``S = Q K^T`` and ``S V``, on the kernel's
row-major ``K^T`` blocks: what the kernel costs without the softmax), torch SDPA on one
thread, and a large square sgemm (the machine's BLAS rate). Printed as GFLOP/s
(``4 N^2 d`` per head, half with ``--causal``) and as ratios to SDPA measured in the same
round.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcattn import config  # noqa: E402
from mcattn._cpu import _blas_one_thread  # noqa: E402
from mcattn._jit import njit  # noqa: E402
from mcattn.exact.cpu import _exact_tasks, _score_unit, _transpose_key_blocks  # noqa: E402


@njit(nogil=True, cache=True)
def _gemms_only(q, kt, v, scale, block_q, block_k, diag_k, is_causal):
    """The kernel's loop over (query block, key block) with only its two BLAS products
    (causal: the diagonal block in strips of ``diag_k`` keys, as the kernel)."""
    bh_count, nq, d = q.shape
    nk = v.shape[1]
    dv = v.shape[2]
    s_buf = np.empty(block_q * block_k, q.dtype)
    qs = np.empty((block_q, d), q.dtype)
    acc = np.zeros((block_q, dv), q.dtype)
    pv = np.empty((block_q, dv), q.dtype)
    for bh in range(bh_count):
        for i0 in range(0, nq, block_q):
            i1 = min(nq, i0 + block_q)
            nrows = i1 - i0
            for i in range(nrows):
                for c in range(d):
                    qs[i, c] = q[bh, i0 + i, c] * scale
            key_end = min(nk, i1) if is_causal else nk
            for j0 in range(0, key_end, block_k):
                j1 = min(nk, j0 + block_k)  # whole blocks, as the kernel
                if is_causal and j1 - 1 > i0 and diag_k < j1 - j0:
                    kblk = kt[bh, d * j0 : d * j1].reshape((d, j1 - j0))
                    for c0 in range(j0, min(j1, i1), diag_k):
                        w = min(j1, c0 + diag_k) - c0
                        r0 = max(i0, c0) - i0
                        ktd = np.ascontiguousarray(kblk[:, c0 - j0 : c0 - j0 + w])
                        s = s_buf[: (nrows - r0) * w].reshape((nrows - r0, w))
                        np.dot(qs[r0:nrows], ktd, s)
                        np.dot(s, v[bh, c0 : c0 + w], pv[: nrows - r0])
                    continue
                s = s_buf[: nrows * (j1 - j0)].reshape((nrows, j1 - j0))
                np.dot(qs[:nrows], kt[bh, d * j0 : d * j1].reshape((d, j1 - j0)), s)
                np.dot(s, v[bh, j0:j1], pv[:nrows])
                for i in range(nrows):
                    for c in range(dv):
                        acc[i, c] += pv[i, c]
    return acc[0, 0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    n, d = args.n, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((args.heads, n, d), dtype=np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(a)[None] for a in (q, k, v))
    scale = np.float32(d**-0.5)
    bq = max(1, min(int(config.EXACT_CPU_BLOCK_Q), n))
    bk = max(1, min(int(config.EXACT_CPU_BLOCK_K), n))
    diag = max(1, int(config.EXACT_CPU_DIAG_K))
    tasks = args.heads * (-(-n // bq))
    out = np.zeros_like(q)
    lse = np.zeros((args.heads, n), np.float32)
    no_bias, no_index = np.zeros((1, 1, 1), np.float32), np.zeros(1, np.int64)
    big = rng.standard_normal((2048, 2048), dtype=np.float32)

    kt = np.empty((args.heads, n * d), np.float32)

    q_unit, lse_unit = _score_unit(np.float32)
    kscale, kunit = np.float32(d**-0.5 * q_unit), np.float32(lse_unit)

    def kernel():
        _exact_tasks(q, k, v, out, lse, kscale, kunit, no_bias, no_index, False, args.causal, bq,
                     bk, diag, np.int32, 0, tasks)

    def gemms():
        for h in range(args.heads):
            _transpose_key_blocks(k, h, bk, kt[h])
        _gemms_only(q, kt, v, scale, bq, bk, diag, args.causal)

    def sdpa():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)

    def sgemm():
        big @ big

    flops = 4.0 * n * n * d * args.heads / (2 if args.causal else 1)
    cases = {"kernel": (kernel, flops), "gemms_only": (gemms, flops), "sdpa": (sdpa, flops),
             "sgemm_2048": (sgemm, 2.0 * 2048**3)}
    print(f"# exact attention phases, one thread, N={n} heads={args.heads} d={d} float32 "
          f"causal={args.causal}, blocks {bq} x {bk}, best of {args.rounds} interleaved rounds; "
          f"uptime: {os.popen('uptime').read().strip()}")
    with _blas_one_thread():
        for fn, _ in cases.values():
            fn()
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(args.rounds):
            for name, (fn, _) in cases.items():
                time.sleep(0.05)
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"{'phase':>12}  {'GFLOP/s':>8}  {'/sdpa':>7}  {'/kernel':>7}")
    for name, (_, fl) in cases.items():
        if name == "sgemm_2048":
            print(f"{name:>12}  {fl / best[name] / 1e9:8.1f}        -        -")
            continue
        print(f"{name:>12}  {fl / best[name] / 1e9:8.1f}  {best[name] / best['sdpa']:7.3f}  "
              f"{best[name] / best['kernel']:7.3f}")
    print(f"# softmax and bookkeeping (kernel - gemms_only): "
          f"{(best['kernel'] - best['gemms_only']) / best['kernel']:.1%} of the kernel; "
          f"uptime after: {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

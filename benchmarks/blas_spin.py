"""How long NumPy's OpenBLAS threads spin after a GEMM, and what that costs a kernel timed next.

Usage::

    python benchmarks/blas_spin.py                            # OpenBLAS defaults
    OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/blas_spin.py  # workers sleep at once

Prints (1) the process CPU time burnt during a 0.3 s sleep right after one ``x @ w``
(4096 x 384 x 384, float32) and 1 s later, (2) the best and median time of that GEMM
over 55 calls, (3) MCA's shared-draw projection at 20 % uniform budgets timed as the
ratio harness times it (best of 3 calls in a row) right after three GEMMs and 0.15 s
after them, the median over 15 rounds (docs/design.md, entry 21).
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def burnt_during_sleep(fn, gap=0.3):
    fn()
    start = time.process_time()
    time.sleep(gap)
    return time.process_time() - start


def main():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 384)).astype(np.float32)
    w = rng.standard_normal((384, 384)).astype(np.float32)
    gemm = lambda: x @ w  # noqa: E731
    gemm()
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default")
    print(f"# OPENBLAS_THREAD_TIMEOUT={timeout}")
    after = burnt_during_sleep(gemm)
    time.sleep(1.0)
    later = burnt_during_sleep(lambda: None)
    print(f"CPU burnt in a 0.3 s sleep right after a GEMM: {after * 1e3:.1f} ms; 1 s later: "
          f"{later * 1e3:.1f} ms")
    times = []
    for _ in range(55):
        start = time.perf_counter()
        gemm()
        times.append(time.perf_counter() - start)
    times = np.array(times[5:]) * 1e3
    print(f"GEMM 4096x384x384: best {times.min():.2f} ms, median {np.median(times):.2f} ms")

    from benchmarks.bench_mca import sampled_projection, uniform_problem

    heads, layers = uniform_problem(0.2)
    sampled_projection(layers, heads, True)
    results = {}
    for pause in (0.0, 0.15):
        ts = []
        for _ in range(15):
            for _ in range(3):
                gemm()
            time.sleep(pause)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                sampled_projection(layers, heads, True)
                best = min(best, time.perf_counter() - start)
            ts.append(best)
        results[pause] = np.array(ts) * 1e3
    for pause, ts in results.items():
        print(f"mca shared draws (20 % uniform), best of 3 calls {pause:.2f} s after GEMMs: median "
              f"over rounds {np.median(ts):.2f} ms (best {ts.min():.2f} ms)")


if __name__ == "__main__":
    main()

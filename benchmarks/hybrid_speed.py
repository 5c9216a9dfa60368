"""CPU time of hybrid attention over exact attention (numba), one process (issue 26).

``python benchmarks/hybrid_speed.py [--n 4096] [--keep 0.15] [--rounds 3] [--out FILE]``

Inputs ``[1, 8, N, 64]`` float32 (standard normal); hybrid and latte keep the top
``keep * N`` keys of each row by LATTE's estimate (mode ``topk``). Each round times every
call once, in turn, after a warm-up; the ratio is best-of-rounds over exact's best-of-rounds,
and every round's ratio is printed too (a shared machine: look at their spread).
"""

import argparse
import sys
import time

import numpy as np

import mcattn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, args.n, 64), dtype=np.float32) for _ in range(3))
    kk = max(1, round(args.keep * args.n))
    calls = {
        "exact": lambda: mcattn.attention(q, k, v, method="exact", backend="numba"),
        "hybrid pooled": lambda: mcattn.attention(q, k, v, method="hybrid", threshold=kk,
                                                  backend="numba"),
        "hybrid none": lambda: mcattn.attention(q, k, v, method="hybrid", threshold=kk,
                                                remainder="none", backend="numba"),
        "latte topk (int8)": lambda: mcattn.attention(q, k, v, method="latte", threshold=kk,
                                                      mode="topk", backend="numba"),
    }
    for f in calls.values():
        f()  # compile and warm
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    base = min(times["exact"])
    lines = [f"# hybrid CPU time / exact numba, [1, 8, {args.n}, 64] float32, top {kk} keys "
             f"({args.keep:.0%}), {args.rounds} rounds, threads={mcattn.config.num_threads()}",
             "# command: python benchmarks/hybrid_speed.py " + " ".join(argv or sys.argv[1:]),
             "| call | best / exact best | per-round ratios |", "|---|---:|---|"]
    for name, ts in times.items():
        per = ", ".join(f"{t / e:.2f}" for t, e in zip(ts, times["exact"]))
        lines.append(f"| {name} | {min(ts) / base:.2f} | {per} |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU time of hybrid attention over exact attention (numba), one process (issue 26).

``python benchmarks/hybrid_speed.py [--n 4096] [--keep 0.15] [--rounds 3] [--out FILE]``

Inputs ``[1, 8, N, 64]`` float32 (standard normal); hybrid and latte keep the top
``keep * N`` keys of each row by LATTE's estimate (mode ``topk``), or (``relative``) a
relative threshold calibrated (:func:`mcattn.latte.calibrate`) to keep that fraction.
``phase`` rows run the hybrid kernel (:func:`mcattn.hybrid.cpu.forward`) up to a stage
only, on prepared inputs: the estimate tile; plus the keep rule; plus the kept scores,
weights and block shares; the whole kernel (the call's time less the input preparation:
quantisation and checks). Each round times every call once, in turn, after a warm-up; the
ratio is best-of-rounds over exact's best-of-rounds, and every round's ratio is printed too
(a shared machine: look at their spread).
"""

import argparse
import os
import sys
import time

import numpy as np

import mcattn
from mcattn.hybrid import cpu
from mcattn.latte._inputs import prepare_latte


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
    theta = mcattn.latte.calibrate(q, k, target_keep=args.keep)

    def prepared(threshold, mode):
        return prepare_latte(q, k, v, threshold=threshold, mode=mode, attn_mask=None,
                             key_padding_mask=None, is_causal=False, scale=None,
                             exact_scores="float", check_finite=True, want_mass=False)

    lat_top, lat_rel = prepared(kk, "topk"), prepared(theta, "relative")
    calls = {
        "exact": lambda: mcattn.attention(q, k, v, method="exact", backend="numba"),
        "hybrid pooled": lambda: mcattn.attention(q, k, v, method="hybrid", threshold=kk,
                                                  backend="numba"),
        "hybrid none": lambda: mcattn.attention(q, k, v, method="hybrid", threshold=kk,
                                                remainder="none", backend="numba"),
        "latte topk (int8)": lambda: mcattn.attention(q, k, v, method="latte", threshold=kk,
                                                      mode="topk", backend="numba"),
        "hybrid pooled, relative": lambda: mcattn.attention(q, k, v, method="hybrid", threshold=theta,
                                                            mode="relative", backend="numba"),
        "latte relative (int8)": lambda: mcattn.attention(q, k, v, method="latte", threshold=theta,
                                                          mode="relative", backend="numba"),
        "input preparation (quantise)": lambda: prepared(kk, "topk"),
    }
    for label, lat in (("topk", lat_top), ("relative", lat_rel)):
        for stage, name in ((1, "estimate"), (2, "+ keep rule"), (3, "+ kept scores, shares"),
                            (4, "whole kernel")):
            calls[f"phase {label}: {name}"] = (lambda lt=lat, st=stage: cpu.forward(lt, "pooled", 16, st))
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
             f"({args.keep:.0%}; relative: threshold calibrated to keep {args.keep:.0%}), "
             f"{args.rounds} rounds, threads={mcattn.config.num_threads()}, "
             f"load average {os.getloadavg()[0]:.1f} at the start",
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

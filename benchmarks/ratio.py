"""Ratio harness: mcattn's time over a baseline's, measured in one process.

Usage::

    python benchmarks/ratio.py exact                 # numba / torch SDPA, N = 1024 ... 16384
    python benchmarks/ratio.py exact --sizes 1024 4096 --causal
    python benchmarks/ratio.py exact --memory        # also peak RSS growth at each N

Timings on this (shared, noisy) machine are only comparable as ratios: each row times
the mcattn call and the baseline alternately, several rounds, and keeps the best of each.
Bare seconds are printed for context only.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common import best_time, exact, qkv, sdpa  # noqa: E402

_MEMORY_SNIPPET = """
import sys
sys.path.insert(0, {bench_dir!r})
from benchmarks.common import exact, qkv, rss_growth_mib, sdpa
q, k, v = qkv({n}, heads={heads})
if {which!r} == "mcattn":
    run = lambda: exact(q, k, v, "numba", {causal})
else:
    run = lambda: sdpa(q, k, v, {causal})
small = qkv(64, heads=1)
exact(*small, "numba") if {which!r} == "mcattn" else sdpa(*small)  # compile / warm up
print(rss_growth_mib(run))
"""


def peak_growth_mib(which, n, heads, causal):
    """Peak resident-memory growth (MiB) during one call, in a fresh process."""
    code = _MEMORY_SNIPPET.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), n=n,
                                  heads=heads, causal=causal, which=which)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def exact_rows(sizes, causal, rounds, heads, memory):
    for n in sizes:
        q, k, v = qkv(n, heads=heads)
        ours = lambda: exact(q, k, v, "numba", causal)  # noqa: E731
        base = lambda: sdpa(q, k, v, causal)  # noqa: E731
        ours()
        base()
        reps = 3 if n <= 4096 else 1
        t_ours = t_base = float("inf")
        for _ in range(rounds):
            t_ours = min(t_ours, best_time(ours, reps))
            t_base = min(t_base, best_time(base, reps))
        row = {"N": n, "mcattn_s": t_ours, "sdpa_s": t_base, "ratio": t_ours / t_base}
        if memory:
            row["mcattn_peak_mib"] = peak_growth_mib("mcattn", n, heads, causal)
            row["sdpa_peak_mib"] = peak_growth_mib("sdpa", n, heads, causal)
        yield row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["exact"], help="what to measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS growth per call (subprocess)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    import numba
    import numpy as np
    import torch

    print(f"# mcattn exact (numba) vs torch {torch.__version__} SDPA, B=1 H={args.heads} d=64 "
          f"float32, causal={args.causal}; numba {numba.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    header = f"{'N':>6} {'mcattn s':>10} {'SDPA s':>10} {'ratio':>7}"
    if args.memory:
        header += f" {'mcattn MiB':>11} {'SDPA MiB':>9}"
    print(header)
    rows = []
    for row in exact_rows(args.sizes, args.causal, args.rounds, args.heads, args.memory):
        line = f"{row['N']:>6} {row['mcattn_s']:>10.4f} {row['sdpa_s']:>10.4f} {row['ratio']:>7.2f}"
        if args.memory:
            line += f" {row['mcattn_peak_mib']:>11.1f} {row['sdpa_peak_mib']:>9.1f}"
        print(line, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

"""Where ``share="batch"`` spends its time on the embedded sample's real budgets (all 6
layers): best-of-N times, back to back, of the budget rounding, the plan alone
(``shared_cpu.make_plan`` on the batch end to end; the projection plans inside its head
tasks), the compiled projection, the public ``mca.value_projection`` call, and the dense
GEMM over the real tokens; and how the kept multiply-adds split between exact keys and
the pieces (zeros included). ``--pieces 16 32 64`` / ``--chunks 1 2 6`` also time the
projection for each ``shared_cpu.BATCH_PIECE`` / ``BATCH_CHUNKS`` (how they were chosen).
Usage: ``python benchmarks/mca_batch_phases.py [--alpha 1.0] [--pieces ...] [--chunks ...]``
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks.bench_mca import packed_dense_projection, real_problem  # noqa: E402

from mcattn import config, mca  # noqa: E402
from mcattn.mca import naive, shared, shared_cpu  # noqa: E402
from mcattn.mca.shared import round_budgets  # noqa: E402


def _best(fn, n):
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pieces", type=int, nargs="*", default=[])
    parser.add_argument("--chunks", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    heads, layers, kpm = real_problem(args.alpha)
    d_in = layers[0][0].shape[-1]
    prep = [(x, w, b, naive.shared_budgets(r, d_in, False, round_budgets, "batch"), t)
            for x, w, b, r, t in layers]
    ones = [naive.batch_as_one_row(x, rr)[1] for x, _, _, rr, _ in prep]
    phases = {
        "round": lambda: [naive.shared_budgets(r, d_in, False, round_budgets, "batch")
                          for _, _, _, r, _ in layers],
        "plan": lambda: [shared_cpu.make_plan(one, 0, t, naive.SHARED_BATCH_STREAM_BASE)
                         for one, (_, _, _, _, t) in zip(ones, prep)],
        "projection": lambda: [shared_cpu.value_projection(x, w, b, heads, rr, 0, t, "batch")
                               for x, w, b, rr, t in prep],
        "api": lambda: [mca.value_projection(x, w, b, num_heads=heads, budgets=rr, seed=0,
                                             shared_draws=True, share="batch", tables=t)
                        for x, w, b, rr, t in prep],
        "packed_dense": lambda: packed_dense_projection(layers, heads, kpm),
    }
    print(f"# alpha {args.alpha}, 6 layers, {config.num_threads()} threads, best of "
          f"{args.repeats} back to back, ms")
    for name, fn in phases.items():
        fn()
        print(f"{name:>14} {_best(fn, args.repeats):8.3f}")
    for attr, values in (("BATCH_PIECE", args.pieces), ("BATCH_CHUNKS", args.chunks)):
        keep = getattr(shared_cpu, attr)
        for value in values + values:  # twice, interleaved: the noise shows
            setattr(shared_cpu, attr, value)
            phases["projection"]()
            print(f"projection {attr}={value:<4} {_best(phases['projection'], args.repeats):8.3f}")
        setattr(shared_cpu, attr, keep)
    exact = pieces = useful = dense = 0
    for x, w, _, rr, t in prep:
        nz = x.any(-1)
        dh = w.shape[1] // heads
        exact += int(((rr >= d_in) & nz[:, None, :]).sum()) * d_in * dh
        pieces += shared_cpu.reduced_macs(rr, d_in, dh, 0, t, nz, "batch")[0]
        useful += shared.reduced_macs(rr, d_in, dh, 0, t, nz, "batch")[0]
        dense += int(kpm.sum()) * d_in * w.shape[1]
    print(f"# MACs / dense over the real tokens: exact keys {exact / dense:.3f}, pieces "
          f"{pieces / dense:.3f} (merged rows without the zeros {useful / dense:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

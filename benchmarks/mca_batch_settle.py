"""Per-call times of MCA's shared draws (``share="batch"``) on the embedded sample's real
budgets (alpha 1.0, all 6 layers) right after a pause and back to back, with 2 threads and 1,
next to the dense GEMM over the real tokens: why ``ratio.py mca --packed`` with its default
pause (``--settle 0.15``) and without it differ (docs/mca.md, "Speed on the CPU").

Usage: ``python benchmarks/mca_batch_settle.py [--alpha 1.0] [--calls 12]``
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks.bench_mca import packed_dense_projection, real_problem, sampled_projection  # noqa: E402

from mcattn import config  # noqa: E402


def _times(fn, calls):
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=12)
    args = parser.parse_args(argv)
    heads, layers, kpm = real_problem(args.alpha)
    batch = lambda: sampled_projection(layers, heads, True, share="batch")  # noqa: E731
    packed = lambda: packed_dense_projection(layers, heads, kpm)  # noqa: E731
    batch(), packed()
    print(f"# ms per call (6 layers), alpha {args.alpha}; 'after pause': 0.15 s sleep, then "
          f"{args.calls} calls back to back")
    for threads in (None, 1):
        config.NUM_THREADS = threads
        label = f"{config.num_threads()} threads"
        for name, fn in (("batch", batch), ("packed", packed)):
            time.sleep(0.15)
            after = _times(fn, args.calls)
            print(f"{label:>10} {name:>7} after pause: " + " ".join(f"{t:.2f}" for t in after))
    config.NUM_THREADS = None
    return 0


if __name__ == "__main__":
    sys.exit(main())

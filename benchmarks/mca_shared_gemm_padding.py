"""Work of MCA's shared-draw paths on CuPy, counted from the host plan (no GPU needed).

``python benchmarks/mca_shared_gemm_padding.py [--out docs/measurements/mca-shared-gemm-work.txt]``

For the cases of ``benchmarks/gpu/mca_shared_vs_dense.py`` (its ``CASES``, ``D_IN``,
``HEADS``, ``DH`` and budgets) it builds the plan (``shared_cpu.make_plan``) and prints
per case: groups per head (mean), the head's distinct drawn rows (mean and the largest,
``R``: the GEMM path pads every head to it), and multiply-adds relative to the dense
projection ``N * D_IN * HEADS * DH``: the kernel path's (each sampled token its group's
width) and the GEMM path's (``N * R`` per head; exact tokens counted densely in both).
Counts, not timings.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "benchmarks" / "gpu"), str(ROOT)]
    import mca_shared_vs_dense as bench

    from mcattn import mca
    from mcattn.mca import shared_cpu

    heads, d_in, dh = bench.HEADS, bench.D_IN, bench.DH
    lines = ["# benchmarks/mca_shared_gemm_padding.py: MCA shared-draw work from the host plan "
             f"(x [1, N, {d_in}], {heads} heads x {dh}, budgets of benchmarks/gpu/mca_shared_vs_dense.py)",
             f"{'budgets':8s} {'N':>6s} {'groups/head':>11s} {'rows mean':>9s} {'R (max)':>7s} "
             f"{'kernel MACs/dense':>17s} {'gemm MACs/dense':>15s}"]
    for kind, n in bench.CASES:
        rng = np.random.default_rng(n)
        rng.standard_normal((1, n, d_in), dtype=np.float32)  # the draws of the bench's x, w, b first
        w = rng.standard_normal((d_in, heads * dh), dtype=np.float32)
        rng.standard_normal(heads * dh, dtype=np.float32)
        r = bench._budgets(kind, n, rng)
        plan = shared_cpu.make_plan(r, 5, mca.weight_tables(w, heads))
        groups = np.diff(plan.group_ptr)
        distinct = np.diff(plan.row_base)
        g = plan.group_of.reshape(heads, n)
        exact = int((g == -1).sum())
        widths = np.concatenate([plan.width[plan.group_ptr[h]:][g[h][g[h] >= 0]] for h in range(heads)])
        dense = n * d_in * heads * dh
        kernel = (int(widths.sum()) + exact * d_in) * dh
        gemm = (n * int(distinct.max(initial=0)) * heads + exact * d_in) * dh
        lines.append(f"{kind:8s} {n:6d} {groups.mean():11.1f} {distinct.mean():9.1f} "
                     f"{int(distinct.max()):7d} {kernel / dense:17.3f} {gemm / dense:15.3f}")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    main()

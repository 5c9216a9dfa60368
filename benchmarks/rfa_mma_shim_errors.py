"""Accuracy of rfa on tensor cores (non-causal and causal) under the host shim (no GPU needed).

``python benchmarks/rfa_mma_shim_errors.py [--out docs/measurements/rfa-mma-shim-errors.txt]``

Runs ``rfa/kernels/rfa_mma.cu`` on the fake CuPy of ``tests/cuda`` for the cases of
``tests/cuda/test_rfa_mma_cuda.py`` (its ``CASES`` / ``grid_case``, ``CAUSAL_CASES`` /
``causal_case`` and ``check``, which
also asserts its tolerances) and prints, per case, the relative (Frobenius) error of
the output against float64 rfa on the CPU with the same features, in unit roundoffs u
of the 16-bit type (2^-11 float16, 2^-8 bfloat16). The tests hold it to 1.5 u (and above 0.1 u).
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "tests" / "cuda"), str(ROOT / "tests"), str(ROOT)]
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # what the test conftest sets without a GPU: the fake runs
    import fake_cupy
    import test_rfa_mma_cuda as t

    lines = ["# benchmarks/rfa_mma_shim_errors.py: rel. error / u of rfa_mma.cu vs float64 rfa "
             "(numpy backend, same features), host shim",
             f"{'type':9s} {'form':6s} {'N':>4s} {'chunk':>5s} {'gate':>4s} {'d':>4s} {'dv':>4s} {'m':>4s} "
             f"{'out / u':>8s}"]

    def row(precision, form, n, chunk, gate, d, dv, m, err):
        lines.append(f"{precision:9s} {form:6s} {n:4d} {chunk:>5s} {gate:>4s} {d:4d} {dv:4d} {m:4d} "
                     f"{err:8.2f}")
        print(lines[-1], flush=True)

    with fake_cupy.cupy_context() as cp:
        for d, dv, m, precision in t.CASES:
            row(precision, "full", 130, "-", "-", d, dv, m, t.check(cp, precision, *t.grid_case(d, dv, m)))
        for n, d, dv, m, chunk, gate, precision in t.CAUSAL_CASES:
            q, k, v, feats, kw = t.causal_case(n, d, dv, m, gate)
            err = t.check(cp, precision, q, k, v, feats, chunk_size=chunk, **kw)
            row(precision, "causal", n, str(chunk), "yes" if gate else "no", d, dv, m, err)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

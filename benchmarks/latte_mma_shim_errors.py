"""Accuracy of LATTE's tensor-core kernel under the host shim (no GPU needed).

``python benchmarks/latte_mma_shim_errors.py [--out docs/measurements/latte-mma-shim-errors.txt]``

Runs ``latte/kernels/latte_mma.cu`` on the fake CuPy of ``tests/cuda`` (the CUDA C under
the host shim, its warps and mma.sync emulated) for the cases of
``tests/cuda/test_latte_mma_cuda.py`` (its ``grid_case``, ``mask_cases`` and
``block_diagonal_case``, and its
``_check``, which also asserts the kept sets key for key) and prints, per case, the
relative (Frobenius) error against float64 LATTE on the same kept sets with v rounded
to the 16-bit type, in unit roundoffs u of that type (2^-11 float16, 2^-8 bfloat16), and
against float64 LATTE on the unrounded v. The tests hold the first to 0.5 u.
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
    sys.path[:0] = [str(ROOT / "tests" / "cuda"), str(ROOT / "tests"), str(ROOT)]
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # what the test conftest sets without a GPU: the fake runs
    import fake_cupy
    import test_latte_mma_cuda as t

    lines = ["# benchmarks/latte_mma_shim_errors.py: rel. error / u vs float64 LATTE (same kept sets) "
             "on v rounded to the type (and on the float32 v), host shim",
             f"{'type':9s} {'mode':9s} {'d':>4s} {'case':13s} {'kept':>5s} {'out / u':>15s}"]
    with fake_cupy.cupy_context() as cp:
        cases = [(p, m, d, "grid", *t.grid_case(m, d), {}) for m, d, p in t.CASES]
        cases += [(p, "relative", 32, label, q, k, v, theta, mask)
                  for p in ("float16", "bfloat16") for label, q, k, v, theta, mask in t.mask_cases()]
        cases += [("float16", "relative", 32, f"blockdiag {theta}", *t.block_diagonal_case(), theta, {})
                  for theta in (8.0, np.inf)]  # the skip test's inputs
        for precision, mode, d, label, q, k, v, theta, mask in cases:
            r = t._check(cp, precision, q, k, v, theta, mode, **mask)
            lines.append(f"{precision:9s} {mode:9s} {d:4d} {label:13s} {r['keep'].mean():5.3f} "
                         f"{r['err']:5.2f} ({r['unrounded']:5.2f})")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

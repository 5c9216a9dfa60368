"""Accuracy of E-Att's tensor-core kernels (Hamming and L1) under the host shim (no GPU needed).

``python benchmarks/eatt_mma_shim_errors.py [--out docs/measurements/eatt-mma-shim-errors.txt]``

Runs ``eatt/kernels/eatt_mma.cu`` on the fake CuPy of ``tests/cuda`` for the cases of
``tests/cuda/test_eatt_mma_cuda.py`` (its ``CASES``, ``L1_CASES``, ``grid_case``, ``mask_cases`` and
``check``, which also asserts its tolerances) and prints, per case, the relative
(Frobenius) error against float64 E-Att with v rounded to the 16-bit type, in unit
roundoffs u of that type (2^-11 float16, 2^-8 bfloat16), and against float64 E-Att on
the unrounded v. The tests hold the first to 0.5 u.
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
    import test_eatt_mma_cuda as t

    lines = ["# benchmarks/eatt_mma_shim_errors.py: rel. error / u vs float64 E-Att on v rounded "
             "to the type (and on the float32 v), host shim",
             f"{'align':8s} {'type':9s} {'d':>4s} {'dv':>4s} {'case':13s} {'out / u':>15s}"]
    with fake_cupy.cupy_context() as cp:
        cases = [("hamming", p, d, dv, "grid", *t.grid_case(d, dv), {}) for d, dv, p in t.CASES]
        cases += [("l1", p, d, dv, "grid", *t.grid_case(d, dv), {}) for d, dv, p in t.L1_CASES]
        cases += [(a, p, q.shape[-1], v.shape[-1], label, q, k, v, mask) for a in ("hamming", "l1")
                  for p in ("float16", "bfloat16") for label, q, k, v, mask in t.mask_cases()]
        for alignment, precision, d, dv, label, q, k, v, mask in cases:
            err, far = t.check(cp, precision, q, k, v, alignment, **mask)
            lines.append(f"{alignment:8s} {precision:9s} {d:4d} {dv:4d} {label:13s} {err:5.2f} ({far:5.2f})")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

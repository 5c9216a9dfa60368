"""Accuracy of LATTE's tensor-core hard-mask backward under the host shim (no GPU needed).

``python benchmarks/latte_mma_backward_shim_errors.py [--out docs/measurements/latte-mma-backward-shim-errors.txt]``

Runs ``latte/kernels/latte_mma_backward.cu`` (dq pass, then dk/dv pass) on the fake CuPy
of ``tests/cuda`` for every case of ``tests/cuda/test_latte_mma_backward_cuda.py``
(``CASES``, through its ``check``, which also asserts the launches and the computed tiles)
and prints, per case, the relative (Frobenius) error of dq, dk and dv against the float64
host backward (same q, k, so the same kept sets; v and dO rounded to the 16-bit type), in
unit roundoffs u of that type (2^-11 float16, 2^-8 bfloat16), the kept fraction and the
(block, tile) pairs computed / visited by each pass.
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
    import test_latte_mma_backward_cuda as t

    lines = ["# benchmarks/latte_mma_backward_shim_errors.py: rel. error / u of each gradient vs the "
             "float64 host backward (same kept sets and int8 scores; q, k, v, dO rounded to the type after the "
             "quantisation), and vs latte.grad.backward on float64 (v, dO rounded), host shim",
             f"{'type':9s} {'case':18s} {'kept':>5s} {'dq/u':>6s} {'dk/u':>6s} {'dv/u':>6s}  (vs grad.backward: "
             f"{'dq/u':>6s} {'dk/u':>6s} {'dv/u':>6s}) "
             f"{'dq tiles':>9s} {'dkdv tiles':>10s}"]
    with fake_cupy.cupy_context() as cp:
        for label, precision, build in t.CASES:
            q, k, v, dout, threshold, kw = build()
            errs, keep, tiles = t.check(cp, precision, q, k, v, dout, threshold, label, **kw)
            lines.append(f"{precision:9s} {label:18s} {keep.mean():5.3f} {errs['q']:6.3f} {errs['k']:6.3f} "
                         f"{errs['v']:6.3f}  ({' ' * 18}{errs['host q']:6.3f} {errs['host k']:6.3f} {errs['host v']:6.3f}) {tiles[1]:4d}/{tiles[0]:<4d} {tiles[3]:5d}/{tiles[2]:<4d}")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Accuracy of LATTE's tensor-core hard-mask backward under the host shim (no GPU needed).

``python benchmarks/latte_mma_backward_shim_errors.py
[--out docs/measurements/latte-mma-backward-shim-errors.txt]``

Runs ``latte/kernels/latte_mma_backward.cu`` (dq pass, then dk/dv pass) on the fake CuPy
of ``tests/cuda`` for every case of ``tests/cuda/test_latte_mma_backward_cuda.py``
(``CASES``, through its ``check``, which also asserts the launches and the computed tiles)
and prints, per case, the relative (Frobenius) error of dq, dk and dv against the float64
host backward (same q, k, so the same kept sets; v and dO rounded to the 16-bit type), in
unit roundoffs u of that type (2^-11 float16, 2^-8 bfloat16), the kept fraction and the
(block, tile) pairs computed / visited by each pass; then the error of the selftest row
``latte-mma-bwd`` as the selftest measures it.
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

    lines = ["# benchmarks/latte_mma_backward_shim_errors.py, host shim: error / u of each gradient vs "
             "float64 with the same kept sets and int8 scores and q, k, v, dO rounded to the type after "
             "the quantisation (over the size |dS||K|, |dS|^T|Q|, P^T|dO|); in brackets the relative "
             "error vs latte.grad.backward on float64 (v, dO rounded); (block, tile) pairs computed / "
             "visited by each pass",
             f"{'type':9s} {'case':17s} {'kept':>5s} {'dq/u':>6s} {'dk/u':>6s} {'dv/u':>6s}  "
             f"({'dq/u':>6s} {'dk/u':>6s} {'dv/u':>6s})  {'dq tiles':>9s} {'dkdv tiles':>10s}"]
    with fake_cupy.cupy_context() as cp:
        for label, precision, build in t.CASES:
            q, k, v, dout, threshold, kw = build()
            errs, keep, tiles = t.check(cp, precision, q, k, v, dout, threshold, label, **kw)
            host = " ".join(f"{errs['host ' + n]:6.3f}" for n in "qkv")
            lines.append(f"{precision:9s} {label:17s} {keep.mean():5.3f} "
                         + " ".join(f"{errs[n]:6.3f}" for n in "qkv")
                         + f"  ({host})  {tiles[1]:4d}/{tiles[0]:<4d} {tiles[3]:5d}/{tiles[2]:<4d}")
            print(lines[-1], flush=True)
        # the selftest row latte-mma-bwd: its measure, max|out - ref| / max|ref| vs float64 NumPy
        import numpy as np

        from mcattn.latte import spec

        check = spec.METHOD.checks["latte-mma-bwd"]
        ref = check.run(lambda a: a, "numpy", np.float64)
        got = check.run(cp.asarray, "cupy", np.float32).get()
        err = np.abs(got - ref).max() / np.abs(ref).max()
        lines.append(f"selftest latte-mma-bwd (float16): max error {err:.2e}"
                     f" (tolerance {check.tolerance['float32']:.1e})")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""MCA's shared-draw value projection on CuPy against the dense projection on cuBLAS.

``python benchmarks/gpu/mca_shared_vs_dense.py [--out docs/measurements/gpu-mca-shared.txt]``
on a machine with an NVIDIA GPU, CuPy and torch (``tests/cuda/on_device.sh`` runs it).

The issue's goal: shared draws with budgets of 20 % of ``d_in`` in at most 0.6x the time
of the dense projection ``x @ w + b`` (cuBLAS), same process, same GPU. Per case ``x``
``[1, N, D_IN]``, ``w`` ``[D_IN, HEADS * DH]`` standard normal, a bias, weight tables
computed once (``mca.weight_tables``), budgets per (head, token) either ``uniform``
(every token 20 % of ``D_IN``: one group per head) or ``mixed`` (uniform integers in
``[1, 40 %)``, mean 20 %, rounded as ``mca.attention`` rounds them:
``shared.round_budgets`` with ``config.MCA_SHARED_SLACK``):

* ``gemm``: ``mca.value_projection(..., shared_draws=True, backend="cupy")`` with
  ``config.MCA_SHARED_CUPY = "gemm"`` (the default: the host plan, then gathers and one
  batched cuBLAS GEMM);
* ``kernel``: the same with ``"kernel"`` (``mca_shared.cu``, one thread per element);
* ``dense``: ``cupy.matmul(x, w) + b`` split into heads (a contiguous ``[1, H, N, DH]``).

Both include the host plan (``shared_cpu.make_plan``) and its upload, as a call does.
Times are medians of 3 runs (``exact_mma_vs_sdpa._time``). Each case checks the two paths
against each other and against the CPU path (``shared_cpu.value_projection``, same
draws) to 1e-5 relative (float32). One summary line per budget kind; exit status 1 on
any mismatch or error.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_mma_vs_sdpa import _time, finish, run_cases  # noqa: E402  (written once)

CASES = [("uniform", 1024), ("uniform", 4096), ("mixed", 1024), ("mixed", 4096)]
D_IN, HEADS, DH = 384, 12, 64
TOLERANCE = 1e-5


def _budgets(kind, n, rng):
    from mcattn import config
    from mcattn.mca import shared

    if kind == "uniform":
        return np.full((1, HEADS, n), max(1, round(0.2 * D_IN)), np.int64)
    r = rng.integers(1, max(2, round(0.4 * D_IN)), (1, HEADS, n))
    return shared.round_budgets(r, D_IN, config.MCA_SHARED_SLACK)


def _case(kind, n, sync):
    import cupy

    from mcattn import config, mca
    from mcattn.mca import shared_cpu

    rng = np.random.default_rng(n)
    x_h = rng.standard_normal((1, n, D_IN), dtype=np.float32)
    w_h = rng.standard_normal((D_IN, HEADS * DH), dtype=np.float32)
    b_h = rng.standard_normal(HEADS * DH, dtype=np.float32)
    r = _budgets(kind, n, rng)
    tables = mca.weight_tables(w_h, HEADS)
    x, w, b, r_d = (cupy.asarray(a) for a in (x_h, w_h, b_h, r))

    def shared(path):
        def call():
            saved, config.MCA_SHARED_CUPY = config.MCA_SHARED_CUPY, path
            try:
                return mca.value_projection(x, w, b, num_heads=HEADS, budgets=r_d, seed=5, shared_draws=True,
                                            backend="cupy", tables=tables)
            finally:
                config.MCA_SHARED_CUPY = saved
        return call

    def dense():
        return cupy.ascontiguousarray((cupy.matmul(x, w) + b).reshape(1, n, HEADS, DH).transpose(0, 2, 1, 3))

    outs = {path: shared(path)().get().astype(np.float64) for path in ("gemm", "kernel")}
    times = {path: _time(shared(path), sync) for path in ("gemm", "kernel")}
    dense()
    times["dense"] = _time(dense, sync)
    ref = shared_cpu.value_projection(x_h, w_h, b_h, HEADS, r, 5, tables).astype(np.float64)
    errs = [float(np.linalg.norm(outs[p] - ref) / np.linalg.norm(ref)) for p in ("gemm", "kernel")]
    return times, max(errs)


def main(argv=None):
    def measure(case, sync):
        kind, n = case
        t, err = _case(kind, n, sync)
        line = (f"{kind:8s} {n:6d} {t['gemm'] * 1e3:8.3f} {t['kernel'] * 1e3:9.3f} {t['dense'] * 1e3:8.3f} "
                f"{t['gemm'] / t['dense']:10.2f} {t['kernel'] / t['dense']:12.2f} {err:8.1e}")
        return line, [] if err < TOLERANCE else [f"rel err {err:.2e}"], t["gemm"] / t["dense"]

    args, lines, results, bad = run_cases(
        argv, __doc__, "mca_shared_vs_dense.py",
        f"; x [1, N, {D_IN}], {HEADS} heads x {DH}, budgets 20 % of d_in, float32",
        f"{'budgets':8s} {'N':>6s} {'gemm ms':>8s} {'kernel ms':>9s} {'dense ms':>8s} {'gemm/dense':>10s} "
        f"{'kernel/dense':>12s} {'rel err':>8s}",
        CASES, lambda c: f"mca_shared {c[0]} N={c[1]}", measure)
    grouped = {}
    for (kind, _), ratio in results:
        grouped.setdefault(kind, []).append(ratio)
    summary = [f"summary: mca shared draws ({kind} budgets, cuBLAS GEMMs) / dense cuBLAS projection "
               f"{min(rows):.2f}-{max(rows):.2f} over {len(rows)} N (goal <= 0.6)"
               for kind, rows in grouped.items()]
    return finish(args, lines, summary, bad, "both paths equal to the CPU path's estimate (same draws)")


if __name__ == "__main__":
    sys.exit(main())

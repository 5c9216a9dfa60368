"""LATTE's tensor-core forward (``latte/kernels/latte_mma.cu``) against torch SDPA, on a GPU.

``python benchmarks/gpu/latte_mma_vs_sdpa.py [--out docs/measurements/gpu-latte-mma.txt]``
on a machine with an NVIDIA GPU, CuPy and torch (``tests/cuda/on_device.sh`` runs it).

The issue's goal: LATTE keeping 15 % of the keys at N = 8k-32k in at most 0.5x the time
of SDPA (flash, float16 / bfloat16), same process, same GPU. Per case, ``[1, 8, N, 64]``:

* inputs ``random`` (standard normal q, k, v: the kept keys are spread over every tile,
  so no tile is skipped; the worst case) or ``clustered`` (every 64-token block belongs
  to one of 7 clusters, q and k near their cluster's centre: the kept keys fill about a
  seventh of the 64 x 64 tiles, the block-sparse structure that tile skipping exploits);
* the relative threshold found by bisection so that 15 % (+-1 %) of the (query, key)
  pairs are kept, counted by the kernel itself;
* ``call``: ``mcattn.latte.attention(..., backend="cupy", check_finite=False)`` with
  ``config.LATTE_TENSOR_CORES`` set (quantisation of q and k included); ``kernel``: the
  kernel's launcher alone on prepared inputs (``mcattn.latte.cupy.forward``);
* ``sdpa``: ``scaled_dot_product_attention`` on the same values in that type (flash).

Times are medians of 3 runs (``exact_mma_vs_sdpa._time``). Each case also checks the
tensor-core kernel against today's float32 kernel (``latte.cu``, the knob off) on the same
inputs: the kept counts of every row equal, the outputs within 4 unit roundoffs of the
16-bit type (relative, Frobenius). A case that errors prints its error line and the
script goes on; a summary line per type and input kind ends the output; the exit status
is 1 on any mismatch or error.
"""

import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_mma_vs_sdpa import _time, finish, run_cases  # noqa: E402  (written once)

#: (type, N) of the timed cases; d = 64, 8 heads.
CASES = [("float16", 8192), ("float16", 16384), ("float16", 32768), ("bfloat16", 16384)]
KINDS = ("random", "clustered")
HEADS, HEAD_DIM = 8, 64
KEEP = 0.15
TOLERANCE = {"float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8}
CLUSTERS = 7


def _inputs(kind, shape, rng):
    """float32 q, k, v of ``shape`` (NumPy)."""
    b, h, n, d = shape
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    if kind == "clustered":
        blocks = -(-n // 64)
        ids = np.repeat(rng.integers(0, CLUSTERS, size=(b, h, blocks)), 64, axis=-1)[..., :n]
        centres = 3.0 * rng.standard_normal((b, h, CLUSTERS, d), dtype=np.float32)
        at = np.take_along_axis(centres, ids[..., None], axis=2)
        q = (at + 0.5 * q).astype(np.float32)
        k = (at + 0.5 * k).astype(np.float32)
    return q, k, v


def _prepared(q, k, v, theta):
    from mcattn.latte._inputs import prepare_latte

    return prepare_latte(q, k, v, threshold=theta, mode="relative", attn_mask=None,
                         key_padding_mask=None, is_causal=False, scale=None, exact_scores="int8",
                         check_finite=False, want_mass=False)


def _threshold(q, k, v, keep=KEEP):
    """Relative threshold keeping ``keep`` of the pairs (+-1 %): bisection on the kernel's counts."""
    from mcattn.latte import cupy as latte_cupy

    pairs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    lo, hi = 0.0, 64.0
    theta = hi
    for _ in range(30):
        theta = 0.5 * (lo + hi)
        fraction = float(latte_cupy.forward(_prepared(q, k, v, theta))[1].sum()) / pairs
        if abs(fraction - keep) < 0.01:
            break
        lo, hi = (theta, hi) if fraction < keep else (lo, theta)
    return theta, fraction


def _case(precision, kind, n, sync):
    """Times (call, kernel, SDPA), kept and computed-tile fractions, and the check's error."""
    import cupy
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mcattn
    from mcattn.latte import cupy as latte_cupy

    shape = (1, HEADS, n, HEAD_DIM)
    host = _inputs(kind, shape, np.random.default_rng(n + len(kind)))
    q, k, v = (cupy.asarray(a) for a in host)
    tq, tk, tv = (torch.as_tensor(a, device="cuda").to(getattr(torch, precision)) for a in host)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mcattn.config.LATTE_TENSOR_CORES = precision
    try:
        theta, fraction = _threshold(q, k, v)
        lat = _prepared(q, k, v, theta)
        ours, kept, _ = latte_cupy.forward(lat)
        estimated, computed = latte_cupy.last_tile_counts()
        t_call = _time(lambda: mcattn.latte.attention(q, k, v, threshold=theta, backend="cupy",
                                                      check_finite=False), sync)
        t_kernel = _time(lambda: latte_cupy.forward(lat), sync)
    finally:
        mcattn.config.LATTE_TENSOR_CORES = None
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        sdpa(tq, tk, tv)
        t_sdpa = _time(lambda: sdpa(tq, tk, tv), sync)
    ref, ref_kept, _ = latte_cupy.forward(_prepared(q, k, v, theta))  # latte.cu, float32
    same_kept = bool((kept == ref_kept).all())
    a, b = ours.get().astype(np.float64), ref.get().astype(np.float64)
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return dict(call=t_call, kernel=t_kernel, sdpa=t_sdpa, kept=fraction, theta=theta,
                tiles=computed / max(estimated, 1), err=err, same_kept=same_kept)


def main(argv=None):
    def measure(case, sync):
        precision, kind, n = case
        r = _case(precision, kind, n, sync)
        problems = [] if r["same_kept"] else ["kept counts differ from latte.cu"]
        problems += [] if r["err"] < TOLERANCE[precision] else [f"rel err {r['err']:.2e}"]
        line = (f"{precision:9s} {kind:9s} {n:6d} {r['theta']:6.2f} {r['kept']:5.3f} {r['tiles']:5.3f} "
                f"{r['call'] * 1e3:8.3f} {r['kernel'] * 1e3:9.3f} {r['sdpa'] * 1e3:8.3f} "
                f"{r['call'] / r['sdpa']:9.2f} {r['kernel'] / r['sdpa']:9.2f} {r['err']:8.1e}")
        return line, problems, (r["call"] / r["sdpa"], r["kernel"] / r["sdpa"])

    args, lines, results, bad = run_cases(
        argv, __doc__, "latte_mma_vs_sdpa.py",
        f"; [1, {HEADS}, N, {HEAD_DIM}], relative threshold for {KEEP:.0%} kept",
        f"{'type':9s} {'inputs':9s} {'N':>6s} {'theta':>6s} {'kept':>5s} {'tiles':>5s} "
        f"{'call ms':>8s} {'kernel ms':>9s} {'sdpa ms':>8s} {'call/sdpa':>9s} {'kern/sdpa':>9s} "
        f"{'rel err':>8s}",
        [(p, kind, n) for p, n in CASES for kind in KINDS],
        lambda c: f"latte_mma {c[0]} {c[1]} N={c[2]}", measure)
    grouped = {}
    for (precision, kind, _), ratios in results:
        grouped.setdefault((precision, kind), []).append(ratios)
    summary = []
    for (precision, kind), ratios in grouped.items():
        calls, kernels = [c for c, _ in ratios], [k for _, k in ratios]
        summary.append(f"summary: latte_mma {precision} {kind}: "
                       f"call / SDPA {min(calls):.2f}-{max(calls):.2f}, "
                       f"kernel / SDPA {min(kernels):.2f}-{max(kernels):.2f} over {len(ratios)} N "
                       f"(goal <= 0.5; median kernel {statistics.median(kernels):.2f})")
    return finish(args, lines, summary, bad,
                  "every kept count equal to latte.cu's, outputs within the tolerances")


if __name__ == "__main__":
    sys.exit(main())

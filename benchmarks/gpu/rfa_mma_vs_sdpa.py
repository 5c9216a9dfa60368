"""rfa on tensor cores (``rfa/kernels/rfa_mma.cu``), non-causal and causal, against torch SDPA.

``python benchmarks/gpu/rfa_mma_vs_sdpa.py [--out docs/measurements/gpu-rfa-mma.txt]`` on a
machine with an NVIDIA GPU, CuPy and torch (``tests/cuda/on_device.sh`` runs it).

The issue's goals: rfa with 64 features at N = 16k in at most 0.3x (non-causal) and 0.5x
(causal) the time of SDPA (flash, float16 / bfloat16; ``is_causal`` alike), same process,
same GPU. Per case ``[1, 8, N, 64]``, standard normal q, k, v scaled by 0.5, positive
features (``RandomFeatures(64, 64, num_heads=8)``), causal with the default chunk (64):

* ``call``: ``mcattn.rfa.attention(..., backend="cupy", check_finite=False)`` with
  ``config.RFA_TENSOR_CORES`` set (features on rfa.cu; non-causal: state and output on
  rfa_mma.cu; causal: chunk states on rfa_mma.cu, rfa.cu's float32 scan, the causal tile
  kernel);
* ``f32``: the same call with the knob off (today's rfa.cu kernels);
* ``sdpa``: ``scaled_dot_product_attention`` on the same values in that type (flash).

Times are medians of 3 runs (``exact_mma_vs_sdpa._time``). Each case checks the output
against the float32 kernels (knob off): within 4 unit roundoffs of the 16-bit type
(relative, Frobenius; the shim measures about 0.5-0.6 u against float64). A case that
errors prints its error line and the script goes on; one summary line per type and
form; exit status 1 on any mismatch or error.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_mma_vs_sdpa import _time, finish, run_cases  # noqa: E402  (written once)

CASES = [("float16", 4096, False), ("float16", 16384, False), ("bfloat16", 16384, False),
         ("float16", 16384, True), ("bfloat16", 16384, True)]
GOAL = {False: 0.3, True: 0.5}
HEADS, HEAD_DIM, FEATURES = 8, 64, 64
TOLERANCE = {"float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8}


def _case(precision, n, causal, sync):
    import cupy
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mcattn
    from mcattn.rfa.features import RandomFeatures

    shape = (1, HEADS, n, HEAD_DIM)
    rng = np.random.default_rng(n)
    host = [(0.5 * rng.standard_normal(shape)).astype(np.float32) for _ in range(3)]
    q, k, v = (cupy.asarray(a) for a in host)
    tq, tk, tv = (torch.as_tensor(a, device="cuda").to(getattr(torch, precision)) for a in host)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    feats = RandomFeatures(HEAD_DIM, FEATURES, num_heads=HEADS, seed=3)

    def call():
        return mcattn.rfa.attention(q, k, v, features=feats, is_causal=causal, backend="cupy",
                                    check_finite=False)

    mcattn.config.RFA_TENSOR_CORES = precision
    try:
        ours = call()
        t_call = _time(call, sync)
    finally:
        mcattn.config.RFA_TENSOR_CORES = None
    ref = call()  # rfa.cu, float32
    t_f32 = _time(call, sync)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        sdpa(tq, tk, tv, is_causal=causal)
        t_sdpa = _time(lambda: sdpa(tq, tk, tv, is_causal=causal), sync)
    a, b = ours.get().astype(np.float64), ref.get().astype(np.float64)
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return t_call, t_f32, t_sdpa, err


def main(argv=None):
    def measure(case, sync):
        precision, n, causal = case
        t_call, t_f32, t_sdpa, err = _case(precision, n, causal, sync)
        line = (f"{precision:9s} {n:6d} {'causal' if causal else 'full':6s} {t_call * 1e3:8.3f} "
                f"{t_f32 * 1e3:8.3f} {t_sdpa * 1e3:8.3f} "
                f"{t_call / t_sdpa:9.2f} {t_f32 / t_sdpa:9.2f} {err:8.1e}")
        return line, [] if err < TOLERANCE[precision] else [f"rel err {err:.2e}"], t_call / t_sdpa

    args, lines, results, bad = run_cases(
        argv, __doc__, "rfa_mma_vs_sdpa.py",
        f"; [1, {HEADS}, N, {HEAD_DIM}], {FEATURES} positive features",
        f"{'type':9s} {'N':>6s} {'form':6s} {'call ms':>8s} {'f32 ms':>8s} {'sdpa ms':>8s} {'call/sdpa':>9s} "
        f"{'f32/sdpa':>9s} {'rel err':>8s}",
        CASES, lambda c: f"rfa_mma {c[0]} N={c[1]}{' causal' if c[2] else ''}", measure)
    grouped = {}
    for (precision, n, causal), ratio in results:
        grouped.setdefault((precision, causal), []).append((n, ratio))
    summary = []
    for (precision, causal), rows in grouped.items():
        at16k = [f"{c:.2f}" for n, c in rows if n == 16384]
        summary.append(f"summary: rfa_mma {'causal' if causal else 'non-causal'} {precision}: call / SDPA "
                       f"{min(c for _, c in rows):.2f}-{max(c for _, c in rows):.2f} over {len(rows)} N "
                       f"(goal at N = 16k <= {GOAL[causal]}; there: {', '.join(at16k) or 'not run'})")
    return finish(args, lines, summary, bad, "every output within the tolerances of rfa.cu's")


if __name__ == "__main__":
    sys.exit(main())

"""E-Att's Hamming and L1 alignments on the tile machinery (``eatt/kernels/eatt_mma.cu``) against torch SDPA.

``python benchmarks/gpu/eatt_mma_vs_sdpa.py [--out docs/measurements/gpu-eatt-mma.txt]`` on a
machine with an NVIDIA GPU, CuPy and torch (``tests/cuda/on_device.sh`` runs it).

The issue's goal: E-Att with Hamming alignment at N = 8k in at most 1.0x the time of SDPA
(flash, float16 / bfloat16), same process, same GPU; L1 (no goal: its scores run on CUDA
cores, d subtract-abs-adds each) is reported beside it. Per case ``[1, 8, N, 64]``, standard
normal q, k, v:

* ``call``: ``mcattn.eatt.attention(..., alignment=..., backend="cupy",
  check_finite=False)`` with ``config.EATT_TENSOR_CORES`` set (Hamming: the sign codes packed
  from q and k included); ``kernel``: the launcher alone (``mcattn.eatt.cupy.forward``, on
  packed codes for Hamming);
* ``sdpa``: ``scaled_dot_product_attention`` on the same values in that type (flash).

Times are medians of 3 runs (``exact_mma_vs_sdpa._time``). Each case checks the output
against today's float32 kernel (``eatt.cu``, the knob off): within 4 unit roundoffs of the
16-bit type (relative, Frobenius). A case that errors prints its error line and the
script goes on; one summary line per type; exit status 1 on any mismatch or error.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_mma_vs_sdpa import _time, finish, run_cases  # noqa: E402  (written once)

CASES = [("float16", 4096), ("float16", 8192), ("float16", 16384), ("bfloat16", 8192),
         ("float16", 8192, "l1"), ("bfloat16", 8192, "l1")]  # (type, N[, alignment: "hamming"])
HEADS, HEAD_DIM = 8, 64
TOLERANCE = {"float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8}


def _case(precision, n, alignment, sync):
    import cupy
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mcattn
    from mcattn._validate import prepare_attention
    from mcattn.eatt import cupy as eatt_cupy
    from mcattn.eatt import naive

    shape = (1, HEADS, n, HEAD_DIM)
    rng = np.random.default_rng(n)
    host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    q, k, v = (cupy.asarray(a) for a in host)
    tq, tk, tv = (torch.as_tensor(a, device="cuda").to(getattr(torch, precision)) for a in host)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    inp = prepare_attention(q, k, v, check_finite=False)
    codes = (naive.pack_bits(inp.q > 0), naive.pack_bits(inp.k > 0)) if alignment == "hamming" else None
    mcattn.config.EATT_TENSOR_CORES = precision
    try:
        ours = eatt_cupy.forward(inp, alignment, codes)
        t_call = _time(lambda: mcattn.eatt.attention(q, k, v, alignment=alignment, backend="cupy",
                                                     check_finite=False), sync)
        t_kernel = _time(lambda: eatt_cupy.forward(inp, alignment, codes), sync)
    finally:
        mcattn.config.EATT_TENSOR_CORES = None
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        sdpa(tq, tk, tv)
        t_sdpa = _time(lambda: sdpa(tq, tk, tv), sync)
    ref = eatt_cupy.forward(inp, alignment, codes)  # eatt.cu, float32
    a, b = ours.get().astype(np.float64), ref.get().astype(np.float64)
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return t_call, t_kernel, t_sdpa, err


def _unpack(case):
    """``(type, N, alignment)`` of a CASES entry (alignment "hamming" when left out)."""
    return (case + ("hamming",))[:3]


def main(argv=None):
    def measure(case, sync):
        precision, n, alignment = _unpack(case)
        t_call, t_kernel, t_sdpa, err = _case(precision, n, alignment, sync)
        line = (f"{alignment:8s} {precision:9s} {n:6d} {t_call * 1e3:8.3f} {t_kernel * 1e3:9.3f} "
                f"{t_sdpa * 1e3:8.3f} "
                f"{t_call / t_sdpa:9.2f} {t_kernel / t_sdpa:9.2f} {err:8.1e}")
        problems = [] if err < TOLERANCE[precision] else [f"rel err {err:.2e}"]
        return line, problems, (t_call / t_sdpa, t_kernel / t_sdpa)

    args, lines, results, bad = run_cases(
        argv, __doc__, "eatt_mma_vs_sdpa.py", f"; [1, {HEADS}, N, {HEAD_DIM}]",
        f"{'align':8s} {'type':9s} {'N':>6s} {'call ms':>8s} {'kernel ms':>9s} {'sdpa ms':>8s} "
        f"{'call/sdpa':>9s} "
        f"{'kern/sdpa':>9s} {'rel err':>8s}",
        CASES, lambda c: "eatt_mma {2} {0} N={1}".format(*_unpack(c)), measure)
    grouped = {}
    for case, (c, k) in results:
        precision, n, alignment = _unpack(case)
        grouped.setdefault((alignment, precision), []).append((n, c, k))
    summary = []
    for (alignment, precision), rows in grouped.items():
        calls, kernels = [c for _, c, _ in rows], [k for _, _, k in rows]
        at8k = [f"{c:.2f} / {k:.2f}" for n, c, k in rows if n == 8192]
        goal = "goal at N = 8k <= 1.0" if alignment == "hamming" else "no goal"
        summary.append(f"summary: eatt_mma {alignment} {precision}: "
                       f"call / SDPA {min(calls):.2f}-{max(calls):.2f}, "
                       f"kernel / SDPA {min(kernels):.2f}-{max(kernels):.2f} over {len(rows)} N "
                       f"({goal}; call / kernel at 8k: {', '.join(at8k) or 'not run'})")
    return finish(args, lines, summary, bad, "every output within the tolerances of eatt.cu's")


if __name__ == "__main__":
    sys.exit(main())

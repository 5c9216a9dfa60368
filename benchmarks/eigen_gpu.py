"""GPU timing of eigen reconstruction against exact attention, both on the same device.

``python benchmarks/eigen_gpu.py`` (needs a CUDA GPU and CuPy): B=1, H=12, d=32 float32,
rank 16, a budget of N/3 columns (an eighth fixed, the rest per query), plan built once;
mcattn eigen (cupy and cuda backends) against mcattn exact (cupy) and torch SDPA (CUDA)
when torch is there. Best of 5 after a warm-up, synchronised.
"""

import time

import cupy
import numpy as np

from mcattn import attention, eigen


def _best(fn, repeats=5):
    fn()
    cupy.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    rng = np.random.default_rng(0)
    print(f"# eigen / exact on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    names = ("N", "cols", "eigen_cupy_ms", "eigen_cuda_ms", "exact_cupy_ms", "sdpa_ms")
    print(" ".join(f"{x:>14}" for x in names))
    for n in (96, 256, 512, 1024):
        q, k, v = (rng.standard_normal((1, 12, n, 32)).astype(np.float32) for _ in range(3))
        bases = eigen.fit_heads(q, k, rank=16, center=True)
        plan = eigen.make_plan(bases, max(16, n // 3))
        gq, gk, gv = (cupy.asarray(a) for a in (q, k, v))
        def run(backend):
            return eigen.attention(gq, gk, gv, basis=bases, columns=plan, backend=backend)  # noqa: B023

        t_ec = _best(lambda: run("cupy"))
        t_nc = _best(lambda: run("cuda"))
        t_ex = _best(lambda: attention(gq, gk, gv, backend="cupy"))  # noqa: B023
        try:
            import torch

            tq, tk, tv = (torch.as_tensor(a, device="cuda") for a in (q, k, v))
            t_sd = _best(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv))  # noqa: B023
        except Exception:  # noqa: BLE001 - torch is optional here
            t_sd = float("nan")
        times = tuple(f"{t * 1e3:.3f}" for t in (t_ec, t_nc, t_ex, t_sd))
        cells = (n, plan.num_fixed + plan.per_query) + times
        print(" ".join(f"{x:>14}" for x in cells), flush=True)


if __name__ == "__main__":
    main()

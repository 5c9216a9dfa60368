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
    print(f"{'N':>6} {'cols':>5} {'eigen_cupy_ms':>14} {'eigen_cuda_ms':>14} {'exact_cupy_ms':>14} {'sdpa_ms':>9}")
    for n in (96, 256, 512, 1024):
        q, k, v = (rng.standard_normal((1, 12, n, 32)).astype(np.float32) for _ in range(3))
        bases = eigen.fit_heads(q, k, rank=16, center=True)
        plan = eigen.make_plan(bases, max(16, n // 3))
        gq, gk, gv = (cupy.asarray(a) for a in (q, k, v))
        t_ec = _best(lambda: eigen.attention(gq, gk, gv, basis=bases, columns=plan, backend="cupy"))  # noqa: B023
        t_nc = _best(lambda: eigen.attention(gq, gk, gv, basis=bases, columns=plan, backend="cuda"))  # noqa: B023
        t_ex = _best(lambda: attention(gq, gk, gv, backend="cupy"))  # noqa: B023
        try:
            import torch

            tq, tk, tv = (torch.as_tensor(a, device="cuda") for a in (q, k, v))
            t_sd = _best(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv))  # noqa: B023
        except Exception:  # noqa: BLE001 - torch is optional here
            t_sd = float("nan")
        print(f"{n:>6} {plan.num_fixed + plan.per_query:>5} {t_ec * 1e3:>14.3f} {t_nc * 1e3:>14.3f} "
              f"{t_ex * 1e3:>14.3f} {t_sd * 1e3:>9.3f}", flush=True)


if __name__ == "__main__":
    main()

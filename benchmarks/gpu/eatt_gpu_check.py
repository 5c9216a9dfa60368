"""E-Att on a real GPU: CuPy RawKernel and numba.cuda against exact attention (CuPy), timed.

``python benchmarks/gpu/eatt_gpu_check.py`` on a machine with a CUDA GPU and CuPy. Prints
the relative difference of each GPU kernel to the numba CPU kernel and the time of each
kernel over exact attention's CuPy kernel in the same process (CUDA events, best of 5).
"""

import numpy as np


def main():
    import cupy

    import mcattn
    from mcattn import eatt

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 300, 64), dtype=np.float32) for _ in range(3))
    for alignment in eatt.ALIGNMENTS:
        cpu = eatt.attention(q, k, v, alignment=alignment, backend="numba", is_causal=True)
        for backend in ("cupy", "cuda"):
            out = eatt.attention(*(cupy.asarray(a) for a in (q, k, v)), alignment=alignment,
                                 backend=backend, is_causal=True).get()
            err = np.linalg.norm(out - cpu) / np.linalg.norm(cpu)
            print(f"{alignment:8s} {backend:5s} rel diff to numba CPU kernel: {err:.2e}")

    def best(fn, repeats=5):
        fn()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        return min(times)

    print(f"{'N':>6} {'exact s':>10} {'l1/exact':>9} {'hamming/exact':>14} (cupy, B=1 H=12 d=64 float32)")
    for n in (1024, 4096, 8192):
        q, k, v = (cupy.asarray(rng.standard_normal((1, 12, n, 64), dtype=np.float32)) for _ in range(3))
        t_exact = best(lambda: mcattn.attention(q, k, v, backend="cupy", check_finite=False))  # noqa: B023
        ratios = [best(lambda a=a: eatt.attention(q, k, v, alignment=a, backend="cupy",  # noqa: B023
                                                  check_finite=False)) / t_exact
                  for a in eatt.ALIGNMENTS]
        print(f"{n:>6} {t_exact:>10.4f} {ratios[0]:>9.2f} {ratios[1]:>14.2f}")


if __name__ == "__main__":
    main()

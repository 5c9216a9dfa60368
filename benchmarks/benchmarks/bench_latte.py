"""asv suite of LATTE: time, peak memory, keep fraction and the ratio to exact attention (numba).

Thresholds are calibrated per head (:func:`mcattn.latte.calibrate`, relative mode) on the
first 64 query rows to keep 15% of the keys; the realised keep fraction is tracked.
"""

from mcattn import latte

from .common import exact, interleaved_times, peak_growth_in_subprocess, qkv

TARGET_KEEP = 0.15


def thresholds(q, k, target_keep=TARGET_KEEP):
    """Per-head relative thresholds keeping ``target_keep`` of the keys (calibrated on 64 queries)."""
    return latte.calibrate(q[:, :, :64], k, target_keep=target_keep)


def run(q, k, v, theta, backend="numba", exact_scores="int8", is_causal=False):
    return latte.attention(q, k, v, threshold=theta, backend=backend, exact_scores=exact_scores,
                           is_causal=is_causal, check_finite=False)


class Latte:
    """B=1, H=12, d=64, float32 LATTE (15% of keys kept) over N and the kept-score precision."""

    params = ([1024, 4096], ["int8", "float"])
    param_names = ["N", "exact_scores"]
    timeout = 600

    def setup(self, n, exact_scores):
        self.q, self.k, self.v = qkv(n)
        self.theta = thresholds(self.q, self.k)
        small = tuple(a[:, :, :64] for a in (self.q, self.k, self.v))
        run(*small, self.theta, exact_scores=exact_scores)  # compile

    def time_attention(self, n, exact_scores):
        run(self.q, self.k, self.v, self.theta, exact_scores=exact_scores)

    def peakmem_attention(self, n, exact_scores):
        run(self.q, self.k, self.v, self.theta, exact_scores=exact_scores)

    def track_keep_fraction(self, n, exact_scores):
        _, info = latte.attention(self.q, self.k, self.v, threshold=self.theta,
                                  exact_scores=exact_scores, return_info=True)
        return info.keep_fraction

    def track_ratio_to_exact(self, n, exact_scores):
        """LATTE time / exact attention (numba) time, measured here, interleaved."""
        t_ours, t_base = interleaved_times(
            lambda: run(self.q, self.k, self.v, self.theta, exact_scores=exact_scores),
            lambda: exact(self.q, self.k, self.v, "numba"))
        return t_ours / t_base

    track_keep_fraction.unit = "fraction"
    track_ratio_to_exact.unit = "ratio"


def _phases(q, k, v, theta):
    """Seconds of the kernel's phases (int8 kept scores): quantisation; the estimate alone;
    the estimate and the keep rule (``filter_s``); plus the kept scores and their softmax
    (``scores_s``; with VNNI the dense ``q8 . k8`` tile, a key chunk at a time); the whole
    kernel (``kernel_s``: plus ``P V``)."""
    import time

    from mcattn.latte import cpu
    from mcattn.latte._inputs import prepare_latte

    lat = prepare_latte(q, k, v, threshold=theta, mode="relative", attn_mask=None,
                        key_padding_mask=None, is_causal=False, scale=None, exact_scores="int8",
                        check_finite=False, want_mass=False)

    def best(fn, repeats=3):
        out = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - start)
        return out

    def prepare():
        prepare_latte(q, k, v, threshold=theta, mode="relative", attn_mask=None,
                      key_padding_mask=None, is_causal=False, scale=None, exact_scores="int8",
                      check_finite=False, want_mass=False)

    kernel = best(lambda: cpu._run(lat, do_output=True, write_mask=False))
    filt = best(lambda: cpu._run(lat, do_output=False, write_mask=False))
    return {
        "quantise_s": best(prepare),
        "estimate_s": best(lambda: cpu._run(lat, do_output=False, write_mask=False, select=False)),
        "filter_s": filt,
        "scores_s": best(lambda: cpu._run(lat, do_output=True, write_mask=False, pv=False)),
        "kernel_s": kernel,
    }


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py latte``: LATTE (numba) time / exact (numba) time."""
    import argparse

    import numba

    parser = argparse.ArgumentParser(prog="ratio.py latte")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--keep", type=float, default=TARGET_KEEP)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", action="store_true",
                        help="also time the phases (quantise; estimate GEMM alone; estimate + keep rule)")
    parser.add_argument("--memory", action="store_true", help="peak RSS growth per call")
    parser.add_argument("--no-vnni", action="store_true",
                        help="config.LATTE_CPU_VNNI = False: the float32 BLAS estimate")
    args = parser.parse_args(argv)
    from mcattn import config
    from mcattn.latte import vnni

    if args.no_vnni:
        config.LATTE_CPU_VNNI = False
    path = "int8 VNNI" if vnni.AVAILABLE and config.LATTE_CPU_VNNI else "float32 BLAS"
    title = (f"mcattn latte (numba {numba.__version__}) / mcattn exact (numba), CPU, B=1 "
             f"H={args.heads} d=64 float32, relative thresholds per head calibrated to keep "
             f"{args.keep:.0%} of keys, threads {config.num_threads()}, estimate {path}")

    def rows():
        for n in args.sizes:
            q, k, v = qkv(n, heads=args.heads)
            theta = thresholds(q, k, args.keep)
            _, info = latte.attention(q[:, :, :2048], k, v, threshold=theta, return_info=True)
            row = {"N": n, "keep": info.keep_fraction}
            for scores in ("int8", "float"):
                t_ours, t_base = interleaved_times(
                    lambda: run(q, k, v, theta, exact_scores=scores),  # noqa: B023
                    lambda: exact(q, k, v, "numba"),  # noqa: B023
                    rounds=args.rounds, repeats=3 if n <= 4096 else 1,
                )
                row[f"{scores}_s"] = t_ours
                row[f"{scores}_ratio"] = t_ours / t_base
            row["exact_s"] = t_base
            row["energy_ratio"] = info.energy_ratio
            if args.phases:
                row.update(_phases(q, k, v, theta))
            if args.memory:
                setup = (f"q, k, v = qkv({n}, heads={args.heads}); "
                         "from benchmarks.bench_latte import run, thresholds; "
                         f"theta = thresholds(q, k, {args.keep})")
                warm = "small = qkv(64, heads=1); run(*small, theta[:1])"
                row["latte_MiB"] = peak_growth_in_subprocess(setup, "run(q, k, v, theta)", warm)
                row["exact_MiB"] = peak_growth_in_subprocess(
                    setup, "exact(q, k, v, 'numba')", warm + "; exact(*small, 'numba')")
            yield row

    return title, rows()

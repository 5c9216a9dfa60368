"""asv suite of exact attention: time, peak memory and the ratio to torch SDPA."""

from .common import exact, interleaved_times, peak_growth_in_subprocess, qkv, ratio, sdpa


class Exact:
    """B=1, H=12, d=64, float32 exact attention over N and backend."""

    params = ([1024, 4096], ["numba", "numpy"], [False, True])
    param_names = ["N", "backend", "is_causal"]
    timeout = 600

    def setup(self, n, backend, is_causal):
        self.q, self.k, self.v = qkv(n)
        exact(self.q[:, :, :64], self.k[:, :, :64], self.v[:, :, :64], backend)  # compile

    def time_attention(self, n, backend, is_causal):
        exact(self.q, self.k, self.v, backend, is_causal)

    def peakmem_attention(self, n, backend, is_causal):
        exact(self.q, self.k, self.v, backend, is_causal)

    def track_ratio_to_sdpa(self, n, backend, is_causal):
        """mcattn time / torch SDPA time, measured here, interleaved (lower is better)."""
        return ratio(
            lambda: exact(self.q, self.k, self.v, backend, is_causal),
            lambda: sdpa(self.q, self.k, self.v, is_causal),
        )

    track_ratio_to_sdpa.unit = "ratio"


class ExactLong:
    """Memory stays O(N d) at long sequences: N = 16384, numba backend."""

    params = [16384]
    param_names = ["N"]
    timeout = 900

    def setup(self, n):
        self.q, self.k, self.v = qkv(n, heads=1)
        exact(self.q[:, :, :64], self.k[:, :, :64], self.v[:, :, :64], "numba")

    def peakmem_attention(self, n):
        exact(self.q, self.k, self.v, "numba")


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py exact``: numba time / torch SDPA time."""
    import argparse

    import numba
    import torch

    parser = argparse.ArgumentParser(prog="ratio.py exact")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS growth per call")
    args = parser.parse_args(argv)
    title = (f"mcattn exact (numba {numba.__version__}) / torch {torch.__version__} SDPA, CPU, "
             f"B=1 H={args.heads} d=64 float32, causal={args.causal}, torch threads "
             f"{torch.get_num_threads()}")

    def rows():
        for n in args.sizes:
            q, k, v = qkv(n, heads=args.heads)
            t_ours, t_base = interleaved_times(
                lambda: exact(q, k, v, "numba", args.causal),  # noqa: B023
                lambda: sdpa(q, k, v, args.causal),  # noqa: B023
                rounds=args.rounds, repeats=3 if n <= 4096 else 1,
            )
            row = {"N": n, "mcattn_s": t_ours, "sdpa_s": t_base, "ratio": t_ours / t_base}
            if args.memory:
                setup = f"q, k, v = qkv({n}, heads={args.heads})"
                warm = "small = qkv(64, heads=1)"
                row["mcattn_MiB"] = peak_growth_in_subprocess(
                    setup, f"exact(q, k, v, 'numba', {args.causal})",
                    warm + "; exact(*small, 'numba')")
                row["sdpa_MiB"] = peak_growth_in_subprocess(
                    setup, f"sdpa(q, k, v, {args.causal})", warm + "; sdpa(*small)")
            yield row

    return title, rows()

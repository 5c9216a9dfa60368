"""asv suite of E-Att: L1 and Hamming attention against exact attention (time and ratio).

On a CPU the L1 alignment is not faster than the BLAS GEMM of ``q k^T``: a subtract, an
absolute value and an add per element run on the same vector units as a fused
multiply-add, and BLAS is better tuned. E-Att's savings are energy on hardware where
adders are cheap (``mcattn energy``), not CPU time.
"""

import mcattn.eatt

from .common import exact, interleaved_times, qkv


def eatt(q, k, v, alignment, backend="numba"):
    return mcattn.eatt.attention(q, k, v, alignment=alignment, backend=backend, check_finite=False)


def energy_ratio(q, k, v, alignment, is_causal=False):
    """Energy of the E-Att call over exact attention's, from the counts (no kernel run)."""
    from mcattn._validate import prepare_attention
    from mcattn.eatt.ops import attention_counts
    from mcattn.exact import exact_ops

    inp = prepare_attention(q, k, v, is_causal=is_causal, check_finite=False)
    align, rest, _ = attention_counts(inp, alignment)
    return (align + rest).energy_pj() / exact_ops(inp).energy_pj()


class EAtt:
    """B=1, H=2, d=64, float32 E-Att attention over N and alignment (numba)."""

    params = ([1024, 4096], ["l1", "hamming"])
    param_names = ["N", "alignment"]
    timeout = 600

    def setup(self, n, alignment):
        self.q, self.k, self.v = qkv(n, heads=2)
        small = qkv(64, heads=1)
        eatt(*small, alignment)  # compile
        exact(*small, "numba")

    def time_attention(self, n, alignment):
        eatt(self.q, self.k, self.v, alignment)

    def track_ratio_to_exact(self, n, alignment):
        """E-Att time / mcattn exact time (numba), measured here, interleaved."""
        t_eatt, t_exact = interleaved_times(
            lambda: eatt(self.q, self.k, self.v, alignment),
            lambda: exact(self.q, self.k, self.v, "numba"), rounds=2, repeats=2)
        return t_eatt / t_exact

    track_ratio_to_exact.unit = "ratio"

    def track_energy_ratio(self, n, alignment):
        """E-Att energy / exact energy of the attention call (45 nm table)."""
        return energy_ratio(self.q, self.k, self.v, alignment)

    track_energy_ratio.unit = "ratio"


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py eatt``: L1 and Hamming time over exact attention's."""
    import argparse

    import numba

    parser = argparse.ArgumentParser(prog="ratio.py eatt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    title = (f"mcattn eatt / mcattn exact (numba {numba.__version__}), CPU, B=1 H={args.heads} "
             f"d=64 float32, causal={args.causal}; energy: 45 nm table, same call")

    def rows():
        for n in args.sizes:
            q, k, v = qkv(n, heads=args.heads)
            row = {"N": n}
            for alignment in ("l1", "hamming"):
                t_ours, t_base = interleaved_times(
                    lambda: mcattn.eatt.attention(q, k, v, alignment=alignment,  # noqa: B023
                                                  is_causal=args.causal, check_finite=False),
                    lambda: exact(q, k, v, "numba", args.causal),  # noqa: B023
                    rounds=args.rounds, repeats=2 if n <= 2048 else 1,
                )
                row[f"{alignment}_s"] = t_ours
                row[f"{alignment}_time_x"] = t_ours / t_base
                row[f"{alignment}_energy_x"] = energy_ratio(q, k, v, alignment, args.causal)
            row["exact_s"] = t_base
            yield row

    return title, rows()

"""asv suite of eigen reconstruction: time and ratio to mcattn's exact kernel, error, ops.

B=1, H=12, d=32 (MiniLM's head dim), float32, rank 16, a budget of ``n / 3`` columns
per row (an eighth fixed, the rest chosen per query) unless a parameter says otherwise.
Speed does not depend on what the basis was fitted on, so a basis fitted on the random
inputs themselves is used. The ratio harness case is :func:`ratio_rows`
(``python benchmarks/ratio.py eigen --help``).
"""


from mcattn import eigen

from .common import exact, interleaved_times, qkv, ratio

HEADS, HEAD_DIM, RANK = 12, 32, 16


def setup_case(n, heads=HEADS):
    q, k, v = qkv(n, heads=heads, head_dim=HEAD_DIM)
    bases = eigen.fit_heads(q[:, :, :n], k[:, :, :n], rank=RANK, center=True)
    return q, k, v, bases


def run(q, k, v, bases, budget, per_query=None, backend="numba", plan=None):
    """One call; with ``plan`` (built once by :func:`eigen.make_plan`) the maps are reused."""
    columns = budget if plan is None else plan
    return eigen.attention(q, k, v, basis=bases, columns=columns, per_query=per_query,
                           backend=backend, check_finite=False)


class Eigen:
    """Eigen reconstruction over N and the per-query share (numba backend)."""

    params = ([96, 256, 512], ["default", "fixed-only"])
    param_names = ["N", "columns"]
    timeout = 600

    def setup(self, n, mode):
        self.q, self.k, self.v, self.bases = setup_case(n)
        self.budget = max(RANK, n // 3)
        self.per_query = 0 if mode == "fixed-only" else None
        self.plan = eigen.make_plan(self.bases, self.budget, per_query=self.per_query)
        run(self.q, self.k, self.v, self.bases, self.budget, plan=self.plan)
        exact(self.q, self.k, self.v, "numba")

    def time_attention(self, n, mode):
        run(self.q, self.k, self.v, self.bases, self.budget, plan=self.plan)

    def track_ratio_to_exact(self, n, mode):
        """eigen time (plan built once) / mcattn exact (numba) time, measured here, interleaved."""
        return ratio(lambda: run(self.q, self.k, self.v, self.bases, self.budget, plan=self.plan),
                     lambda: exact(self.q, self.k, self.v, "numba"))

    track_ratio_to_exact.unit = "ratio"

    def track_ops_ratio(self, n, mode):
        """Operations of eigen / operations of exact attention for the same inputs."""
        _, info = eigen.attention(self.q, self.k, self.v, basis=self.bases, columns=self.budget,
                                  per_query=self.per_query, return_info=True)
        return info.ops_ratio

    track_ops_ratio.unit = "ratio"


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py eigen``: eigen (numba) against exact (numba)."""
    import argparse

    import numba

    parser = argparse.ArgumentParser(prog="ratio.py eigen")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 256, 512, 1024])
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--fraction", type=float, default=1 / 3, help="column budget / N")
    parser.add_argument("--per-query", type=int, default=None,
                        help="per-query columns (default: seven eighths of the budget)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    title = (f"mcattn eigen / mcattn exact, CPU (numba both), B=1 H={args.heads} d={HEAD_DIM} "
             f"float32, rank {RANK}, budget {args.fraction:.3g} N, per_query "
             f"{'7/8 of the budget' if args.per_query is None else args.per_query}, plan built once, "
             f"numba {numba.__version__}; shared 2-core machine")

    def rows():
        for n in args.sizes:
            q, k, v, bases = setup_case(n, args.heads)
            budget = max(RANK, int(round(n * args.fraction)))
            plan = eigen.make_plan(bases, budget, per_query=args.per_query)
            run(q, k, v, bases, budget, args.per_query, plan=plan)
            exact(q, k, v, "numba")
            t_ours, t_base = interleaved_times(
                lambda: run(q, k, v, bases, budget, args.per_query, plan=plan),  # noqa: B023
                lambda: exact(q, k, v, "numba"),  # noqa: B023
                rounds=args.rounds, repeats=3,
            )
            _, info = eigen.attention(q, k, v, basis=bases, columns=budget, per_query=args.per_query,
                                      return_info=True)
            yield {"N": n, "columns": budget, "eigen_s": t_ours, "exact_s": t_base,
                   "ratio": t_ours / t_base, "ops_ratio": info.ops_ratio,
                   "score_macs_ratio": (info.partial_score_macs + info.reconstruction_macs)
                   / info.dense_score_macs}

    return title, rows()

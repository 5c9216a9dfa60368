"""asv suite of training: forward + backward of exact attention and of rfa's chunked causal
backward against torch SDPA's."""

from .common import interleaved_times, peak_growth_in_subprocess, qkv, ratio


def _tensors(n, heads=12, seed=0):
    import torch

    return [torch.from_numpy(a).requires_grad_(True) for a in qkv(n, heads=heads, seed=seed)]


def mcattn_step(q, k, v, is_causal=False, method="exact", **knobs):
    """One forward + backward through mcattn's torch autograd adapter."""
    from mcattn.frameworks.torch import attention

    for t in (q, k, v):
        t.grad = None
    attention(q, k, v, is_causal=is_causal, method=method, **knobs).sum().backward()


def sdpa_step(q, k, v, is_causal=False):
    """One forward + backward of torch's scaled_dot_product_attention (CPU)."""
    import torch

    for t in (q, k, v):
        t.grad = None
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal).sum().backward()


class ExactTrain:
    """B=1, H=12, d=64, float32: forward + backward, mcattn (numba kernels) and torch SDPA."""

    params = ([1024, 2048], [False, True])
    param_names = ["N", "is_causal"]
    timeout = 900

    def setup(self, n, is_causal):
        self.q, self.k, self.v = _tensors(n)
        mcattn_step(*_tensors(64, heads=1))  # compile

    def time_forward_backward(self, n, is_causal):
        mcattn_step(self.q, self.k, self.v, is_causal)

    def peakmem_forward_backward(self, n, is_causal):
        mcattn_step(self.q, self.k, self.v, is_causal)

    def track_ratio_to_sdpa(self, n, is_causal):
        """mcattn forward+backward time / torch SDPA's, measured here (lower is better)."""
        return ratio(lambda: mcattn_step(self.q, self.k, self.v, is_causal),
                     lambda: sdpa_step(self.q, self.k, self.v, is_causal))

    track_ratio_to_sdpa.unit = "ratio"


class RfaCausalTrain:
    """B=1, H=12, d=64, float32, causal: rfa (64 features, chunked backward) and torch SDPA."""

    params = [1024, 2048, 4096]
    param_names = ["N"]
    timeout = 900
    knobs = {"num_features": 64, "seed": 0}

    def setup(self, n):
        self.q, self.k, self.v = _tensors(n)
        mcattn_step(*_tensors(64, heads=1), True, "rfa", **self.knobs)  # compile

    def time_forward_backward(self, n):
        mcattn_step(self.q, self.k, self.v, True, "rfa", **self.knobs)

    def track_ratio_to_sdpa(self, n):
        """rfa forward+backward time / torch SDPA's (causal), measured here."""
        return ratio(lambda: mcattn_step(self.q, self.k, self.v, True, "rfa", **self.knobs),
                     lambda: sdpa_step(self.q, self.k, self.v, True))

    track_ratio_to_sdpa.unit = "ratio"


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py train``: forward+backward time / SDPA's."""
    import argparse

    import numba
    import torch

    parser = argparse.ArgumentParser(prog="ratio.py train")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS growth of one step")
    parser.add_argument("--method", default="exact", choices=["exact", "rfa", "latte", "eatt"])
    parser.add_argument("--num-features", type=int, default=64, help="rfa: random features")
    parser.add_argument("--threshold", type=float, default=3.0, help="latte: relative threshold")
    parser.add_argument("--soft", action="store_true", help="latte: the soft mask")
    parser.add_argument("--alignment", default="l1", help="eatt: l1 or hamming")
    args = parser.parse_args(argv)
    knobs = {"exact": {}, "rfa": {"num_features": args.num_features, "seed": 0},
             "latte": {"threshold": args.threshold, **({"soft": True} if args.soft else {})},
             "eatt": {"alignment": args.alignment}}[args.method]
    title = (f"mcattn {args.method} {knobs or ''} forward+backward (numba {numba.__version__}, "
             "torch adapter) / torch "
             f"{torch.__version__} SDPA forward+backward, CPU, B=1 H={args.heads} d=64 float32, "
             f"causal={args.causal}, torch threads {torch.get_num_threads()}")
    mcattn_step(*_tensors(64, heads=1))

    def rows():
        for n in args.sizes:
            q, k, v = _tensors(n, heads=args.heads)
            t_ours, t_base = interleaved_times(
                lambda: mcattn_step(q, k, v, args.causal, args.method, **knobs),  # noqa: B023
                lambda: sdpa_step(q, k, v, args.causal),  # noqa: B023
                rounds=args.rounds, repeats=2 if n <= 2048 else 1,
            )
            row = {"N": n, "mcattn_s": t_ours, "sdpa_s": t_base, "ratio": t_ours / t_base}
            if args.memory:
                setup = (f"from benchmarks.bench_train import _tensors, mcattn_step, sdpa_step; "
                         f"q, k, v = _tensors({n}, heads={args.heads})")
                warm = "small = _tensors(64, heads=1)"
                row["mcattn_MiB"] = peak_growth_in_subprocess(
                    setup, f"mcattn_step(q, k, v, {args.causal})", warm + "; mcattn_step(*small)")
                row["sdpa_MiB"] = peak_growth_in_subprocess(
                    setup, f"sdpa_step(q, k, v, {args.causal})", warm + "; sdpa_step(*small)")
            yield row

    return title, rows()

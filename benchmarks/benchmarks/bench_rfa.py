"""asv suite of random feature attention: time, peak memory, ratio to torch SDPA, decoding.

B=1, H=12, d=64, float32, ``num_features=64`` (the issue's setting) unless a parameter
says otherwise. The ratio harness case is :func:`ratio_rows`
(``python benchmarks/ratio.py rfa --help``).
"""

import time

import numpy as np

from mcattn import rfa

from .common import interleaved_times, peak_growth_in_subprocess, qkv, ratio, sdpa

HEADS, HEAD_DIM, FEATURES = 12, 64, 64


def features(kind="positive", num_features=FEATURES, heads=HEADS):
    return rfa.RandomFeatures(HEAD_DIM, num_features, kind=kind, num_heads=heads, seed=0)


def run(q, k, v, feats, is_causal=False, backend=None, gate=None):
    return rfa.attention(q, k, v, features=feats, is_causal=is_causal, gate=gate, backend=backend,
                         check_finite=False)


def _warm(feats, backend, is_causal, gate=False):
    q, k, v = qkv(64, heads=feats.num_heads or 1)
    g = np.full((1, feats.num_heads or 1, 64), 0.9, np.float32) if gate else None
    run(q, k, v, feats, is_causal, backend, g)


class Rfa:
    """RFA over N, feature map and causality (numba backend)."""

    params = ([1024, 4096, 8192], ["positive", "sincos"], [False, True])
    param_names = ["N", "kind", "is_causal"]
    timeout = 600

    def setup(self, n, kind, is_causal):
        self.q, self.k, self.v = qkv(n)
        self.feats = features(kind)
        _warm(self.feats, "numba", is_causal)

    def time_attention(self, n, kind, is_causal):
        run(self.q, self.k, self.v, self.feats, is_causal, "numba")

    def peakmem_attention(self, n, kind, is_causal):
        run(self.q, self.k, self.v, self.feats, is_causal, "numba")

    def track_ratio_to_sdpa(self, n, kind, is_causal):
        """RFA time / torch SDPA time, measured here, interleaved (lower is better)."""
        return ratio(lambda: run(self.q, self.k, self.v, self.feats, is_causal, "numba"),
                     lambda: sdpa(self.q, self.k, self.v, is_causal))

    track_ratio_to_sdpa.unit = "ratio"

    def track_ops_ratio(self, n, kind, is_causal):
        """Operations of RFA / operations of exact attention for the same inputs."""
        _, info = rfa.attention(self.q, self.k, self.v, features=self.feats, is_causal=is_causal,
                                check_finite=False, return_info=True)
        return info.ops_ratio

    track_ops_ratio.unit = "ratio"


class RfaBackends:
    """The NumPy reference against the Numba kernels, and the gated form."""

    params = ([4096], ["numba", "numpy"], ["causal", "gated", "non-causal"])
    param_names = ["N", "backend", "form"]
    timeout = 600

    def setup(self, n, backend, form):
        self.q, self.k, self.v = qkv(n)
        self.feats = features()
        self.causal = form != "non-causal"
        self.gate = np.full((1, HEADS, n), 0.95, np.float32) if form == "gated" else None
        _warm(self.feats, backend, self.causal, self.gate is not None)

    def time_attention(self, n, backend, form):
        run(self.q, self.k, self.v, self.feats, self.causal, backend, self.gate)


class RfaFeatures:
    """Time over the number of features (non-causal, N = 4096)."""

    params = ([16, 64, 256], [False, True])
    param_names = ["num_features", "is_causal"]
    timeout = 600

    def setup(self, num_features, is_causal):
        self.q, self.k, self.v = qkv(4096)
        self.feats = features(num_features=num_features)
        _warm(self.feats, "numba", is_causal)

    def time_attention(self, num_features, is_causal):
        run(self.q, self.k, self.v, self.feats, is_causal, "numba")


def _decoder_at(position, feats, seed=0):
    """A decoder that has absorbed ``position`` tokens, and a token to step with."""
    q, k, v = qkv(position + 1, heads=feats.num_heads, seed=seed)
    dec = feats.decoder()
    if position:
        dec.extend(q[:, :, :position], k[:, :, :position], v[:, :, :position])
    token = (q[:, :, position], k[:, :, position], v[:, :, position])
    dec.step(*token)  # warm up the step path
    return dec, token


class RfaDecoding:
    """One decoding step at position t: O(m dv) whatever t."""

    params = [128, 1024, 8192]
    param_names = ["position"]
    timeout = 600

    def setup(self, position):
        self.dec, self.token = _decoder_at(position, features())

    def time_step(self, position):
        self.dec.step(*self.token)

    def track_step_ratio_to_t128(self, position):
        """Step time at this position / step time at t = 128, measured here, interleaved."""
        early, token_early = _decoder_at(128, features())
        t_here, t_early = interleaved_times(lambda: self.dec.step(*self.token),
                                            lambda: early.step(*token_early), rounds=5, repeats=20)
        return t_here / t_early

    track_step_ratio_to_t128.unit = "ratio"


class RfaMemory:
    """Peak memory over N (it must grow linearly): one head, numba backend."""

    params = ([4096, 16384, 65536], [False, True])
    param_names = ["N", "is_causal"]
    timeout = 900

    def setup(self, n, is_causal):
        self.q, self.k, self.v = qkv(n, heads=1)
        self.feats = features(heads=1)
        _warm(self.feats, "numba", is_causal)

    def peakmem_attention(self, n, is_causal):
        run(self.q, self.k, self.v, self.feats, is_causal, "numba")

    def track_peak_growth_mib(self, n, is_causal):
        """Peak RSS growth of one call in a fresh process (inputs excluded), MiB."""
        return _peak_growth(n, 1, is_causal)

    track_peak_growth_mib.unit = "MiB"


def _peak_growth(n, heads, is_causal, baseline=False):
    setup = (f"q, k, v = qkv({n}, heads={heads}); from benchmarks.bench_rfa import features, run; "
             f"feats = features(heads={heads})")
    warm = "small = qkv(64, heads=1); " + (
        "sdpa(*small)" if baseline else f"run(*small, features(heads=1), {is_causal}, 'numba')")
    call = f"sdpa(q, k, v, {is_causal})" if baseline else f"run(q, k, v, feats, {is_causal}, 'numba')"
    return peak_growth_in_subprocess(setup, call, warm)


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py rfa``: RFA (numba) against torch SDPA, decoding, memory."""
    import argparse

    import numba
    import torch

    parser = argparse.ArgumentParser(prog="ratio.py rfa")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--features", type=int, default=FEATURES)
    parser.add_argument("--kind", default="positive", choices=rfa.KINDS)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS growth per call (subprocess)")
    parser.add_argument("--decode", action="store_true",
                        help="decoding step time at each size as the position, against t=128")
    args = parser.parse_args(argv)
    feats = features(args.kind, args.features, args.heads)
    setting = (f"B=1 H={args.heads} d={HEAD_DIM} float32, {args.kind} features, D={args.features}, "
               f"numba {numba.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if args.decode:
        return f"mcattn rfa decoding step, {setting}", _decode_rows(args, feats)
    title = f"mcattn rfa / torch SDPA, CPU, causal={args.causal}, {setting}"

    def rows():
        _warm(feats, "numba", args.causal)
        for n in args.sizes:
            q, k, v = qkv(n, heads=args.heads)
            t_ours, t_base = interleaved_times(
                lambda: run(q, k, v, feats, args.causal, "numba"),  # noqa: B023
                lambda: sdpa(q, k, v, args.causal),  # noqa: B023
                rounds=args.rounds, repeats=3 if n <= 4096 else 2,
            )
            row = {"N": n, "rfa_s": t_ours, "sdpa_s": t_base, "ratio": t_ours / t_base,
                   "speedup": t_base / t_ours}
            if args.memory:
                row["rfa_MiB"] = _peak_growth(n, args.heads, args.causal)
                row["sdpa_MiB"] = _peak_growth(n, args.heads, args.causal, baseline=True)
            yield row

    return title, rows()


def _decode_rows(args, feats):
    early, token_early = _decoder_at(128, feats)
    for position in args.sizes:
        dec, token = _decoder_at(position, feats)
        t_here, t_early = interleaved_times(lambda: dec.step(*token),  # noqa: B023
                                            lambda: early.step(*token_early), rounds=args.rounds * 3,
                                            repeats=50)
        yield {"position": position, "step_us": t_here * 1e6, "step_t128_us": t_early * 1e6,
               "ratio_to_t128": t_here / t_early}


def step_time(dec, token, repeats=200):
    """Mean time of ``repeats`` steps (for quick checks)."""
    start = time.perf_counter()
    for _ in range(repeats):
        dec.step(*token)
    return (time.perf_counter() - start) / repeats

"""asv suite of Monte-Carlo attention: the sampled value projection against the dense GEMM.

Budgets come from the real attention of the embedded MiniLM sample (every layer), at
the alphas of the real-attention table, so the work is what MCA does on real inputs;
the long case (:func:`long_problem`) takes them from MiniLM on 8 windows of 512 tokens
of real text (4096 tokens, no padding; needs ``mcattn[eval]``), and the uniform case
(:func:`uniform_problem`) sets every budget to a fixed fraction of ``d_in``.
"""

import functools

import numpy as np

import mcattn
from mcattn import mca
from mcattn.mca.naive import shared_budgets
from mcattn.mca.shared import round_budgets

from .common import interleaved_times

ALPHAS = [0.1, 0.2, 0.4, 0.6, 1.0]


def real_problem(alpha, dtype=np.float32):
    """Per layer: (x [B, N, d_in], w [d_in, H dh], b, budgets [B, H, N], tables) from the
    sample; the weight tables are built once per layer, as a model would at load time."""
    from mcattn.studies.data import load_sample

    sample = load_sample()
    kpm = sample.key_padding_mask
    layers = []
    for layer in range(sample.num_layers):
        probs = mcattn.attention_probs(sample.q[layer], sample.k[layer], key_padding_mask=kpm,
                                       scale=sample.scale)
        r = mca.budgets(probs, alpha, sample.x.shape[-1], key_padding_mask=kpm)
        w = sample.w_v[layer].astype(dtype)
        layers.append((sample.x[layer].astype(dtype), w, sample.b_v[layer].astype(dtype), r,
                       mca.weight_tables(w, sample.num_heads)))
    return sample.num_heads, layers, kpm


@functools.lru_cache(maxsize=2)
def _long_capture(windows, length):
    from mcattn.studies.data.windows import capture_windows

    return capture_windows(length, windows, value_inputs=True)


def long_budgets(alpha, windows=8, length=512):
    """Per layer, MCA's budgets ``[windows, H, length]`` on real MiniLM attention over
    ``windows`` windows of ``length`` tokens of head500 (exact probabilities, no mask)."""
    cap = _long_capture(windows, length)
    scale = 1.0 / np.sqrt(cap.q.shape[-1])
    return [mca.budgets(mcattn.attention_probs(cap.q[i], cap.k[i], scale=scale), alpha,
                        cap.x.shape[-1]) for i in range(cap.q.shape[0])]


def long_problem(alpha, windows=8, length=512, dtype=np.float32, budgets=None):
    """As :func:`real_problem` on 8 windows of 512 real tokens (B=8, N=512: 4096 tokens,
    MiniLM's longest input; no padding, so the key padding mask is all True)."""
    cap = _long_capture(windows, length)
    heads = cap.q.shape[2]
    budgets = long_budgets(alpha, windows, length) if budgets is None else budgets
    layers = []
    for i, r in enumerate(budgets):
        w = cap.w_v[i].astype(dtype)
        layers.append((cap.x[i].astype(dtype), w, cap.b_v[i].astype(dtype), r,
                       mca.weight_tables(w, heads)))
    return heads, layers, np.ones((windows, length), dtype=bool)


def dense_projection(layers, heads):
    for x, w, b, _, _ in layers:
        (x @ w + b).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3).copy()


def sampled_projection(layers, heads, shared, backend="numba", sampling="weight", share="row"):
    """The sampled projections of ``layers``; ``share="batch"``: one draw sequence per head
    for the whole batch (with ``shared``)."""
    for x, w, b, r, tables in layers:
        if shared:  # what mca.attention does before the reduced GEMMs: budgets rounded up first
            r = shared_budgets(r, x.shape[-1], False, round_budgets, share)
        mca.value_projection(x, w, b, num_heads=heads, budgets=r, seed=0, shared_draws=shared,
                             backend=backend, sampling=sampling, tables=tables, share=share)


def packed_dense_projection(layers, heads, kpm):
    """The dense GEMM on the real tokens only (no padding)."""
    for x, w, b, _, _ in layers:
        (x[kpm] @ w + b).reshape(-1, heads, w.shape[1] // heads).transpose(1, 0, 2).copy()


def uniform_problem(fraction, n=4096, d_in=384, heads=12, head_dim=32, dtype=np.float32, seed=0):
    """One layer of random inputs with every token's budget ``round(fraction * d_in)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, n, d_in)).astype(dtype)
    w = (rng.standard_normal((d_in, heads * head_dim)) / np.sqrt(d_in)).astype(dtype)
    b = np.zeros(heads * head_dim, dtype)
    r = np.full((1, heads, n), max(1, round(fraction * d_in)), np.int64)
    return heads, [(x, w, b, r, mca.weight_tables(w, heads))]


def _draw_ratios(row, layers, heads, draws, rounds):
    """``row`` plus ``<label>/dense`` (sampled / dense time, interleaved) for each
    ``(label, shared[, share])`` of ``draws``, and the last dense time in ms."""
    for label, shared, *share in draws:
        share = share[0] if share else "row"
        t_s, t_d = interleaved_times(lambda: sampled_projection(layers, heads, shared, share=share),  # noqa: B023
                                     lambda: dense_projection(layers, heads), rounds=rounds)
        row[f"{label}/dense"] = t_s / t_d
    row["dense_ms"] = t_d * 1e3
    return row


def uniform_ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py mca_uniform``: uniform budgets, B=1, N=4096."""
    import argparse

    parser = argparse.ArgumentParser(prog="ratio.py mca_uniform")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-independent", action="store_true",
                        help="time shared draws only (independent draws are 2-10x slower)")
    args = parser.parse_args(argv)
    title = (f"mca value projection / dense x @ W_V (NumPy BLAS), uniform budgets, B=1 N={args.n} "
             f"d_in=384, 12 heads of 32, float32, {mcattn.config.num_threads()} threads")

    def rows():
        for fraction in args.fractions:
            heads, layers = uniform_problem(fraction, n=args.n)
            sampled_projection(layers, heads, True)  # warm
            draws = (("shared", True), ("batch", True, "batch"))
            yield _draw_ratios({"macs_kept": fraction}, layers, heads,
                               draws + (() if args.no_independent else (("indep", False),)),
                               args.rounds)

    return title, rows()


class McaSharedUniform:
    """Shared draws as reduced GEMMs at uniform budgets (10/20/40 % of the MACs), N=4096."""

    params = [[0.1, 0.2, 0.4]]
    param_names = ["fraction"]
    timeout = 600

    def setup(self, fraction):
        self.heads, self.layers = uniform_problem(fraction)

    def time_shared(self, fraction):
        sampled_projection(self.layers, self.heads, True)

    def track_ratio_to_dense(self, fraction):
        """Shared-draw projection time / dense GEMM time, interleaved (lower is better)."""
        t_s, t_d = interleaved_times(lambda: sampled_projection(self.layers, self.heads, True),
                                     lambda: dense_projection(self.layers, self.heads), rounds=3)
        return t_s / t_d

    track_ratio_to_dense.unit = "ratio"


def rounded_macs_kept(layers, kpm, share="row"):
    """As :func:`macs_kept` with the budgets rounded up as the shared-draw path does (per
    head across the batch with ``share="batch"``)."""
    return macs_kept([(x, w, b, shared_budgets(r, x.shape[-1], False, round_budgets, share), t)
                      for x, w, b, r, t in layers], kpm)


def macs_kept(layers, kpm):
    kept = total = 0
    for x, _, _, r, _ in layers:
        valid = np.broadcast_to(kpm[:, None, :], r.shape)
        kept += np.minimum(r, x.shape[-1])[valid].sum()
        total += valid.sum() * x.shape[-1]
    return kept / total


class McaProjection:
    """Sampled projection (independent or shared draws) vs dense x @ W_V, real budgets."""

    params = (ALPHAS, ["independent", "shared"])
    param_names = ["alpha", "draws"]
    timeout = 600

    def setup(self, alpha, draws):
        self.heads, self.layers, self.kpm = real_problem(alpha)
        self.shared = draws == "shared"
        sampled_projection(self.layers, self.heads, self.shared)  # compile

    def time_sampled(self, alpha, draws):
        sampled_projection(self.layers, self.heads, self.shared)

    def time_dense(self, alpha, draws):
        dense_projection(self.layers, self.heads)

    def track_ratio_to_dense(self, alpha, draws):
        """Sampled projection time / dense GEMM time, same process (lower is better)."""
        t_s, t_d = interleaved_times(lambda: sampled_projection(self.layers, self.heads, self.shared),
                                     lambda: dense_projection(self.layers, self.heads))
        return t_s / t_d

    track_ratio_to_dense.unit = "ratio"

    def track_ratio_to_packed(self, alpha, draws):
        """Sampled projection time / dense GEMM over the real tokens only (no padding)."""
        t_s, t_p = interleaved_times(lambda: sampled_projection(self.layers, self.heads, self.shared),
                                     lambda: packed_dense_projection(self.layers, self.heads, self.kpm))
        return t_s / t_p

    track_ratio_to_packed.unit = "ratio"

    def track_macs_kept(self, alpha, draws):
        """The paper's "FLOPs kept": projection multiply-adds done / dense (valid tokens)."""
        return macs_kept(self.layers, self.kpm)

    track_macs_kept.unit = "fraction"


class McaAttention:
    """Whole MCA attention on the real sample vs exact attention, same process."""

    params = [[0.2, 1.0]]
    param_names = ["alpha"]
    timeout = 600

    def setup(self, alpha):
        from mcattn.studies.data import load_sample

        self.sample = load_sample()
        self.alpha = alpha
        self.run_mca()
        self.run_exact()

    def run_mca(self):
        s = self.sample
        for layer in range(s.num_layers):
            mca.attention(s.q[layer], s.k[layer], s.x[layer], s.w_v[layer], s.b_v[layer],
                          num_heads=s.num_heads, alpha=self.alpha, scale=s.scale, seed=0,
                          key_padding_mask=s.key_padding_mask)

    def run_exact(self):
        s = self.sample
        for layer in range(s.num_layers):
            v = (s.x[layer] @ s.w_v[layer] + s.b_v[layer])
            v = v.reshape(v.shape[0], v.shape[1], s.num_heads, -1).transpose(0, 2, 1, 3)
            mcattn.attention(s.q[layer], s.k[layer], v, key_padding_mask=s.key_padding_mask,
                             scale=s.scale)

    def time_mca(self, alpha):
        self.run_mca()

    def track_ratio_to_exact(self, alpha):
        """MCA attention (probabilities + sampled projection + A V~) / exact with dense V."""
        t_m, t_e = interleaved_times(self.run_mca, self.run_exact)
        return t_m / t_e

    track_ratio_to_exact.unit = "ratio"


class McaProjectionLong:
    """Sampled projection vs dense x @ W_V, budgets from real attention on 8 windows of 512
    tokens (4096 tokens, no padding: the dense GEMM is already packed)."""

    params = (ALPHAS, ["independent", "shared"])
    param_names = ["alpha", "draws"]
    timeout = 900

    def setup_cache(self):
        return {alpha: long_budgets(alpha) for alpha in ALPHAS}  # runs the model once

    def setup(self, budgets, alpha, draws):
        self.heads, self.layers, self.kpm = long_problem(alpha, budgets=budgets[alpha])
        self.shared = draws == "shared"
        sampled_projection(self.layers, self.heads, self.shared)  # compile

    def time_sampled(self, budgets, alpha, draws):
        sampled_projection(self.layers, self.heads, self.shared)

    def track_ratio_to_dense(self, budgets, alpha, draws):
        """Sampled projection time / dense GEMM time, same process (lower is better)."""
        t_s, t_d = interleaved_times(lambda: sampled_projection(self.layers, self.heads, self.shared),
                                     lambda: dense_projection(self.layers, self.heads))
        return t_s / t_d

    track_ratio_to_dense.unit = "ratio"

    def track_macs_kept(self, budgets, alpha, draws):
        """Projection multiply-adds done / dense."""
        return macs_kept(self.layers, self.kpm)

    track_macs_kept.unit = "fraction"


def long_ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py mca_long``: real budgets, 8 x 512 tokens."""
    import argparse

    parser = argparse.ArgumentParser(prog="ratio.py mca_long")
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-independent", action="store_true",
                        help="time shared draws only (independent draws are 2-10x slower)")
    args = parser.parse_args(argv)
    title = ("mca value projection / dense x @ W_V (NumPy BLAS), budgets from real MiniLM "
             "attention on 8 windows of 512 tokens of head500 (B=8, N=512, no padding), all 6 "
             f"layers, float32, {mcattn.config.num_threads()} threads")

    def rows():
        for alpha in args.alphas:
            heads, layers, kpm = long_problem(alpha)
            exact = np.mean([(r >= x.shape[-1]).mean() for x, _, _, r, _ in layers])
            row = {"alpha": alpha, "macs_kept": macs_kept(layers, kpm),
                   "rounded_kept": rounded_macs_kept(layers, kpm), "exact_tokens": exact}
            draws = (("shared", True),) if args.no_independent else (("shared", True), ("indep", False))
            yield _draw_ratios(row, layers, heads, draws, args.rounds)

    return title, rows()


def ratio_rows(argv):
    """Rows of ``python benchmarks/ratio.py mca``: sampled projection time / dense GEMM time."""
    import argparse

    import numba

    parser = argparse.ArgumentParser(prog="ratio.py mca")
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--packed", action="store_true",
                        help="only the shared draws (share='row' and 'batch') against the dense "
                             "GEMM over the real tokens (no padded baseline, no independent draws)")
    args = parser.parse_args(argv)
    title = (f"mca value projection (numba {numba.__version__}) / dense x @ W_V (NumPy BLAS), "
             f"budgets from real MiniLM attention, all 6 layers, {args.dtype}, "
             f"{mcattn.config.num_threads()} threads")

    def rows():
        for alpha in args.alphas:
            heads, layers, kpm = real_problem(alpha, np.dtype(args.dtype))
            row = {"alpha": alpha, "macs_kept": macs_kept(layers, kpm),
                   "rounded_kept": rounded_macs_kept(layers, kpm)}
            if args.packed:
                row["batch_kept"] = rounded_macs_kept(layers, kpm, "batch")
                for label, share in (("shared", "row"), ("batch", "batch")):
                    t_s, t_p = interleaved_times(
                        lambda: sampled_projection(layers, heads, True, share=share),  # noqa: B023
                        lambda: packed_dense_projection(layers, heads, kpm),  # noqa: B023
                        rounds=args.rounds,
                    )
                    row[f"{label}/packed"] = t_s / t_p
                row["packed_ms"] = t_p * 1e3
                yield row
                continue
            for label, shared, sampling in (("indep", False, "weight"), ("shared", True, "weight"),
                                            ("optimal", False, "optimal")):
                t_s, t_d = interleaved_times(
                    lambda: sampled_projection(layers, heads, shared, sampling=sampling),  # noqa: B023
                    lambda: dense_projection(layers, heads),  # noqa: B023
                    rounds=args.rounds,
                )
                row[f"{label}/dense"] = t_s / t_d
            row["dense_ms"] = t_d * 1e3
            t_s, t_p = interleaved_times(
                lambda: sampled_projection(layers, heads, True),  # noqa: B023
                lambda: packed_dense_projection(layers, heads, kpm),  # noqa: B023
                rounds=args.rounds,
            )
            row["shared/packed"] = t_s / t_p
            yield row

    return title, rows()


class McaSharedGpu:
    """Shared draws on a GPU (one launch applying the host plan) against the dense cuBLAS
    GEMM, uniform budgets, B=1, N=4096; skipped where no GPU backend runs."""

    params = ([0.1, 0.2, 0.4], ["cupy", "cuda"])
    param_names = ["fraction", "backend"]
    timeout = 600

    def setup(self, fraction, backend):
        from mcattn._dispatch import backend_status

        if not backend_status(backend).available:
            raise NotImplementedError(f"{backend}: {backend_status(backend).reason}")  # asv: skip
        import cupy

        heads, layers = uniform_problem(fraction)
        x, w, b, r, tables = layers[0]
        self.x, self.w, self.b, self.r = (cupy.asarray(a) for a in (x, w, b, r))
        self.heads, self.tables, self.backend = heads, tables, backend
        self.run_shared()
        self.run_dense()
        cupy.cuda.Device().synchronize()

    def run_shared(self):
        mca.value_projection(self.x, self.w, self.b, num_heads=self.heads, budgets=self.r, seed=0,
                             shared_draws=True, backend=self.backend, tables=self.tables)

    def run_dense(self):
        (self.x @ self.w + self.b).reshape(self.x.shape[0], self.x.shape[1], self.heads, -1)

    def _synced(self, fn):
        import cupy

        def run():
            fn()
            cupy.cuda.Device().synchronize()
        return run

    def time_shared(self, fraction, backend):
        self._synced(self.run_shared)()

    def track_ratio_to_dense(self, fraction, backend):
        """Shared-draw projection / dense GEMM on the same GPU (lower is better)."""
        t_s, t_d = interleaved_times(self._synced(self.run_shared), self._synced(self.run_dense))
        return t_s / t_d

    track_ratio_to_dense.unit = "ratio"

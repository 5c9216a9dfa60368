"""asv suite of exact attention: time, peak memory and the ratio to torch SDPA."""

from .common import exact, qkv, ratio, sdpa


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

"""MCA's numba.cuda kernel draws the same samples as the CPU kernel (simulator or GPU)."""

import numpy as np
import pytest
from helpers import GPU_PRESENT, host, rel_error, to_device

from mcattn import mca
from mcattn.mca import cpu

pytestmark = pytest.mark.cudasim


def _problem(rng, batch=2, n=5, d_in=24, heads=3, dh=4, dtype=np.float64):
    x = rng.standard_normal((batch, n, d_in)).astype(dtype)
    x[0, 1] = 0.0  # a zero row is exact
    w = (rng.standard_normal((d_in, heads * dh)) * np.linspace(0.3, 2, d_in)[:, None]).astype(dtype)
    b = rng.standard_normal(heads * dh).astype(dtype)
    r = rng.integers(0, 30, (batch, heads, n))  # 0 (masked), sampled, >= d_in (exact)
    return x, w, b, r


@pytest.mark.parametrize("sampling", ["weight", "optimal"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_kernel_draws_the_cpu_samples(sampling, dtype):
    rng = np.random.default_rng(0)
    x, w, b, r = _problem(rng, dtype=dtype)
    ref = cpu.value_projection(x, w, b, 3, r, 99, sampling)
    dx, dw, db, dr = to_device(x, w, b, r)
    out = mca.value_projection(dx, dw, db, num_heads=3, budgets=dr, seed=99, sampling=sampling,
                               backend="cuda")
    assert host(out).dtype == dtype
    assert rel_error(host(out), ref) < (1e-13 if dtype == np.float64 else 1e-6)


def test_optimal_cdf_scratch_split_into_launches(monkeypatch):
    """A scratch smaller than the call: several launches, the same draws as the CPU."""
    from mcattn import config
    from mcattn.mca._gpu import scratch_plan

    monkeypatch.setattr(config, "CUDA_SCRATCH_BYTES", 8 * 24 * 7)  # 7 tokens' CDFs
    assert scratch_plan(30, 24, True) == (7, range(0, 30, 7))
    assert scratch_plan(30, 24, False) == (30, range(0, 30, 30))
    rng = np.random.default_rng(2)
    x, w, b, r = _problem(rng)  # 2 x 3 x 5 = 30 tasks: launches of 7, 7, 7, 7, 2
    ref = cpu.value_projection(x, w, b, 3, r, 7, "optimal")
    dx, dw, db, dr = to_device(x, w, b, r)
    out = mca.value_projection(dx, dw, db, num_heads=3, budgets=dr, seed=7, sampling="optimal",
                               backend="cuda")
    assert rel_error(host(out), ref) < 1e-13


def test_cuda_attention_matches_numba_attention():
    rng = np.random.default_rng(1)
    q, k = (rng.standard_normal((1, 2, 6, 4)) for _ in range(2))
    x = rng.standard_normal((1, 6, 16))
    w = rng.standard_normal((16, 8))
    kpm = np.array([[True] * 5 + [False]])
    ref = mca.attention(q, k, x, w, None, num_heads=2, alpha=0.7, key_padding_mask=kpm, seed=5)
    if GPU_PRESENT:
        pytest.skip("attention on device arrays is covered by the projection test")
    out = mca.attention(q, k, x, w, None, num_heads=2, alpha=0.7, key_padding_mask=kpm, seed=5,
                        backend="cuda")
    assert rel_error(out, ref) < 1e-13


@pytest.mark.parametrize("seed,stream,first", [(1, 0, 0), (2**33 + 1, 2**41, 2**32 - 3)])
def test_numba_cuda_philox_equals_numpy(seed, stream, first):
    from mcattn import random as mrandom
    from mcattn._random_cuda import philox_words_kernel as kernel
    n = 40
    words = np.zeros((n, 4), np.uint32)
    uniforms = np.zeros(n)
    k0, k1 = mrandom.seed_to_key(seed)
    if GPU_PRESENT:
        import cupy

        words, uniforms = cupy.asarray(words), cupy.asarray(uniforms)
    kernel[2, 32](k0, k1, np.uint64(stream), np.uint64(first), words, uniforms)
    index = np.arange(first, first + n, dtype=np.uint64)
    assert np.array_equal(host(words), mrandom.philox_words(seed, stream, index))
    assert np.array_equal(host(uniforms), mrandom.uniform(seed, stream, index))

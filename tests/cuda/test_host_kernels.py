"""CuPy RawKernel sources, executed by mcattn's own CuPy launchers.

Without a GPU, ``cupy`` is the fake of ``fake_cupy.py``: the public API runs with
``backend="cupy"``, the package's launcher calls ``cupy.RawKernel`` and the kernel runs
on CPU threads under the host shim, after its arguments were checked against the
kernel's parameter types. With a GPU the same tests run on real CuPy. Results are
compared with the float64 reference or, for sampling kernels, with the CPU kernel
draw for draw.
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, dense_attention, rel_error

import mcattn
from mcattn import random as mrandom

pytestmark = pytest.mark.hostshim

if not GPU_PRESENT:
    import host_kernels


@pytest.fixture
def cp(cupy_or_fake, monkeypatch):
    yield cupy_or_fake


def _exact(cp, q, k, v, threads, **mask):
    mcattn.config.CUDA_THREADS_PER_BLOCK = threads
    try:
        out = mcattn.attention(*(cp.asarray(a) for a in (q, k, v)), backend="cupy",
                               **{n: None if m is None else cp.asarray(m) for n, m in mask.items()
                                  if n not in ("is_causal", "scale")},
                               is_causal=mask.get("is_causal", False), scale=mask.get("scale"))
    finally:
        mcattn.config.CUDA_THREADS_PER_BLOCK = 64
    assert isinstance(out, cp.ndarray)
    return out.get()


def test_shim_shared_memory_barriers_and_early_exit():
    if GPU_PRESENT:
        pytest.skip("checks the host shim itself")
    rng = np.random.default_rng(0)
    values = rng.standard_normal(3 * 40).astype(np.float32)
    sums = host_kernels.block_sum(values, active=40, blocks=3)
    assert np.allclose(sums, values.reshape(3, 40).sum(1), rtol=1e-5)
    total, count = host_kernels.atomic_sum(np.arange(100.0))
    assert total == 4950.0 and count == 100


@pytest.mark.parametrize("seed,stream,first", [(0, 0, 0), (2**40 + 7, 3, 2**32 - 5),
                                               (2**64 - 1, 2**45 + 1, 17)])
def test_philox_kernel_equals_numpy(cp, seed, stream, first):
    from mcattn._cupy import raw_module

    n = 70
    kernel = raw_module("kernels/random.cu").get_function("mcattn_philox_words")
    words, uniforms = cp.zeros((n, 4), cp.uint32), cp.zeros(n)
    k0, k1 = mrandom.seed_to_key(seed)
    kernel((3,), (32,), (np.uint32(k0), np.uint32(k1), np.uint64(stream), np.uint64(first),
                         np.int64(n), words, uniforms))
    words, uniforms = words.get(), uniforms.get()
    index = np.arange(first, first + n, dtype=np.uint64)
    assert np.array_equal(words, mrandom.philox_words(seed, stream, index))
    assert np.array_equal(uniforms, mrandom.uniform(seed, stream, index))  # bit for bit


CASES = {
    "plain": dict(shape=((2, 2), 19, 23, 16, 16)),
    "one-token": dict(shape=((1,), 1, 1, 8, 8)),
    "odd-sizes": dict(shape=((3,), 37, 45, 5, 3)),
    "wide-head": dict(shape=((1,), 9, 40, 128, 128)),
    "d1": dict(shape=((2,), 6, 7, 1, 2)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_exact_kernel_matches_reference(cp, case, dtype, tol, is_causal):
    batch, nq, nk, d, dv = CASES[case]["shape"]
    rng = np.random.default_rng(len(case))
    q = rng.standard_normal(batch + (nq, d)).astype(dtype)
    k = rng.standard_normal(batch + (nk, d)).astype(dtype)
    v = rng.standard_normal(batch + (nk, dv)).astype(dtype)
    out = _exact(cp, q, k, v, threads=16, is_causal=is_causal)
    assert rel_error(out, dense_attention(q, k, v, is_causal=is_causal)) < tol


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_exact_kernel_masks(cp, dtype, tol):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, 21, 8)).astype(dtype) for _ in range(3))
    kpm = rng.random((2, 21)) > 0.3
    kpm[1] = False  # a fully padded sequence: zeros, not NaN
    out = _exact(cp, q, k, v, threads=8, key_padding_mask=kpm)
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))
    assert rel_error(out, dense_attention(q, k, v, mask=kpm[:, None, None, :])) < tol
    bool_mask = rng.random((21, 21)) > 0.5
    out = _exact(cp, q, k, v, threads=8, attn_mask=bool_mask, is_causal=True)
    assert rel_error(out, dense_attention(q, k, v, mask=bool_mask, is_causal=True)) < tol
    additive = rng.standard_normal((2, 1, 21, 21)).astype(dtype)
    additive[0, 0, 4] = -np.inf
    out = _exact(cp, q, k, v, threads=8, attn_mask=additive)
    assert np.all(out[0, :, 4] == 0)
    assert rel_error(out, dense_attention(q, k, v, mask=additive)) < tol


def test_exact_kernel_on_real_attention(cp):
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = s.q[3, :2], s.k[3, :2], s.v[3, :2]  # two sequences of layer 3 (106, 122 tokens)
    kpm = s.key_padding_mask[:2]
    out = _exact(cp, q, k, v, threads=32, key_padding_mask=kpm, scale=s.scale)
    ref = dense_attention(q, k, v, mask=kpm[:, None, None, :], scale=s.scale)
    assert rel_error(out, ref) < 2e-6


@pytest.mark.parametrize("sampling", ["weight", "optimal"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 1e-6)])
def test_mca_kernel_draws_the_cpu_samples(cp, sampling, dtype, tol):
    from mcattn.mca import cpu

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 40)).astype(dtype)
    x[1, 2] = 0.0
    w = (rng.standard_normal((40, 12)) * np.linspace(0.2, 2, 40)[:, None]).astype(dtype)
    b = rng.standard_normal(12).astype(dtype)
    r = rng.integers(0, 50, (2, 3, 6))
    ref = cpu.value_projection(x, w, b, 3, r, 2024, sampling)
    out = mcattn.mca.value_projection(*(cp.asarray(a) for a in (x, w, b)), num_heads=3,
                                      budgets=cp.asarray(r), seed=2024, sampling=sampling,
                                      backend="cupy").get()
    assert out.dtype == dtype
    assert rel_error(out, ref) < tol


def test_mca_kernel_optimal_scratch_in_several_launches(cp, monkeypatch):
    from mcattn import config
    from mcattn.mca import cpu

    monkeypatch.setattr(config, "CUDA_SCRATCH_BYTES", 8 * 40 * 5)  # 5 tokens per launch
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 40))
    w = rng.standard_normal((40, 12))
    r = rng.integers(0, 50, (2, 3, 6))
    ref = cpu.value_projection(x, w, None, 3, r, 11, "optimal")
    out = mcattn.mca.value_projection(cp.asarray(x), cp.asarray(w), num_heads=3,
                                      budgets=cp.asarray(r), seed=11, sampling="optimal",
                                      backend="cupy").get()
    assert rel_error(out, ref) < 1e-13
    if not GPU_PRESENT:  # 2 x 3 x 6 = 36 tokens, 5 per launch
        launches = [x for x in cp.LAUNCHES if x["kernel"] == "mcattn_mca_projection_optimal_f64"]
        assert len(launches) == 8 and launches[-1]["grid"] == (1, 1, 1)

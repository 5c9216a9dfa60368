"""mcattn's own CuPy launch code, run through the fake CuPy (no GPU) or real CuPy (GPU).

The fake checks what a real GPU would not forgive (argument count and C types, array
dtypes, contiguity, device, grid limits) and records every launch, so these tests see
the grids and arguments the package really passes.
"""

import numpy as np
import pytest
from fake_cupy import cupy_or_fake  # noqa: F401 - fixture
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import mca
from mcattn._cupy import raw_module

pytestmark = pytest.mark.hostshim

needs_fake = pytest.mark.skipif(GPU_PRESENT, reason="inspects the fake CuPy's launch records")


def _philox(cp):
    return raw_module("kernels/random.cu").get_function("mcattn_philox_words")


@needs_fake
def test_fake_rawkernel_checks_arguments_like_the_driver(cupy_or_fake):
    cp = cupy_or_fake
    kernel = _philox(cp)
    assert kernel.params == ["u32", "u32", "u64", "u64", "i64", "*u32", "*f64"]
    words, uniforms = cp.zeros((8, 4), cp.uint32), cp.zeros(8)
    good = [np.uint32(1), np.uint32(2), np.uint64(0), np.uint64(0), np.int64(8), words, uniforms]
    kernel((1,), (8,), tuple(good))
    assert cp.LAUNCHES[-1]["args"][:5] == ["uint32", "uint32", "uint64", "uint64", "int64"]
    bad_cases = {
        "scalar type": (4, np.int32(8), TypeError),          # int for a long long
        "python float": (0, 1.0, TypeError),
        "array dtype": (6, cp.zeros(8, cp.float32), TypeError),
        "host array": (5, np.zeros((8, 4), np.uint32), TypeError),
        "not contiguous": (5, cp.zeros((8, 8), cp.uint32)[:, ::2], ValueError),
        "scalar for pointer": (6, np.float64(0), TypeError),
    }
    for label, (i, value, error) in bad_cases.items():
        args = list(good)
        args[i] = value
        with pytest.raises(error):
            kernel((1,), (8,), tuple(args))
            pytest.fail(label)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        kernel((1,), (8,), tuple(good[:-1]))
    launches = len(cp.LAUNCHES)
    for grid, block in (((1, 65536), (8,)), ((0,), (8,)), ((1,), (1025,)), ((1,), (8, 8, 65)),
                        ((2**31,), (1,))):
        with pytest.raises(cp.cuda.CUDADriverError, match="INVALID_VALUE"):
            kernel(grid, block, tuple(good))
    assert len(cp.LAUNCHES) == launches + 5  # recorded, then refused by the shim


@needs_fake
def test_exact_splits_grid_y_above_65535(cupy_or_fake, monkeypatch):
    """65,537 (batch x head) rows: gridDim.y 65,535 + 2, and every row computed."""
    cp = cupy_or_fake
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 1)  # 1-thread blocks: fast shim
    rng = np.random.default_rng(0)
    bh = 65537
    q = rng.standard_normal((bh, 1, 2))
    k = rng.standard_normal((bh, 2, 2))
    v = rng.standard_normal((bh, 2, 1))
    out = mcattn.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), backend="cupy").get()
    grids = [x["grid"] for x in cp.LAUNCHES if x["kernel"] == "mcattn_exact_forward_f64"]
    assert grids == [(1, 65535, 1), (1, 2, 1)]
    s = np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(2)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkv->bqv", p / p.sum(-1, keepdims=True), v)
    assert rel_error(out, ref) < 1e-13


@pytest.mark.parametrize("sampling", ["weight", "optimal"])
def test_mca_attention_with_cupy_inputs(cupy_or_fake, sampling):
    """Public mca.attention on CuPy(-like) arrays: probabilities by array code, the value
    projection by mca.cupy's launcher; the same draws as the Numba CPU path."""
    cp = cupy_or_fake
    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((2, 3, 9, 4)) for _ in range(2))
    x = rng.standard_normal((2, 9, 20))
    w = rng.standard_normal((20, 12))
    b = rng.standard_normal(12)
    kpm = np.ones((2, 9), bool)
    kpm[1, 6:] = False
    kw = dict(num_heads=3, alpha=0.5, seed=21, sampling=sampling)
    ref = mca.attention(q, k, x, w, b, key_padding_mask=kpm, backend="numba", **kw)
    out = mca.attention(*(cp.asarray(a) for a in (q, k, x, w, b)), key_padding_mask=cp.asarray(kpm),
                        backend="cupy", **kw)
    assert isinstance(out, cp.ndarray)
    assert rel_error(out.get(), ref) < 1e-13
    if not GPU_PRESENT:
        (launch,) = [x for x in cp.LAUNCHES if x["kernel"].startswith("mcattn_mca_projection")]
        assert launch["kernel"] == f"mcattn_mca_projection_{sampling}_f64"
        assert launch["block"] == (128, 1, 1) and launch["grid"] == (1, 1, 1)  # 2 x 3 x 9 tokens


def test_every_registered_source_runs_through_the_fake(cupy_or_fake):
    """Each source of KERNEL_SOURCES builds as a RawModule and exposes every kernel it lists."""
    from mcattn._cupy import KERNEL_SOURCES

    for source, kernels in KERNEL_SOURCES.items():
        module = raw_module(source)
        for name in kernels:
            kernel = module.get_function(name)
            if not GPU_PRESENT:
                assert kernel.params, name

"""MCA's shared draws on the GPU backends: the host plan applied on the device.

``backend="cupy"`` runs the reduced GEMMs on cuBLAS (``config.MCA_SHARED_CUPY = "gemm"``,
the default: CuPy array code and ``cupy.matmul``) or ``mca/kernels/mca_shared.cu``
(``"kernel"``; host shim under the fake CuPy, or a GPU); the cupy tests run both.
``backend="cuda"`` runs the numba.cuda kernel (simulator, or a GPU); all must give the
compiled CPU version's estimate (:func:`mcattn.mca.shared_cpu.value_projection`: same
draws, same groups, accumulated in the input precision).
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, host, rel_error, to_device

from mcattn import config, mca
from mcattn.errors import ConfigError
from mcattn.mca import _gpu, shared, shared_cpu

needs_fake = pytest.mark.skipif(GPU_PRESENT, reason="inspects the fake CuPy's launch records")
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _problem(seed, batch, n, d_in, heads, dh, dtype, with_bias=True):
    """Inputs with every kind of token: masked (0), exact (>= d_in), a zero row of ``x``
    (sampled budget: its estimate is the bias), and sampled ones of mixed budgets, rounded
    as :func:`mcattn.mca.attention` rounds them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, d_in)).astype(dtype)
    x[0, 1] = 0.0
    w = (rng.standard_normal((d_in, heads * dh)) * np.linspace(0.2, 2, d_in)[:, None]).astype(dtype)
    b = rng.standard_normal(heads * dh).astype(dtype) if with_bias else None
    r = rng.integers(1, d_in, (batch, heads, n))
    r[:, :, 0] = 0  # masked
    r[:, :, -1] = d_in + 3  # exact
    r[0, :, 1] = 3  # the zero row, sampled
    r = shared.round_budgets(r, d_in, 0.25)
    sampled = (r > 0) & (r < d_in)
    assert sampled.sum() > 2 * batch * heads and np.unique(r[sampled]).size > 2  # mixed budgets
    return x, w, b, r


@pytest.fixture(params=["gemm", "kernel"])
def path(request, monkeypatch):
    """The CuPy path of the shared draws (``config.MCA_SHARED_CUPY``)."""
    monkeypatch.setattr(config, "MCA_SHARED_CUPY", request.param)
    return request.param


def _masked_is_bias(out, b, r, dh):
    """Masked tokens get exactly the bias (zeros without one)."""
    heads = r.shape[1]
    bias = np.zeros((heads, dh), out.dtype) if b is None else b.reshape(heads, dh)
    for bb, h, j in zip(*np.nonzero(r == 0)):
        assert np.array_equal(out[bb, h, j], bias[h])


# --- host shim: the CUDA C kernel through mcattn's own CuPy launcher ------------------------
@pytest.mark.hostshim
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dh,with_bias", [(8, True), (48, False), (48, True)])
def test_cupy_shared_projection_equals_cpu(cupy_or_fake, path, dtype, dh, with_bias):
    cp = cupy_or_fake
    x, w, b, r = _problem(1, 2, 10, 24, 3, dh, dtype, with_bias)
    ref = shared_cpu.value_projection(x, w, b, 3, r, 17)
    launches = len(getattr(cp, "LAUNCHES", ()))
    out = mca.value_projection(cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b),
                               num_heads=3, budgets=cp.asarray(r), seed=17, shared_draws=True,
                               backend="cupy")
    host = out.get()
    assert host.dtype == dtype and host.shape == (2, 3, 10, dh)
    assert rel_error(host, ref) < TOL[dtype]
    _masked_is_bias(host, b, r, dh)
    if not GPU_PRESENT:  # one launch for the whole projection, or none (cuBLAS)
        suffix = "f32" if dtype == np.float32 else "f64"
        new = cp.LAUNCHES[launches:]
        expected = [f"mcattn_mca_shared_apply_{suffix}"] if path == "kernel" else []
        assert [launch["kernel"] for launch in new] == expected


@pytest.mark.hostshim
def test_cupy_gemm_chunks_and_padding(cupy_or_fake, monkeypatch):
    """The GEMM path over several chunks of batch rows (a scratch of one batch row's
    operands) on heads with different numbers of distinct drawn rows (padded to the
    largest), against the CPU path draw for draw."""
    cp = cupy_or_fake
    monkeypatch.setattr(config, "MCA_SHARED_CUPY", "gemm")
    x, w, b, r = _problem(5, 3, 12, 32, 4, 8, np.float64)
    r[:, 0] = np.minimum(r[:, 0], 4)  # head 0: few draws, few distinct rows
    plan = shared_cpu.make_plan(r, 11, mca.weight_tables(w, 4))
    distinct = np.diff(plan.row_base)
    assert distinct.min() < distinct.max()  # padding really happens
    ref = shared_cpu.value_projection(x, w, b, 4, r, 11)
    monkeypatch.setattr(config, "CUDA_SCRATCH_BYTES", 2 * 12 * int(distinct.max()) * 8)  # one row a chunk
    out = mca.value_projection(cp.asarray(x), cp.asarray(w), cp.asarray(b), num_heads=4,
                               budgets=cp.asarray(r), seed=11, shared_draws=True, backend="cupy").get()
    assert rel_error(out, ref) < 1e-12
    _masked_is_bias(out, b, r, 8)
    monkeypatch.setattr(config, "MCA_SHARED_CUPY", "cublas")
    with pytest.raises(ConfigError):
        mca.value_projection(cp.asarray(x), cp.asarray(w), cp.asarray(b), num_heads=4,
                             budgets=cp.asarray(r), seed=11, shared_draws=True, backend="cupy")


@pytest.mark.hostshim
def test_cupy_grid_stride_and_given_tables(cupy_or_fake, monkeypatch):
    """Fewer blocks than elements (the kernel's grid-stride loop) and ``tables=`` given
    (device copies kept on the tables, the float32 ``wh`` cast once)."""
    cp = cupy_or_fake
    monkeypatch.setattr(config, "MCA_SHARED_CUPY", "kernel")
    monkeypatch.setattr(_gpu, "SHARED_MAX_BLOCKS", 3)
    x, w, b, r = _problem(2, 2, 9, 20, 2, 16, np.float32)
    tables = mca.weight_tables(w, 2)
    ref = shared_cpu.value_projection(x, w, b, 2, r, 4, tables)
    args = (cp.asarray(x), cp.asarray(w), cp.asarray(b))
    for _ in range(2):
        out = mca.value_projection(*args, num_heads=2, budgets=cp.asarray(r), seed=4, shared_draws=True,
                                   backend="cupy", tables=tables)
        assert rel_error(out.get(), ref) < 1e-5
    if not GPU_PRESENT:
        assert cp.LAUNCHES[-1]["grid"][0] == 3
    (dev,) = tables._device_copies.values()
    assert "wh_float32" in dev


@pytest.mark.hostshim
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_shared_attention_equals_host(cupy_or_fake, path, dtype):
    """The whole method: budgets rounded on the host as on the CPU (Nk >= the CPU's
    MCA_SHARED_GEMM_MIN_TOKENS, so both round), the same estimate."""
    cp = cupy_or_fake
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 2, 5, 8)).astype(dtype)
    x = rng.standard_normal((2, 20, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, 20, 8)).astype(dtype)
    w = rng.standard_normal((16, 2 * 8)).astype(dtype)
    b = rng.standard_normal(16).astype(dtype)
    kpm = np.ones((2, 20), bool)
    kpm[1, 17:] = False
    ref, ref_info = mca.attention(q, k, x, w, b, num_heads=2, alpha=0.6, key_padding_mask=kpm, seed=8,
                                  shared_draws=True, return_info=True)
    out, info = mca.attention(*(cp.asarray(a) for a in (q, k, x, w, b)), num_heads=2, alpha=0.6,
                              key_padding_mask=cp.asarray(kpm), seed=8, shared_draws=True,
                              backend="cupy", return_info=True)
    assert np.array_equal(np.asarray(info.budgets), np.asarray(ref_info.budgets))
    assert rel_error(out.get(), ref) < TOL[dtype]


@pytest.mark.hostshim
def test_cupy_shared_projection_of_no_tokens(cupy_or_fake, path):
    cp = cupy_or_fake
    x = cp.zeros((2, 0, 12))
    out = mca.value_projection(x, cp.ones((12, 8)), num_heads=2, budgets=cp.zeros((2, 2, 0), np.int64),
                               seed=0, shared_draws=True, backend="cupy")
    assert out.shape == (2, 2, 0, 4)


def _nothing_sampled(batch=1, n=4, d_in=12, heads=2, dh=8):
    """Only masked and exact tokens: the plan has no groups, rows or weights."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, n, d_in))
    w = rng.standard_normal((d_in, heads * dh))
    b = rng.standard_normal(heads * dh)
    r = np.where(np.arange(n) % 2 == 0, 0, d_in)[None, None].repeat(heads, 1).repeat(batch, 0)
    return x, w, b, r


@pytest.mark.hostshim
def test_cupy_nothing_sampled(cupy_or_fake, path):
    cp = cupy_or_fake
    x, w, b, r = _nothing_sampled()
    out = mca.value_projection(*(cp.asarray(a) for a in (x, w, b)), num_heads=2, budgets=cp.asarray(r),
                               seed=0, shared_draws=True, backend="cupy")
    assert rel_error(out.get(), shared_cpu.value_projection(x, w, b, 2, r, 0)) < 1e-12


# --- simulator: the numba.cuda kernel ----------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    # The simulator runs one Python thread per CUDA thread: small blocks, small grids.
    from mcattn.mca import cuda as mca_cuda

    monkeypatch.setattr(mca_cuda, "THREADS_PER_BLOCK", 32)


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,with_bias", [((2, 6, 16, 2, 8), True), ((1, 5, 20, 2, 48), False)])
def test_cuda_shared_projection_equals_cpu(small_blocks, dtype, shape, with_bias):
    batch, n, d_in, heads, dh = shape  # at most 2 x 2 x 6 x 8 = 192 or 1 x 2 x 5 x 48 = 480 threads
    x, w, b, r = _problem(5, batch, n, d_in, heads, dh, dtype, with_bias)
    ref = shared_cpu.value_projection(x, w, b, heads, r, 23)
    dx, dw, db, dr = to_device(x, w, b, r)
    out = host(mca.value_projection(dx, dw, db, num_heads=heads, budgets=dr, seed=23,
                                     shared_draws=True, backend="cuda"))
    assert out.dtype == dtype and out.shape == (batch, heads, n, dh)
    assert rel_error(out, ref) < TOL[dtype]
    _masked_is_bias(out, b, r, dh)


@pytest.mark.cudasim
def test_cuda_grid_stride(small_blocks, monkeypatch):
    monkeypatch.setattr(_gpu, "SHARED_MAX_BLOCKS", 2)  # 2 x 32 threads for 2 x 2 x 6 x 8 elements
    x, w, b, r = _problem(6, 2, 6, 16, 2, 8, np.float64)
    ref = shared_cpu.value_projection(x, w, b, 2, r, 3)
    dx, dw, db, dr = to_device(x, w, b, r)
    out = mca.value_projection(dx, dw, db, num_heads=2, budgets=dr, seed=3, shared_draws=True,
                               backend="cuda")
    assert rel_error(host(out), ref) < 1e-12


@pytest.mark.cudasim
def test_cuda_nothing_sampled(small_blocks):
    x, w, b, r = _nothing_sampled()
    dx, dw, db, dr = to_device(x, w, b, r)
    out = mca.value_projection(dx, dw, db, num_heads=2, budgets=dr, seed=0, shared_draws=True,
                               backend="cuda")
    assert rel_error(host(out), shared_cpu.value_projection(x, w, b, 2, r, 0)) < 1e-12


@pytest.mark.cudasim
def test_cuda_shared_attention_equals_host(small_blocks):
    if GPU_PRESENT:
        pytest.skip("attention on device arrays is covered by the host-shim lane's CuPy test")
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 3, 4))
    k = rng.standard_normal((1, 2, 16, 4))
    x = rng.standard_normal((1, 16, 12))
    w = rng.standard_normal((12, 2 * 4))
    ref = mca.attention(q, k, x, w, None, num_heads=2, alpha=0.5, seed=2, shared_draws=True)
    out = mca.attention(q, k, x, w, None, num_heads=2, alpha=0.5, seed=2, shared_draws=True,
                        backend="cuda")
    assert rel_error(out, ref) < 1e-12


# --- compile lane: what test_cuda_compile.py picks up ---------------------------------------
@pytest.mark.nvrtc
def test_shared_kernels_are_in_the_compile_lane():
    """The CUDA C source is registered with both entry points (NVRTC for sm_80/sm_90 and the
    ptxas resource check run over every registered source); the numba kernels are in
    ptx_signatures and are not exempt from the float32 check."""
    from mcattn._cupy import KERNEL_SOURCES
    from mcattn.mca import cuda as mca_cuda

    assert KERNEL_SOURCES["mca/kernels/mca_shared.cu"] == ("mcattn_mca_shared_apply_f32",
                                                          "mcattn_mca_shared_apply_f64")
    names = {name for name, _, _ in mca_cuda.ptx_signatures()}
    assert {"mca_shared_apply_float32", "mca_shared_apply_float64"} <= names
    assert "mca_shared_apply_float32" not in mca_cuda.FLOAT64_ACCUMULATION

"""mcattn's own CuPy launch code, run through the fake CuPy (no GPU) or real CuPy (GPU).

The fake checks what a real GPU would not forgive (argument count and C types, array
dtypes, contiguity, device, grid limits) and records every launch, so these tests see
the grids and arguments the package really passes.
"""

import dataclasses

import numpy as np
import pytest
from helpers import GPU_PRESENT, method_knobs, rel_error

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


# --- device in = device out ---------------------------------------------------------------
@needs_fake
def test_every_method_runs_on_the_inputs_device(cupy_or_fake):
    """Inputs on GPU 1 while GPU 0 is current: kernels launch on 1 (the fake refuses a
    launch whose arrays live on another device) and the results come back on 1, for every
    method of the registry (through the front door, and an empty batch too)."""
    from mcattn import rfa
    from mcattn.registry import method_names

    cp = cupy_or_fake
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 7, 4)) for _ in range(3))
    x, w = rng.standard_normal((1, 7, 10)), rng.standard_normal((10, 8))

    def on_gpu1(a):
        with cp.cuda.Device(1):
            return cp.asarray(a)

    dq, dk, dv, dx, dw = (on_gpu1(a) for a in (q, k, v, x, w))
    assert cp.cuda.runtime.getDevice() == 0
    feats = rfa.RandomFeatures(4, 8, num_heads=2, seed=0)
    results = {
        "probs": mcattn.attention_probs(dq, dk, backend="cupy"),
        "mca own": mca.attention(dq, dk, dx, dw, num_heads=2, alpha=0.5, seed=1, backend="cupy"),
        "rfa own": rfa.attention(dq, dk, dv, features=feats, backend="cupy"),
        "mca shared": mca.attention(dq, dk, dx, dw, num_heads=2, alpha=0.5, seed=1, backend="cupy",
                                    shared_draws=True),
    }
    for name in method_names():  # the front door, every registered method (helpers.method_knobs)
        host_knobs = method_knobs(name, 2, 7, 4)
        knobs = dict(host_knobs, **{n: on_gpu1(host_knobs[n]) for n in ("x", "w_v") if n in host_knobs})
        values = None if name == "mca" else dv
        results[name] = mcattn.attention(dq, dk, values, method=name, backend="cupy", **knobs)
        results[name + " empty"] = mcattn.attention(dq[:0], dk[:0], None if values is None else dv[:0],
                                                    method=name, backend="cupy", **knobs)
        assert results[name + " empty"].shape == (0, 2, 7, 4), name
        host = mcattn.attention(q, k, None if name == "mca" else v, method=name, **host_knobs)
        assert rel_error(results[name].get(), host) < 1e-12, name
    for name, out in results.items():
        assert out.device.id == 1, name
    assert {launch["device"] for launch in cp.LAUNCHES} == {1}
    assert cp.cuda.runtime.getDevice() == 0  # restored
    host_shared = mca.attention(q, k, x, w, num_heads=2, alpha=0.5, seed=1, shared_draws=True)
    assert rel_error(results["mca shared"].get(), host_shared) < 1e-13  # the CuPy reduced GEMMs


@needs_fake
def test_inputs_on_two_gpus_are_refused(cupy_or_fake):
    cp = cupy_or_fake
    q = cp.zeros((1, 3, 4))
    with cp.cuda.Device(1):
        k = cp.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="different GPUs"):
        mcattn.attention(q, k, q, backend="cupy")


def test_tensorflow_device_ids():
    from mcattn._device import tf_device_id

    assert tf_device_id("/job:localhost/replica:0/task:0/device:GPU:1") == 1
    assert tf_device_id("/job:localhost/replica:0/task:0/device:GPU:0") == 0
    assert tf_device_id("/job:localhost/replica:0/task:0/device:CPU:0") is None
    assert tf_device_id("") is None


@needs_fake
def test_numba_launches_use_cupys_current_stream(cupy_or_fake, monkeypatch):
    """numba.cuda kernels are queued on CuPy's current stream (cuda.external_stream)."""
    from numba import cuda

    from mcattn import _cupy, _dispatch

    cp = cupy_or_fake
    made = []
    monkeypatch.setattr(_dispatch, "cuda_simulator_enabled", lambda: False)
    monkeypatch.setattr(cuda, "external_stream", lambda ptr: made.append(ptr) or ("stream", ptr),
                        raising=False)
    assert _cupy.numba_stream() == 0  # CuPy's legacy default stream is numba's default
    with cp.cuda.ExternalStream(0xBEEF):
        assert _cupy.numba_stream() == ("stream", 0xBEEF)
    assert made == [0xBEEF]


@needs_fake
def test_mca_device_tables_are_cached_per_weight(cupy_or_fake, monkeypatch):
    """No host round trip of the weight per call; an in-place change is noticed."""
    from mcattn.mca import _gpu

    cp = cupy_or_fake
    _gpu.clear_table_cache()
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((1, 5, 12)), rng.standard_normal((12, 8))
    r = rng.integers(0, 12, (1, 2, 5))
    dx, dw, dr = cp.asarray(x), cp.asarray(w), cp.asarray(r)
    gets = []
    original = cp.ndarray.get
    monkeypatch.setattr(cp.ndarray, "get",
                        lambda self, stream=None: gets.append(self.shape) or original(self))
    kw = dict(num_heads=2, budgets=dr, seed=3, backend="cupy")
    first = mca.value_projection(dx, dw, **kw).get()
    second = mca.value_projection(dx, dw, **kw).get()
    assert np.array_equal(first, second)
    assert gets.count((12, 8)) == 1  # the weight crossed to the host once
    dw[0, 0] += 1.0  # in place: the tables must be rebuilt
    third = mca.value_projection(dx, dw, **kw).get()
    w2 = w.copy()
    w2[0, 0] += 1.0
    assert rel_error(third, mca.value_projection(x, w2, num_heads=2, budgets=r, seed=3)) < 1e-13
    tables = mca.weight_tables(w, 2)
    gets.clear()
    mca.value_projection(dx, dw, tables=mca.weight_tables(dw, 2), **kw)
    mca.value_projection(dx, cp.asarray(w), tables=tables, **kw)
    mca.value_projection(dx, cp.asarray(w), tables=tables, **kw)
    assert gets.count((12, 8)) == 1  # only weight_tables(dw) itself; tables= needs none
    assert len(tables._device_copies) == 1


def test_torch_inputs_are_kept_alive_for_cupys_stream(monkeypatch):
    """A torch CUDA input read on another stream than torch's is record_stream'ed on it."""
    import types

    from helpers import require

    from mcattn._array import _torch_keep_for_cupy_stream

    torch = require("torch")  # (before any fake cupy: torch's import looks for cupyx)
    cupy_stream = {"ptr": 0}
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(
        get_current_stream=lambda: types.SimpleNamespace(ptr=cupy_stream["ptr"])))
    fake_stream = lambda ptr: types.SimpleNamespace(cuda_stream=ptr)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr, device=None: fake_stream(ptr))
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: fake_stream(0))
    current = {"ptr": 0}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake_stream(current["ptr"]))
    recorded = []
    tensor = types.SimpleNamespace(device="cuda:1", record_stream=lambda s: recorded.append(s.cuda_stream))
    _torch_keep_for_cupy_stream(tensor, cp)  # both on the default stream: nothing to do
    assert recorded == []
    current["ptr"] = 0x70C4  # torch works on a side stream, CuPy on its default stream
    _torch_keep_for_cupy_stream(tensor, cp)
    cupy_stream["ptr"] = 0xC0DE
    _torch_keep_for_cupy_stream(tensor, cp)
    assert recorded == [0, 0xC0DE]


@needs_fake
def test_selftest_runs_every_method_through_the_cupy_launchers(cupy_or_fake):
    """mcattn selftest's cupy rows, with the fake: each CHECKS entry through its launcher."""
    from mcattn import selftest

    rows = selftest.run_selftest(["cupy"], list(selftest.checks()))
    assert rows and all(r.status == "pass" for r in rows), [r for r in rows if r.status != "pass"]
    launched = {x["kernel"] for x in cupy_or_fake.LAUNCHES}
    assert any(k.startswith("mcattn_mca_projection") for k in launched)
    assert any(k.startswith("mcattn_mca_shared_apply") for k in launched)  # "mca-shared-kernel"
    assert any(k.startswith("mcattn_rfa_") for k in launched)


@needs_fake
def test_selftest_bench_runs_the_gpu_path(cupy_or_fake, monkeypatch):
    """--bench's timing loop over every method with a bench entry (tiny N, fake GPU)."""
    from mcattn import selftest

    monkeypatch.setattr(selftest, "_torch_cuda", lambda: None)  # no torch GPU here
    monkeypatch.setattr(selftest, "backend_status", lambda name: __import__(
        "mcattn._dispatch", fromlist=["x"]).BackendStatus(name, "cuda", name == "cupy", "fake"))
    keep = ("exact", "mca", "mca-shared")  # the shim is slow
    table = {m: c for m, c in selftest.checks().items() if m in keep}
    table["mca-shared"] = dataclasses.replace(table["mca-shared"], bench_max_n=16)  # the largest size benched
    monkeypatch.setattr(selftest, "checks", lambda: table)
    rows, reason = selftest.run_bench(sizes=(16, 32), repeats=1, max_seconds=1e9)
    assert reason is None
    assert {(r["method"], r["n"]) for r in rows if r["ms"] is not None} == {
        ("exact", 16), ("exact", 32), ("mca", 16), ("mca", 32), ("mca-shared", 16)}, rows
    rows, _ = selftest.run_bench(sizes=(16, 32), repeats=1, max_seconds=0.0)  # sizes stop growing
    assert {(r["method"], r["n"]) for r in rows} == {("exact", 16), ("mca", 16), ("mca-shared", 16)}


@needs_fake
def test_raw_modules_are_compiled_with_the_headers_hash(cupy_or_fake):
    """The options CuPy receives carry the headers' hash (its cache key), per device."""
    from mcattn import _cupy

    module = raw_module("kernels/random.cu")
    assert module.options == _cupy.compile_options("kernels/random.cu")
    assert f"-DMCATTN_HEADERS_SHA256={_cupy.header_digest('kernels/random.cu')}" in module.options
    assert raw_module("kernels/random.cu") is module  # compiled once per device
    with cupy_or_fake.cuda.Device(1):
        assert raw_module("kernels/random.cu") is not module

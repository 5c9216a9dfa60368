"""Exact attention's GPU training kernels: forward with log-sum-exp, and the backward.

Three lanes, as for the forward kernels (docs/cuda-testing.md):

* ``cudasim``: the numba.cuda kernels (``backend="cuda"``) under the simulator (or a real
  GPU), against the NumPy backward in float64 and float32;
* ``hostshim``: the CUDA C kernels through mcattn's own CuPy launcher (``backend="cupy"``)
  on the fake CuPy, compiled by the host compiler under the shim (or real CuPy on a GPU);
* ``nvrtc``: the CUDA C kernels compiled by NVRTC for sm_80 and sm_90, the numba.cuda
  kernels by ``compile_ptx`` for 8.0 and 9.0, their ptxas resources, and float32 purity.

The reference is :mod:`mcattn.exact.naive` (NumPy) through :mod:`mcattn.exact.grad`, whose
backward is itself checked by ``torch.autograd.gradcheck`` in tests/test_training.py.
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn.exact import grad

TOL = {np.float64: 1e-12, np.float32: 2e-5}

#: (batch, Nq, Nk, d, dv): plain, Nq < Nk, Nq > Nk (causal then has rows seeing every key),
#: a single token, and more rows than one block (threads 8) with several key/query tiles.
SHAPES = [((2,), 11, 13, 4, 3), ((1, 2), 5, 19, 8, 8), ((1,), 17, 6, 3, 5), ((1,), 1, 1, 2, 2),
          ((1,), 20, 37, 4, 4)]


def _inputs(shape, dtype, seed):
    batch, nq, nk, d, dv = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(batch + (nq, d)).astype(dtype)
    k = rng.standard_normal(batch + (nk, d)).astype(dtype)
    v = rng.standard_normal(batch + (nk, dv)).astype(dtype)
    dout = rng.standard_normal(batch + (nq, dv)).astype(dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, **mask):
    """NumPy forward + backward in float64: ``(out, lse, {"q", "k", "v"})``."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    mask = {n: (m.astype(np.float64) if isinstance(m, np.ndarray) and m.dtype.kind == "f" else m)
            for n, m in mask.items()}
    out, res = grad.forward(q, k, v, backend="numpy", **mask)
    return out, res[0], grad.backward(q, k, v, out, res, dout, backend="numpy", **mask)


def _on_gpu(backend, cp, q, k, v, dout, **mask):
    """Forward (with lse) and backward on ``backend``; results as NumPy arrays."""
    if cp is not None:
        put = cp.asarray
    elif GPU_PRESENT:
        import cupy

        put = cupy.asarray
    else:
        put = lambda a: a  # noqa: E731 - the simulator takes host arrays
    args = {n: (put(m) if isinstance(m, np.ndarray) else m) for n, m in mask.items()}
    dq, dk, dv, ddout = (put(a) for a in (q, k, v, dout))
    out, res = grad.forward(dq, dk, dv, backend=backend, **args)
    grads = grad.backward(dq, dk, dv, out, res, ddout, backend=backend, **args)
    def host(a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    return host(out), host(res[0]), {n: host(g) for n, g in grads.items()}


def _err(got, ref):
    """``||got - ref|| / max(||ref||, 1)``: relative, but a gradient that is zero in exact
    arithmetic (one visible key: ``dq = 0``) is compared with the O(1) scale of the inputs."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1.0)


def _check(got, ref, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = ref
    assert out.dtype == dtype and lse.dtype == dtype
    assert rel_error(out, ref_out) < tol
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)  # -inf exactly where no key is visible
    assert rel_error(lse[finite], ref_lse[finite]) < tol
    for name in "qkv":
        assert grads[name].dtype == dtype, name
        assert np.all(np.isfinite(grads[name])), name
        assert _err(grads[name], ref_grads[name]) < tol, (name, _err(grads[name], ref_grads[name]))


def _mask_cases(shape, seed):
    """Mask keyword sets for inputs of ``shape``: boolean, additive, key padding, with causal."""
    batch, nq, nk = shape[0], shape[1], shape[2]
    rng = np.random.default_rng(seed)
    boolean = rng.random((nq, nk)) > 0.3
    boolean[0] = False  # a row with no visible key
    additive = rng.standard_normal((nq, nk))
    additive[:, 1] = -np.inf
    kpm = rng.random(batch[:1] + (nk,)) > 0.4
    kpm[0, 0] = True
    return [
        {"attn_mask": boolean},
        {"attn_mask": additive, "is_causal": True},
        {"key_padding_mask": kpm},
        {"key_padding_mask": kpm, "attn_mask": boolean, "is_causal": True},
    ]


def _fully_masked(dtype):
    """Batch row 1 has no visible key at all; row 0 of batch row 0 sees none either."""
    q, k, v, dout = _inputs(((2, 2), 6, 9, 4, 3), dtype, 5)
    kpm = np.ones((2, 9), bool)
    kpm[1] = False
    mask = np.ones((6, 9), bool)
    mask[0] = False
    return q, k, v, dout, {"key_padding_mask": kpm, "attn_mask": mask}


def _assert_fully_masked(got):
    out, lse, grads = got
    assert np.all(out[1] == 0) and np.all(out[0, :, 0] == 0)
    assert np.all(lse[1] == -np.inf) and np.all(lse[0, :, 0] == -np.inf)
    assert np.all(grads["q"][1] == 0) and np.all(grads["q"][0, :, 0] == 0)
    assert np.all(grads["k"][1] == 0) and np.all(grads["v"][1] == 0)
    for g in grads.values():
        assert not np.any(np.isnan(g))


# --- numba.cuda (simulator or GPU) --------------------------------------------------------
@pytest.fixture
def small_blocks(monkeypatch):
    # The simulator runs one Python thread per CUDA thread: keep blocks small.
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 8)


@pytest.mark.cudasim
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_numba_cuda_backward_matches_numpy(shape, is_causal, dtype):
    q, k, v, dout = _inputs(shape, dtype, sum(shape[1:]))
    got = _on_gpu("cuda", None, q, k, v, dout, is_causal=is_causal)
    _check(got, _reference(q, k, v, dout, is_causal=is_causal), dtype)


@pytest.mark.cudasim
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(4))
def test_numba_cuda_backward_masks(case, dtype):
    shape = ((2,), 10, 12, 4, 3)
    q, k, v, dout = _inputs(shape, dtype, 40 + case)
    mask = _mask_cases(shape, case)[case]
    mask = {n: (m.astype(dtype) if isinstance(m, np.ndarray) and m.dtype.kind == "f" else m)
            for n, m in mask.items()}
    _check(_on_gpu("cuda", None, q, k, v, dout, **mask), _reference(q, k, v, dout, **mask), dtype)


@pytest.mark.cudasim
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_cuda_rows_without_visible_keys(dtype):
    q, k, v, dout, mask = _fully_masked(dtype)
    got = _on_gpu("cuda", None, q, k, v, dout, **mask)
    _assert_fully_masked(got)
    _check(got, _reference(q, k, v, dout, **mask), dtype)


@pytest.mark.cudasim
@pytest.mark.usefixtures("small_blocks")
def test_numba_cuda_backward_splits_grid_y(monkeypatch):
    from mcattn.exact import cuda as exact_cuda

    monkeypatch.setattr(exact_cuda, "_MAX_GRID_Y", 2)  # 5 batch rows: launches of 2, 2, 1
    q, k, v, dout = _inputs(((5,), 6, 7, 3, 2), np.float64, 9)
    mask = {"key_padding_mask": np.random.default_rng(2).random((5, 7)) > 0.3, "is_causal": True}
    _check(_on_gpu("cuda", None, q, k, v, dout, **mask), _reference(q, k, v, dout, **mask), np.float64)


@pytest.mark.cudasim
@pytest.mark.usefixtures("small_blocks")
def test_numba_cuda_backward_on_real_attention():
    from mcattn.studies.data import load_sample

    s = load_sample()  # one head of layer 3, first 24 tokens (the simulator is slow)
    q, k, v = (a[3, :2, :1, :24] for a in (s.q, s.k, s.v))
    kpm = s.key_padding_mask[:2, :24].copy()
    kpm[1, 12:] = False  # padding inside the window
    dout = np.random.default_rng(3).standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(np.float32)
    mask = {"key_padding_mask": kpm, "scale": s.scale}
    _check(_on_gpu("cuda", None, q, k, v, dout, **mask), _reference(q, k, v, dout, **mask), np.float32)


@pytest.mark.cudasim
def test_numba_cuda_is_registered_with_the_forward_limit():
    by_name = {kern.backend: kern for kern in grad.BACKWARD_KERNELS}
    assert by_name["cuda"].module == "mcattn.exact.cuda" and by_name["cuda"].max_head_dim == 128
    assert {kern.backend: kern.module for kern in grad.FORWARD_KERNELS}["cuda"] == "mcattn.exact.cuda"
    q = np.zeros((1, 2, 129))
    with pytest.raises(mcattn.errors.BackendError, match="head dims up to 128"):
        grad.forward(q, q, q, backend="cuda")


# --- CUDA C through the CuPy launcher (fake CuPy + host shim, or a GPU) ------------------
@pytest.fixture
def cp(cupy_or_fake, monkeypatch):
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 8)
    yield cupy_or_fake


@pytest.mark.hostshim
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_c_backward_matches_numpy(cp, shape, is_causal, dtype):
    q, k, v, dout = _inputs(shape, dtype, sum(shape[1:]))
    got = _on_gpu("cupy", cp, q, k, v, dout, is_causal=is_causal)
    _check(got, _reference(q, k, v, dout, is_causal=is_causal), dtype)
    if not GPU_PRESENT:  # the kernels ran, not the CuPy array reference
        suffix = "f32" if dtype == np.float32 else "f64"
        launched = {x["kernel"] for x in cp.LAUNCHES}
        assert {f"mcattn_exact_forward_{suffix}", f"mcattn_exact_backward_dq_{suffix}",
                f"mcattn_exact_backward_dkdv_{suffix}"} <= launched


@pytest.mark.hostshim
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(4))
def test_cuda_c_backward_masks(cp, case, dtype):
    shape = ((2,), 10, 12, 4, 3)
    q, k, v, dout = _inputs(shape, dtype, 40 + case)
    mask = _mask_cases(shape, case)[case]
    mask = {n: (m.astype(dtype) if isinstance(m, np.ndarray) and m.dtype.kind == "f" else m)
            for n, m in mask.items()}
    _check(_on_gpu("cupy", cp, q, k, v, dout, **mask), _reference(q, k, v, dout, **mask), dtype)


@pytest.mark.hostshim
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_c_rows_without_visible_keys(cp, dtype):
    q, k, v, dout, mask = _fully_masked(dtype)
    got = _on_gpu("cupy", cp, q, k, v, dout, **mask)
    _assert_fully_masked(got)
    _check(got, _reference(q, k, v, dout, **mask), dtype)


@pytest.mark.hostshim
def test_cuda_c_backward_splits_grid_y(cp, monkeypatch):
    from mcattn.exact import cupy as exact_cupy

    monkeypatch.setattr(exact_cupy, "_MAX_GRID_Y", 2)  # 5 batch rows: launches of 2, 2, 1
    q, k, v, dout = _inputs(((5,), 6, 7, 3, 2), np.float64, 9)
    mask = {"key_padding_mask": np.random.default_rng(2).random((5, 7)) > 0.3, "is_causal": True}
    _check(_on_gpu("cupy", cp, q, k, v, dout, **mask), _reference(q, k, v, dout, **mask), np.float64)
    if not GPU_PRESENT:
        for name in ("dq", "dkdv"):
            grids = [x["grid"] for x in cp.LAUNCHES if x["kernel"] == f"mcattn_exact_backward_{name}_f64"]
            assert [g[1] for g in grids] == [2, 2, 1], (name, grids)


@pytest.mark.hostshim
def test_cuda_c_backward_on_real_attention(cp, monkeypatch):
    from mcattn.studies.data import load_sample

    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 32)
    s = load_sample()  # two sequences of layer 3, every head (106 and 122 tokens)
    q, k, v = (a[3, :2] for a in (s.q, s.k, s.v))
    kpm = s.key_padding_mask[:2]
    dout = np.random.default_rng(3).standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(np.float32)
    mask = {"key_padding_mask": kpm, "scale": s.scale, "is_causal": True}
    _check(_on_gpu("cupy", cp, q, k, v, dout, **mask), _reference(q, k, v, dout, **mask), np.float32)


@pytest.mark.hostshim
def test_cuda_c_wide_heads_fall_back_to_the_array_reference(cp):
    """Head dims above 128: no kernel launch, the CuPy array code, same numbers."""
    q, k, v, dout = _inputs(((1,), 3, 4, 130, 2), np.float64, 11)
    got = _on_gpu("cupy", cp, q, k, v, dout, is_causal=True)
    _check(got, _reference(q, k, v, dout, is_causal=True), np.float64)
    if not GPU_PRESENT:
        assert not [x for x in cp.LAUNCHES if x["kernel"].startswith("mcattn_exact")]


@pytest.mark.hostshim
def test_backend_none_picks_the_kernels_for_device_arrays(cp):
    by_name = {kern.backend: kern.module for kern in grad.BACKWARD_KERNELS}
    assert by_name["cupy"] == "mcattn.exact.cupy"
    q, k, v, dout = _inputs(((1,), 4, 5, 3, 3), np.float32, 12)
    out, res = grad.forward(*(cp.asarray(a) for a in (q, k, v)))
    grads = grad.backward(*(cp.asarray(a) for a in (q, k, v)), out, res, cp.asarray(dout))
    assert isinstance(grads["q"], cp.ndarray)
    if not GPU_PRESENT:
        assert "mcattn_exact_backward_dkdv_f32" in {x["kernel"] for x in cp.LAUNCHES}


# --- compiled for sm_80 / sm_90 -----------------------------------------------------------
_BACKWARD_C = ("mcattn_exact_backward_dq_f32", "mcattn_exact_backward_dq_f64",
               "mcattn_exact_backward_dkdv_f32", "mcattn_exact_backward_dkdv_f64")


@pytest.mark.nvrtc
def test_backward_kernels_are_registered_for_compilation():
    """The generic compile, resource and float32 tests (test_cuda_compile.py) cover them."""
    from cuda_compile import NUMBA_CUDA_MODULES

    from mcattn._cupy import KERNEL_SOURCES
    from mcattn.exact import cuda as exact_cuda

    assert set(_BACKWARD_C) <= set(KERNEL_SOURCES["exact/kernels/exact.cu"])
    assert "mcattn.exact.cuda" in NUMBA_CUDA_MODULES
    names = {name for name, _, _ in exact_cuda.ptx_signatures()}
    assert {f"exact_backward_{part}_{t}" for part in ("dq", "dkdv") for t in ("float32", "float64")} <= names


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_c_backward_compiles_and_fits(arch):
    from cuda_compile import nvrtc_compile, ptxas_resources, resource_problems

    ptx = nvrtc_compile("exact/kernels/exact.cu", arch)
    for name in _BACKWARD_C:
        assert f".entry {name}(" in ptx or f".entry {name} (" in ptx, name
    if arch == "sm_90":
        resources, tool = ptxas_resources(ptx, arch)
        problems = [p for name in _BACKWARD_C for p in resource_problems(name, resources[name], 256)]
        assert not problems, (tool, problems)


@pytest.mark.nvrtc
def test_numba_cuda_backward_compiles_fits_and_stays_float32(tmp_path):
    import re

    from cuda_compile import numba_ptx_results, ptxas_resources, resource_problems

    results = [r for r in numba_ptx_results(modules=("mcattn.exact.cuda",), ptx_dir=tmp_path)
               if "backward" in r.get("kernel", "")]
    assert not [r for r in results if "error" in r], results
    assert {(r["kernel"], tuple(r["cc"])) for r in results} == {
        (f"exact_backward_{part}_{t}", cc) for part in ("dq", "dkdv") for t in ("float32", "float64")
        for cc in ((8, 0), (9, 0))}
    for r in results:
        with open(r["ptx_path"]) as fh:
            ptx = fh.read()
        if "float32" in r["kernel"]:
            assert not re.search(r"^\s*cvt(\.\w+)*\.f64\.f32\b", ptx, re.M), r["kernel"]
        if tuple(r["cc"]) == (9, 0):
            (res,) = ptxas_resources(ptx, "sm_90")[0].values()
            assert not resource_problems(r["kernel"], res, 256), (r["kernel"], res)

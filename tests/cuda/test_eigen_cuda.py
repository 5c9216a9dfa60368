"""eigen's GPU kernels: numba.cuda (simulator) against the CPU kernel, and the CUDA C
RawKernel through ``mcattn.eigen.cupy``'s own launch (``backend="cupy"``; without a GPU on
the fake CuPy of ``fake_cupy.py``, the kernel on the host shim) against the float64 NumPy
reference."""

import numpy as np
import pytest
from fake_cupy import cupy_context
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import eigen
from mcattn.eigen.plan import make_plan
from mcattn.errors import BackendError


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 8)


def _case(dtype, seed=0, shape=(2, 3, 13, 5), dv=4):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    v = rng.standard_normal(shape[:-1] + (dv,)).astype(dtype)
    bases = eigen.fit_heads(q.astype(np.float64), k.astype(np.float64), rank=4, center="position")
    return rng, q, k, v, bases


def _masks(rng, dtype, b, n):
    kpm = rng.random((b, n)) > 0.3
    kpm[-1] = False  # a fully masked sequence: zero rows
    return [{}, {"is_causal": True}, {"key_padding_mask": kpm},
            {"attn_mask": rng.standard_normal((n, n)).astype(dtype), "is_causal": True}]


def _gpu(backend, q, k, v, plan, **mask):
    """``eigen.attention`` on a GPU backend with the column plan ``plan``, as NumPy."""
    if backend == "cuda" and not GPU_PRESENT:  # the simulator takes host arrays
        return eigen.attention(q, k, v, basis=None, columns=plan, backend="cuda", **mask)
    with cupy_context() as cp:
        args = {n: cp.asarray(a) if isinstance(a, np.ndarray) else a for n, a in mask.items()}
        out = eigen.attention(*(cp.asarray(x) for x in (q, k, v)), basis=None, columns=plan,
                              backend=backend, **args)
        assert isinstance(out, cp.ndarray) and out.dtype == q.dtype
        return out.get()


def _reference(q, k, v, bases, plan, **mask):
    """The float64 NumPy backend on the same values."""
    return eigen.attention(*(a.astype(np.float64) for a in (q, k, v)), basis=bases, columns=plan,
                           backend="numpy", **mask)


@pytest.mark.cudasim
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("per_query", [0, 4])
def test_numba_cuda_matches_the_cpu_kernel(dtype, tol, per_query):
    rng, q, k, v, bases = _case(dtype)
    plan = make_plan(bases, [np.array([0, 4, 7, 9, 12])] * 3, per_query=per_query)
    for mask in _masks(rng, dtype, 2, 13):
        cpu = eigen.attention(q, k, v, basis=bases, columns=plan, backend="numba", **mask)
        assert rel_error(_gpu("cuda", q, k, v, plan, **mask), cpu) < tol, mask


@pytest.mark.hostshim
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("estimator,per_query", [("conditional", 5), ("deim", 0), ("deim", 3)])
def test_cuda_c_kernel_matches_the_reference(dtype, tol, estimator, per_query):
    rng, q, k, v, bases = _case(dtype, seed=1, shape=(2, 3, 21, 6))
    plan = make_plan(bases, [np.array([0, 2, 5, 8, 13, 20])] * 3, per_query=per_query,
                     estimator=estimator)
    for mask in _masks(rng, dtype, 2, 21):
        ref = _reference(q, k, v, bases, plan, **mask)
        assert rel_error(_gpu("cupy", q, k, v, plan, **mask), ref) < tol, mask


@pytest.mark.hostshim
def test_cuda_c_kernel_on_real_attention():
    """One real layer of the embedded sample (12 heads, padded batch), per-head bases."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (x[1, :2].astype(np.float32) for x in (s.q, s.k, s.q))
    kpm = s.key_padding_mask[:2]
    bases = eigen.fit_heads(q.astype(np.float64)[1:], k.astype(np.float64)[1:], rank=12, center=True)
    plan = make_plan(bases, 32)
    ref = _reference(q, k, v, bases, plan, key_padding_mask=kpm)
    assert rel_error(_gpu("cupy", q, k, v, plan, key_padding_mask=kpm), ref) < 2e-5


@pytest.mark.cudasim
def test_limits():
    rng, q, k, v, bases = _case(np.float64)
    big = np.zeros((1, 1, 300, 4))
    b = eigen.fit(rng.standard_normal((5, 300)), rank=2)
    with pytest.raises(BackendError, match="n up to 256"):
        eigen.attention(big, big, big, basis=b, columns=4, backend="cuda")


# --- the GEMM path (calls beyond the RawKernel's limits) ---------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float32, 3e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("estimator,per_query,fixed", [
    ("conditional", 9, 6),   # a_S G (m < d)
    ("deim", 0, 6),
    ("conditional", 20, 12),  # reconstructed keys Kt = G^T K[S] (d < m)
])
def test_gemm_path_matches_the_reference(dtype, tol, estimator, per_query, fixed):
    """forward_gemm on NumPy arrays, with row chunks smaller than the call (every mask)."""
    from mcattn._door import qkv_inputs
    from mcattn.eigen.cupy import forward_gemm

    rng, q, k, v, bases = _case(dtype, seed=4, shape=(2, 3, 37, 8), dv=5)
    cols = [np.sort(rng.choice(37, fixed, replace=False)) for _ in range(3)]
    plan = make_plan(bases, cols, per_query=per_query, estimator=estimator)
    for mask in _masks(rng, dtype, 2, 37):
        ref = _reference(q, k, v, bases, plan, **mask)
        arrays = {"q": q, "k": k, "v": v, **{n: mask.get(n) for n in ("attn_mask", "key_padding_mask")}}
        inp = qkv_inputs(arrays, is_causal=mask.get("is_causal", False), scale=None, check_finite=True)
        out = forward_gemm(inp, plan, chunk_elements=37 * 10).reshape(ref.shape)
        assert rel_error(out, ref) < tol, mask


def test_gemm_path_takes_ties_in_key_order():
    """Equal reconstructed scores: the extra columns are the lower key indices (the reference)."""
    from mcattn.eigen.cupy import _exact_extras

    rng = np.random.default_rng(5)
    s = np.array([[1.0, 3.0, 2.0, 2.0, 2.0, -np.inf, 2.0],
                  [0.0, -np.inf, -np.inf, -np.inf, 5.0, -np.inf, -np.inf]])
    qs, kb = rng.standard_normal((2, 3)), rng.standard_normal((7, 3))
    out = s.copy()
    _exact_extras(np, out, qs, kb, np.array([1]), 3, None, 0, 2)
    exact = qs @ kb.T
    # row 0: column 1 is fixed; candidates 2.0 at 2, 3, 4, 6: the first three win
    close = dict(rtol=1e-12, atol=0)  # einsum and @ may round the dots differently
    np.testing.assert_allclose(out[0], [1.0, 3.0, exact[0, 2], exact[0, 3], exact[0, 4], -np.inf, 2.0],
                               **close)
    # row 1: only two visible candidates (0 and 4): both exact, the masked stay -inf
    np.testing.assert_allclose(out[1], [exact[1, 0], -np.inf, -np.inf, -np.inf, exact[1, 4], -np.inf,
                                        -np.inf], **close)


@pytest.mark.hostshim
def test_cupy_backend_beyond_the_kernel_limits():
    """backend="cupy" at n = 300 > 256 and d = 96 > 64 runs the GEMM path (fake CuPy)."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 300, 96)).astype(np.float32) for _ in range(3))
    bases = eigen.fit_heads(q.astype(np.float64), k.astype(np.float64), rank=8, center=True)
    plan = make_plan(bases, 80)
    ref = _reference(q, k, v, bases, plan)
    assert rel_error(_gpu("cupy", q, k, v, plan), ref) < 3e-5

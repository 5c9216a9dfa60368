"""eigen's GPU kernels against the CPU kernel: numba.cuda (simulator), CUDA C (host shim)."""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import eigen
from mcattn._validate import prepare_attention
from mcattn.eigen.plan import make_plan
from mcattn.errors import BackendError

if not GPU_PRESENT:
    import host_kernels


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
    if GPU_PRESENT:
        import cupy

        args = {n: cupy.asarray(a) if isinstance(a, np.ndarray) else a for n, a in mask.items()}
        return eigen.attention(*(cupy.asarray(x) for x in (q, k, v)), basis=None, columns=plan,
                               backend=backend, **args).get()
    if backend == "cuda":
        return eigen.attention(q, k, v, basis=None, columns=plan, backend="cuda", **mask)
    inp = prepare_attention(q, k, v, **mask)
    return host_kernels.eigen_forward(inp, plan).reshape(inp.out_shape)


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
def test_cuda_c_kernel_matches_the_cpu_kernel(dtype, tol, estimator, per_query):
    rng, q, k, v, bases = _case(dtype, seed=1, shape=(2, 3, 21, 6))
    plan = make_plan(bases, [np.array([0, 2, 5, 8, 13, 20])] * 3, per_query=per_query,
                     estimator=estimator)
    for mask in _masks(rng, dtype, 2, 21):
        cpu = eigen.attention(q, k, v, basis=bases, columns=plan, backend="numba", **mask)
        assert rel_error(_gpu("cupy", q, k, v, plan, **mask), cpu) < tol, mask


@pytest.mark.hostshim
def test_cuda_c_kernel_on_real_attention():
    """One real layer of the embedded sample (12 heads, padded batch), per-head bases."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (x[1, :2].astype(np.float32) for x in (s.q, s.k, s.q))
    kpm = s.key_padding_mask[:2]
    bases = eigen.fit_heads(q.astype(np.float64)[1:], k.astype(np.float64)[1:], rank=12, center=True)
    plan = make_plan(bases, 32)
    cpu = eigen.attention(q, k, v, basis=bases, columns=plan, key_padding_mask=kpm, backend="numba")
    assert rel_error(_gpu("cupy", q, k, v, plan, key_padding_mask=kpm), cpu) < 2e-5


@pytest.mark.cudasim
def test_limits():
    rng, q, k, v, bases = _case(np.float64)
    big = np.zeros((1, 1, 300, 4))
    b = eigen.fit(rng.standard_normal((5, 300)), rank=2)
    with pytest.raises(BackendError, match="n up to 256"):
        eigen.attention(big, big, big, basis=b, columns=4, backend="cuda")

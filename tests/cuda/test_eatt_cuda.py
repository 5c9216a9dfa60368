"""E-Att's GPU kernels: numba.cuda (simulator) against the CPU kernel, and the CUDA C
RawKernel through ``mcattn.eatt.cupy``'s own launch (``backend="cupy"``; without a GPU on
the fake CuPy of ``fake_cupy.py``, the kernel on the host shim) against the float64 NumPy
reference."""

import numpy as np
import pytest
from fake_cupy import cupy_context
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import eatt

CASES = {
    "plain": ((2, 2), 19, 23, 16, 8),
    "one-token": ((1,), 1, 1, 4, 3),
    "odd": ((3,), 13, 37, 5, 3),
    "two-words": ((1,), 9, 40, 100, 6),
}
TOL = {np.float32: 2e-6, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # The simulator runs one Python thread per CUDA thread: keep blocks small.
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 8)


def _inputs(case, dtype, seed=0):
    batch, nq, nk, d, dv = CASES[case]
    rng = np.random.default_rng(seed + nq * nk)
    q = rng.standard_normal(batch + (nq, d)).astype(dtype)
    k = rng.standard_normal(batch + (nk, d)).astype(dtype)
    v = rng.standard_normal(batch + (nk, dv)).astype(dtype)
    return q, k, v


def _masks(case, rng):
    batch, nq, nk = CASES[case][:3]
    kpm = rng.random((batch[0], nk)) > 0.3
    kpm[-1, :] = False if batch[0] > 1 else kpm[-1, :]  # a fully masked batch row
    return {"key_padding_mask": kpm}, {"attn_mask": rng.standard_normal((nq, nk))}


def _cuda(q, k, v, **kwargs):
    if GPU_PRESENT:
        import cupy

        args = {n: (cupy.asarray(a) if isinstance(a, np.ndarray) else a) for n, a in kwargs.items()}
        return eatt.attention(*(cupy.asarray(a) for a in (q, k, v)), backend="cuda", **args).get()
    return eatt.attention(q, k, v, backend="cuda", **kwargs)


def _cupy(q, k, v, alignment, threads=8, **mask):
    """``eatt.attention(backend="cupy")`` on device copies, as NumPy (the result must be a
    CuPy array of the input dtype)."""
    with cupy_context() as cp:
        mcattn.config.CUDA_THREADS_PER_BLOCK = threads  # restored by the small_blocks fixture
        args = {n: (cp.asarray(a) if isinstance(a, np.ndarray) else a) for n, a in mask.items()}
        out = eatt.attention(*(cp.asarray(a) for a in (q, k, v)), alignment=alignment, backend="cupy",
                             **args)
        assert isinstance(out, cp.ndarray) and out.dtype == q.dtype
        return out.get()


def _reference(q, k, v, alignment, **mask):
    """The float64 NumPy backend on the same values."""
    return eatt.attention(*(a.astype(np.float64) for a in (q, k, v)), alignment=alignment,
                          backend="numpy", **mask)


@pytest.mark.cudasim
@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
@pytest.mark.parametrize("case", ["plain", "one-token", "odd", "two-words"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("is_causal", [False, True])
def test_numba_cuda_matches_cpu_kernel(alignment, case, dtype, is_causal):
    q, k, v = _inputs(case, dtype)
    cpu = eatt.attention(q, k, v, alignment=alignment, is_causal=is_causal, backend="numba")
    out = _cuda(q, k, v, alignment=alignment, is_causal=is_causal)
    assert out.dtype == dtype and rel_error(out, cpu) < TOL[dtype]


@pytest.mark.cudasim
@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
def test_numba_cuda_masks(alignment):
    q, k, v = _inputs("plain", np.float64, seed=3)
    for mask in _masks("plain", np.random.default_rng(4)):
        cpu = eatt.attention(q, k, v, alignment=alignment, backend="numba", is_causal=True, **mask)
        out = _cuda(q, k, v, alignment=alignment, is_causal=True, **mask)
        assert rel_error(out, cpu) < 1e-12


@pytest.mark.hostshim
@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("is_causal", [False, True])
def test_cuda_c_matches_the_reference(alignment, case, dtype, is_causal):
    q, k, v = _inputs(case, dtype)
    out = _cupy(q, k, v, alignment, is_causal=is_causal)
    assert rel_error(out, _reference(q, k, v, alignment, is_causal=is_causal)) < TOL[dtype]


@pytest.mark.hostshim
@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
def test_cuda_c_masks_and_block_sizes(alignment):
    q, k, v = _inputs("plain", np.float64, seed=5)
    for mask in _masks("plain", np.random.default_rng(6)):
        ref = _reference(q, k, v, alignment, is_causal=True, **mask)
        for threads in (8, 32):
            out = _cupy(q, k, v, alignment, threads=threads, is_causal=True, **mask)
            assert rel_error(out, ref) < 1e-12


@pytest.mark.nvrtc
def test_cuda_c_uses_the_popcount_instruction():
    from cuda_compile import nvrtc_compile

    # (test_cuda_compile compiles every source for sm_80 and sm_90; one is enough here)
    assert "popc.b64" in nvrtc_compile("eatt/kernels/eatt.cu", "sm_80")  # __popcll on the device

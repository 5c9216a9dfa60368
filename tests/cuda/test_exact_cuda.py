"""Exact attention's numba.cuda kernel (simulator on the CPU, or a real GPU)."""

import numpy as np
import pytest
from helpers import GPU_PRESENT, dense_attention, rel_error

import mcattn
from mcattn.errors import BackendError

pytestmark = pytest.mark.cudasim


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # The simulator runs one Python thread per CUDA thread: keep blocks small.
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 8)


def _cuda(q, k, v, **kwargs):
    if GPU_PRESENT:
        import cupy

        args = {n: (cupy.asarray(a) if isinstance(a, np.ndarray) else a) for n, a in kwargs.items()}
        return mcattn.attention(*(cupy.asarray(a) for a in (q, k, v)), backend="cuda", **args).get()
    return mcattn.attention(q, k, v, backend="cuda", **kwargs)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [((2,), 11, 13, 4, 3), ((1,), 1, 1, 2, 2), ((1,), 5, 40, 8, 8)])
def test_matches_reference(dtype, tol, is_causal, shape):
    batch, nq, nk, d, dv = shape
    rng = np.random.default_rng(nq * nk)
    q = rng.standard_normal(batch + (nq, d)).astype(dtype)
    k = rng.standard_normal(batch + (nk, d)).astype(dtype)
    v = rng.standard_normal(batch + (nk, dv)).astype(dtype)
    out = _cuda(q, k, v, is_causal=is_causal)
    assert rel_error(out, dense_attention(q, k, v, is_causal=is_causal)) < tol


def test_masks_and_fully_masked_rows():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 2, 9, 4)) for _ in range(3))
    kpm = rng.random((2, 9)) > 0.4
    kpm[1] = False
    out = _cuda(q, k, v, key_padding_mask=kpm)
    assert np.all(out[1] == 0)
    assert rel_error(out, dense_attention(q, k, v, mask=kpm[:, None, None, :])) < 1e-12
    additive = rng.standard_normal((9, 9))
    out = _cuda(q, k, v, attn_mask=additive, is_causal=True)
    assert rel_error(out, dense_attention(q, k, v, mask=additive, is_causal=True)) < 1e-12


def test_limits_and_status():
    q = np.zeros((1, 2, 129))
    with pytest.raises(BackendError, match="head dims up to 128"):
        mcattn.attention(q, q, q, backend="cuda")
    status = {s.name: s for s in mcattn.backends()}["cuda"]
    assert status.available
    if not GPU_PRESENT:
        assert "simulator" in status.reason

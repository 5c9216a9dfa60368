"""RFA's GPU kernels against the NumPy reference.

numba.cuda kernels run in the simulator without a GPU (tiny grids, marker ``cudasim``);
the CUDA C RawKernels of ``kernels/rfa.cu`` run through ``mcattn.rfa.cupy``'s own launches
with the fake CuPy of ``fake_cupy.py`` (kernels on the host under the shim, marker
``hostshim``). With a GPU both run on it.
"""

import numpy as np
import pytest
from fake_cupy import cupy_context
from helpers import host, rel_error, to_device

from mcattn import config, rfa


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 32)  # the simulator runs a thread per thread


@pytest.mark.cudasim
@pytest.mark.parametrize("kind", rfa.KINDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_matches_numpy(kind, dtype):
    rng = np.random.default_rng(1)
    b, h, n, d, dv = 1, 2, 11, 4, 3
    q, k = (rng.standard_normal((b, h, n, d)).astype(dtype) * 0.7 for _ in range(2))
    v = rng.standard_normal((b, h, n, dv)).astype(dtype)
    kpm = rng.random((b, n)) > 0.3
    gate = rng.uniform(0.5, 0.99, (b, h, n)).astype(dtype)
    feats = rfa.RandomFeatures(d, 3, kind=kind, num_heads=h, seed=1)
    tol = 1e-13 if dtype == np.float64 else 3e-6
    for is_causal, g in ((False, None), (True, None), (True, gate)):
        kw = dict(features=feats, is_causal=is_causal, key_padding_mask=kpm, chunk_size=4,
                  return_info=True)
        ref, ref_info = rfa.attention(q, k, v, gate=g, backend="numpy", **kw)
        dq, dk, dv_, dg, dm = to_device(q, k, v, g, kpm)
        kw["key_padding_mask"] = dm
        out, info = rfa.attention(dq, dk, dv_, gate=dg, backend="cuda", **kw)
        assert host(out).dtype == dtype and info.backend == "cuda"
        assert rel_error(host(out), ref) < tol, (is_causal, g is not None)
        assert info.clamped == ref_info.clamped


@pytest.mark.cudasim
def test_cuda_unit_form_cross_lengths_and_masked_rows():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 5, 4))
    k = rng.standard_normal((2, 7, 4))
    v = rng.standard_normal((2, 7, 2))
    kpm = np.ones((2, 7), dtype=bool)
    kpm[1] = False  # a fully padded sequence: zeros, not NaN
    feats = rfa.RandomFeatures(4, 4, kind="sincos", sigma=0.8, seed=3)
    for is_causal in (False, True):
        kw = dict(features=feats, normalize="unit", key_padding_mask=kpm, is_causal=is_causal, chunk_size=2)
        ref = rfa.attention(q, k, v, backend="numpy", **kw)
        dq, dk, dv_, dm = to_device(q, k, v, kpm)
        kw["key_padding_mask"] = dm
        out = host(rfa.attention(dq, dk, dv_, backend="cuda", **kw))
        assert np.all(out[1] == 0) and np.all(np.isfinite(out))
        assert rel_error(out, ref) < 1e-13


# --- the CUDA C RawKernels (kernels/rfa.cu): on the host under the shim, or on the GPU ------------
def _rawkernel_attention(q, k, v, threads=16, **kw):
    """``rfa.attention(backend="cupy")``: mcattn.rfa.cupy's own launches, on the GPU or (no GPU)
    through the fake CuPy, whose kernels run on the host shim."""
    with cupy_context() as cp:
        config.CUDA_THREADS_PER_BLOCK = threads
        dq, dk, dv_ = (cp.asarray(a) for a in (q, k, v))
        for name in ("gate", "key_padding_mask"):
            if kw.get(name) is not None:
                kw[name] = cp.asarray(kw[name])
        out, info = rfa.attention(dq, dk, dv_, backend="cupy", return_info=True, **kw)
        return host(out), info.clamped


@pytest.mark.hostshim
@pytest.mark.parametrize("kind", rfa.KINDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rawkernels_match_numpy(kind, dtype):
    rng = np.random.default_rng(4)
    b, h, n, d, dv = 2, 2, 13, 5, 3
    q, k = (rng.standard_normal((b, h, n, d)).astype(dtype) * 0.7 for _ in range(2))
    v = rng.standard_normal((b, h, n, dv)).astype(dtype)
    kpm = rng.random((b, n)) > 0.3
    kpm[1, :4] = False
    gate = rng.uniform(0.5, 0.99, (b, h, n)).astype(dtype)
    feats = rfa.RandomFeatures(d, 4, kind=kind, num_heads=h, seed=2)
    tol = 1e-13 if dtype == np.float64 else 3e-6
    for is_causal, g in ((False, None), (True, None), (True, gate)):
        for normalize in (None, "unit"):
            kw = dict(features=feats, is_causal=is_causal, gate=g, key_padding_mask=kpm, chunk_size=5,
                      normalize=normalize)
            ref, ref_info = rfa.attention(q, k, v, backend="numpy", return_info=True, **kw)
            out, clamped = _rawkernel_attention(q, k, v, **kw)
            assert out.dtype == dtype
            assert rel_error(out, ref) < tol, (is_causal, g is not None, normalize)
            assert clamped == ref_info.clamped


@pytest.mark.hostshim
def test_rawkernels_on_real_attention():
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (a[2, 1:2, :2] for a in (s.q, s.k, s.v))  # layer 2, a 122-token sentence, two heads
    kpm = s.key_padding_mask[1:2]
    feats = rfa.RandomFeatures(q.shape[-1], 16, kind="positive", num_heads=2, seed=1)
    for is_causal in (False, True):
        kw = dict(features=feats, key_padding_mask=kpm, scale=s.scale, is_causal=is_causal)
        ref = rfa.attention(q, k, v, backend="numba", **kw)
        out, _ = _rawkernel_attention(q, k, v, threads=32, **kw)
        assert rel_error(out, ref) < 2e-5


@pytest.mark.hostshim
@pytest.mark.parametrize("kind", rfa.KINDS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_decoder_step_on_the_gpu_matches_the_host_decoder(kind, dtype, tol):
    """RFADecoder.step on CuPy arrays (rfa_step.cu, every batch row in one launch) against the
    host decoder token by token: plain and gated, after a prompt absorbed by extend(), with
    more features than the block's threads (m = 300) and a value dim above the features. (A row
    near the floor caught a race here: thread 0 wrote the mass back while others still read it.)"""
    rng = np.random.default_rng(12)
    for (b, h, n, d, dv, m) in ((2, 3, 9, 5, 4, 7), (1, 2, 5, 6, 40, 300)):
        q, k = (rng.standard_normal((b, h, n, d)).astype(dtype) * 0.7 for _ in range(2))
        v = rng.standard_normal((b, h, n, dv)).astype(dtype)
        gate = rng.uniform(0.5, 0.99, (b, h, n)).astype(dtype)
        feats = rfa.RandomFeatures(d, m, kind=kind, num_heads=h, seed=4)
        for g in (None, gate):
            host_dec, dev_dec = feats.decoder(), feats.decoder()
            prompt = 2
            gp = None if g is None else g[:, :, :prompt]
            host_dec.extend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], gp)
            with cupy_context() as cp:
                dev_dec.extend(*(cp.asarray(x[:, :, :prompt]) for x in (q, k, v)),
                               None if gp is None else cp.asarray(gp))
                for t in range(prompt, n):
                    gt = None if g is None else g[:, :, t]
                    want = host_dec.step(q[:, :, t], k[:, :, t], v[:, :, t], gt)
                    got = dev_dec.step(*(cp.asarray(x[:, :, t]) for x in (q, k, v)),
                                       None if gt is None else cp.asarray(gt))
                    assert isinstance(got, cp.ndarray) and got.dtype == dtype
                    assert rel_error(got.get(), want) < tol, (kind, g is None, t)
                assert dev_dec.clamped == host_dec.clamped and dev_dec.position == n
                np.testing.assert_allclose(dev_dec.state.S.get(), host_dec.state.S, rtol=tol * 10,
                                           atol=tol * np.abs(host_dec.state.S).max())


@pytest.mark.cudasim
def test_causal_in_one_chunk():
    """N <= chunk_size (the default 64): one chunk, whose earlier state is zero. Both GPU
    backends once added the chunk's own sum as that state (errors of order 1)."""
    rng = np.random.default_rng(6)
    q, k = (rng.standard_normal((1, 2, 13, 8)) * 0.5 for _ in range(2))
    v = rng.standard_normal((1, 2, 13, 3))
    gate = rng.uniform(0.5, 0.99, (1, 2, 13))
    feats = rfa.RandomFeatures(8, 16, num_heads=2, seed=1)
    for g in (None, gate):
        kw = dict(features=feats, is_causal=True, gate=g)
        ref = rfa.attention(q, k, v, backend="numpy", **kw)
        out, _ = _rawkernel_attention(q, k, v, **kw)
        assert rel_error(out, ref) < 1e-13
        dq, dk, dv_, dg = to_device(q, k, v, g)
        out = host(rfa.attention(dq, dk, dv_, features=feats, is_causal=True, gate=dg, backend="cuda"))
        assert rel_error(out, ref) < 1e-13

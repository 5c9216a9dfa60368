"""RFA's GPU kernels against the NumPy reference.

numba.cuda kernels run in the simulator without a GPU (tiny grids, marker ``cudasim``);
the CUDA C RawKernels of ``kernels/rfa.cu`` run on the host under the shim of
``host_kernels`` (launchers in ``hostshim/rfa_host.cpp``, marker ``hostshim``), through the
same host-side algorithm (``mcattn.rfa._gpu``) CuPy uses. With a GPU both run on it.
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

from mcattn import config, rfa


def _device(*arrays):
    if not GPU_PRESENT:
        return arrays
    import cupy

    return tuple(None if a is None else cupy.asarray(a) for a in arrays)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


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
        dq, dk, dv_, dg, dm = _device(q, k, v, g, kpm)
        kw["key_padding_mask"] = dm
        out, info = rfa.attention(dq, dk, dv_, gate=dg, backend="cuda", **kw)
        assert _host(out).dtype == dtype and info.backend == "cuda"
        assert rel_error(_host(out), ref) < tol, (is_causal, g is not None)
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
        dq, dk, dv_, dm = _device(q, k, v, kpm)
        kw["key_padding_mask"] = dm
        out = _host(rfa.attention(dq, dk, dv_, backend="cuda", **kw))
        assert np.all(out[1] == 0) and np.all(np.isfinite(out))
        assert rel_error(out, ref) < 1e-13


# --- the CUDA C RawKernels (kernels/rfa.cu): on the host under the shim, or on the GPU ------------
class _HostLaunch:
    """The launches of ``mcattn.rfa.cupy`` (same grids, same arguments) on the host shim."""

    def __init__(self, rinp, threads):
        import ctypes

        import host_kernels

        from mcattn.rfa import _gpu

        lib = host_kernels.library("rfa")
        suffix = "f32" if rinp.dtype == np.float32 else "f64"
        real = ctypes.c_float if suffix == "f32" else ctypes.c_double
        P, I, I64, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_uint
        signatures = {
            "features": [P, P, P, P, P, I64, I, I, I, I, real, I, I],
            "states": [P, P, P, P, I, P, P, I64, I, I, I, I, I],
            "scan": [P, P, P, I64, I, I, I],
            "output": [P, P, P, P, P, P, I, P, P, P, P, I64, I, I, I, I, I, I, I, real],
        }
        self.fn = {}
        for part, args in signatures.items():
            fn = getattr(lib, f"launch_mcattn_rfa_{part}_{suffix}")
            fn.argtypes = [U, U] + args
            self.fn[part] = fn
        self.rinp, self.threads, self.kind = rinp, threads, _gpu.KIND_CODE[rinp.kind]

    def _call(self, part, total, *args):
        if total:
            self.fn[part]((total + self.threads - 1) // self.threads, self.threads,
                          *(a.ctypes.data if isinstance(a, np.ndarray) else a for a in args))

    def features(self, x, factor, f, logw, fnorm):
        bh, n, d = x.shape
        om = self.rinp.omega
        self._call("features", bh * n, x, om, f, logw, fnorm, bh * n, n, d, om.shape[1], om.shape[0],
                   factor, int(self.rinp.unit), self.kind)

    def states(self, kw, v, knorm, cum, has_gate, states, mass, chunk):
        bh, n_chunks, m, w1 = states.shape
        self._call("states", bh * n_chunks * (m * w1 + 1), kw, v, knorm, cum, int(has_gate), states, mass,
                   bh, kw.shape[1], m, w1 - 1, chunk, n_chunks)

    def scan(self, states, mass, chunk_decay):
        bh, n_chunks, m, w1 = states.shape
        self._call("scan", bh * (m * w1 + 1), states, mass, chunk_decay, bh, n_chunks, m, w1 - 1)

    def output(self, fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, chunk, causal):
        bh, nq, m = fq.shape
        self._call("output", bh * nq, fq, qnorm, kw, v, knorm, cum, int(has_gate), states, mass, out, flags,
                   bh, nq, kw.shape[1], m, v.shape[2], chunk, states.shape[1], int(causal), self.rinp.eps)


def _rawkernel_attention(q, k, v, threads=16, **kw):
    """``rfa.attention`` through the CuPy RawKernels (GPU) or the same kernels on the host shim."""
    if GPU_PRESENT:
        config.CUDA_THREADS_PER_BLOCK = threads
        dq, dk, dv_ = _device(q, k, v)
        for name in ("gate", "key_padding_mask"):
            if kw.get(name) is not None:
                kw[name] = _device(kw[name])[0]
        out, info = rfa.attention(dq, dk, dv_, backend="cupy", return_info=True, **kw)
        return _host(out), info.clamped
    from mcattn.rfa import _gpu
    from mcattn.rfa._inputs import prepare_rfa

    options = dict(attn_mask=None, key_padding_mask=None, gate=None, is_causal=False, normalize=None,
                   scale=None, chunk_size=None, eps=None, check_finite=True)
    features = kw.pop("features")
    options.update(kw)
    rinp, inp = prepare_rfa(features, q, k, v, **options)
    out, clamped = _gpu.run(rinp, _HostLaunch(rinp, threads))
    return out.reshape(inp.out_shape), int(clamped.sum())


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
    from mcattn.data import load_sample

    s = load_sample()
    q, k, v = (a[2, 1:2, :2] for a in (s.q, s.k, s.v))  # layer 2, a 122-token sentence, two heads
    kpm = s.key_padding_mask[1:2]
    feats = rfa.RandomFeatures(q.shape[-1], 16, kind="positive", num_heads=2, seed=1)
    for is_causal in (False, True):
        kw = dict(features=feats, key_padding_mask=kpm, scale=s.scale, is_causal=is_causal)
        ref = rfa.attention(q, k, v, backend="numba", **kw)
        out, _ = _rawkernel_attention(q, k, v, threads=32, **kw)
        assert rel_error(out, ref) < 2e-5

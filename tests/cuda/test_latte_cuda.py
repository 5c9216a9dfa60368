"""LATTE's GPU kernels keep the CPU kernel's keys, key for key, in every mode: numba.cuda
(simulator or GPU) and the CUDA C RawKernel (host shim or GPU)."""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import latte
from mcattn.latte import cpu
from mcattn.latte._inputs import prepare_latte
from mcattn.studies import data

if not GPU_PRESENT:
    import host_kernels

MODES = {"relative": 1.5, "absolute": 0.3, "safe": 2.0, "topk": 4}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # The simulator runs one Python thread per CUDA thread: keep blocks small.
    monkeypatch.setattr(mcattn.config, "CUDA_THREADS_PER_BLOCK", 8)


def _lat(q, k, v, threshold, mode, exact_scores="int8", want_mass=True, **mask):
    return prepare_latte(q, k, v, threshold=threshold, mode=mode, attn_mask=mask.get("attn_mask"),
                         key_padding_mask=mask.get("key_padding_mask"),
                         is_causal=mask.get("is_causal", False), scale=mask.get("scale"),
                         exact_scores=exact_scores, check_finite=True, want_mass=want_mass)




def _gpu(backend, q, k, v, threshold, mode, exact_scores, **mask):
    """(out, kept mask, dropped rows) of a GPU backend, as NumPy."""
    if GPU_PRESENT:
        import cupy

        dev = lambda a: None if a is None else cupy.asarray(a)  # noqa: E731
        args = {n: (dev(a) if isinstance(a, np.ndarray) else a) for n, a in mask.items()}
        out, info = latte.attention(dev(q), dev(k), dev(v), threshold=threshold, mode=mode,
                                    exact_scores=exact_scores, backend=backend, return_info=True, **args)
        kept = latte.kept_mask(dev(q), dev(k), threshold=threshold, mode=mode, backend=backend, **args)
        return out.get(), kept.get(), info.dropped_mass_rows
    if backend == "cuda":
        out, info = latte.attention(q, k, v, threshold=threshold, mode=mode, exact_scores=exact_scores,
                                    backend="cuda", return_info=True, **mask)
        kept = latte.kept_mask(q, k, threshold=threshold, mode=mode, backend="cuda", **mask)
        return out, kept, info.dropped_mass_rows
    lat = _lat(q, k, v, threshold, mode, exact_scores, **mask)
    out, _, dropped, _ = host_kernels.latte_forward(lat, threads=8)
    kept = host_kernels.latte_forward(lat, threads=8, do_output=False, write_mask=True)[3]
    shape = lat.inp.batch_shape
    return (out.reshape(lat.inp.out_shape), kept.reshape(shape + kept.shape[1:]),
            dropped.reshape(shape + dropped.shape[1:]))


def _cpu(q, k, v, threshold, mode, exact_scores, **mask):
    lat = _lat(q, k, v, threshold, mode, exact_scores, **mask)
    out, _, dropped = cpu.forward(lat)
    kept = cpu.kept_mask(lat)
    shape = lat.inp.batch_shape
    return (out.reshape(lat.inp.out_shape), kept.reshape(shape + kept.shape[1:]),
            dropped.reshape(shape + dropped.shape[1:]))


def _compare(backend, q, k, v, threshold, mode, exact_scores="int8", **mask):
    out, kept, dropped = _gpu(backend, q, k, v, threshold, mode, exact_scores, **mask)
    ref_out, ref_kept, ref_dropped = _cpu(q, k, v, threshold, mode, exact_scores, **mask)
    assert np.array_equal(kept, ref_kept)  # key for key
    tol = 2e-6 if q.dtype == np.float32 else 1e-12
    assert rel_error(out, ref_out) < tol
    np.testing.assert_allclose(dropped, ref_dropped, atol=1e-6)


BACKENDS = [pytest.param("cuda", marks=pytest.mark.cudasim), pytest.param("cupy", marks=pytest.mark.hostshim)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_kernels_keep_the_cpu_keys(backend, mode, dtype):
    rng = np.random.default_rng(len(mode))
    q, k, v = (rng.standard_normal((2, 2, 13, 8)).astype(dtype) for _ in range(3))
    theta = np.array([MODES[mode], 0.5 * MODES[mode]])  # per head
    _compare(backend, q, k, v, theta, mode)
    _compare(backend, q, k, v, theta, mode, exact_scores="float")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_kernels_with_masks_causal_and_odd_sizes(backend):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 1, 11, 5)).astype(np.float32)
    k = rng.standard_normal((2, 1, 11, 5)).astype(np.float32)
    v = rng.standard_normal((2, 1, 11, 3)).astype(np.float32)
    kpm = rng.random((2, 11)) > 0.3
    kpm[1] = False  # a fully padded sequence: nothing kept, zeros
    _compare(backend, q, k, v, 1.0, "relative", key_padding_mask=kpm, is_causal=True)
    bias = rng.standard_normal((11, 11)).astype(np.float32)
    bias[2, :] = -np.inf
    _compare(backend, q, k, v, 1.0, "safe", attn_mask=bias)
    one = rng.standard_normal((1, 1, 1, 4))
    _compare(backend, one, one, one, np.inf, "relative")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_kernels_on_real_attention(backend):
    s = data.load_sample()
    q, k, v = s.q[2, 2:4], s.k[2, 2:4], s.v[2, 2:4]  # 11 and 21 tokens, padded to 122
    kpm = s.key_padding_mask[2:4]
    keep = slice(0, 16)
    q, k, v, kpm = q[:, :2, keep], k[:, :2, keep], v[:, :2, keep], kpm[:, keep]
    theta = latte.calibrate(q, k, target_mass=0.99, key_padding_mask=kpm, scale=s.scale)
    _compare(backend, q, k, v, theta, "relative", key_padding_mask=kpm, scale=s.scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_topk_with_ties_and_short_rows(backend):
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 2, 9, 6))
    k = rng.standard_normal((1, 2, 9, 6))
    k[..., 3:6, :] = k[..., 2:3, :]  # four equal keys: ties at the cut are all kept
    v = rng.standard_normal((1, 2, 9, 6))
    for kk in (1, 3, 4, 20):
        _compare(backend, q, k, v, kk, "topk")
    _compare(backend, q, k, v, 2, "topk", is_causal=True)  # rows with fewer keys than k

"""Exact attention on the CPU backends against an independent float64 reference."""

import numpy as np
import pytest
from helpers import dense_attention, rel_error, require

import mcattn
from mcattn import config
from mcattn.errors import BackendError

CPU_BACKENDS = ["numpy", "numba"]
TOL = {np.float32: 2e-6, np.float64: 1e-12}


def _qkv(rng, batch, nq, nk, d, dv, dtype=np.float64):
    q = rng.standard_normal(batch + (nq, d)).astype(dtype)
    k = rng.standard_normal(batch + (nk, d)).astype(dtype)
    v = rng.standard_normal(batch + (nk, dv)).astype(dtype)
    return q, k, v


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several blocks even on small inputs, so that streaming is exercised."""
    monkeypatch.setattr(config, "CPU_BLOCK_Q", 7)
    monkeypatch.setattr(config, "CPU_BLOCK_K", 5)
    monkeypatch.setattr(config, "EXACT_CPU_BLOCK_Q", 7)
    monkeypatch.setattr(config, "EXACT_CPU_BLOCK_K", 5)
    monkeypatch.setattr(config, "EXACT_CPU_DIAG_K", 2)
    monkeypatch.setattr(config, "NUMPY_BLOCK_K", 5)
    monkeypatch.setattr(config, "NUMPY_MAX_BLOCK_ELEMENTS", 64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(
    "shape", [((2, 3), 17, 17, 16, 16), ((1,), 1, 1, 8, 8), ((), 9, 31, 4, 3), ((2,), 33, 12, 64, 5)]
)
def test_matches_dense_reference(backend, dtype, is_causal, shape, small_blocks):
    batch, nq, nk, d, dv = shape
    rng = np.random.default_rng(hash((batch, nq, nk)) % 2**32)
    q, k, v = _qkv(rng, batch, nq, nk, d, dv, dtype)
    out = mcattn.attention(q, k, v, is_causal=is_causal, backend=backend)
    assert out.dtype == dtype and out.shape == batch + (nq, dv)
    ref = dense_attention(q, k, v, is_causal=is_causal)
    assert rel_error(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_blocks_long_sequence(backend, dtype):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, (1, 2), 700, 1100, 32, 24, dtype)
    for is_causal in (False, True):
        out = mcattn.attention(q, k, v, is_causal=is_causal, backend=backend)
        assert rel_error(out, dense_attention(q, k, v, is_causal=is_causal)) < TOL[dtype]


def test_key_padding_mask_and_fully_masked_rows(backend, small_blocks):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, (3, 2), 11, 13, 8, 6)
    kpm = rng.random((3, 13)) > 0.4
    kpm[0, :] = True
    kpm[2, :] = False  # a fully padded sequence: its rows must be zero, not NaN
    out = mcattn.attention(q, k, v, key_padding_mask=kpm, backend=backend)
    ref = dense_attention(q, k, v, mask=kpm[:, None, None, :])
    assert np.all(np.isfinite(out))
    assert np.all(out[2] == 0)
    assert rel_error(out, ref) < 1e-12


def test_bool_and_additive_masks(backend, small_blocks):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, (2, 3), 10, 14, 8, 8)
    bool_mask = rng.random((10, 14)) > 0.5  # broadcast over [B, H]
    out = mcattn.attention(q, k, v, attn_mask=bool_mask, backend=backend)
    assert rel_error(out, dense_attention(q, k, v, mask=bool_mask)) < 1e-12
    additive = rng.standard_normal((2, 1, 10, 14))  # broadcast over heads
    additive[0, 0, 3, :] = -np.inf  # one fully masked row
    out = mcattn.attention(q, k, v, attn_mask=additive, backend=backend)
    ref = dense_attention(q, k, v, mask=additive)
    assert np.all(out[0, :, 3] == 0)
    assert rel_error(out, ref) < 1e-12
    # Mask combined with causal and a padding mask.
    kpm = rng.random((2, 14)) > 0.2
    out = mcattn.attention(q, k, v, attn_mask=bool_mask, key_padding_mask=kpm, is_causal=True,
                           backend=backend)
    both = bool_mask[None, None] & kpm[:, None, None, :]
    assert rel_error(out, dense_attention(q, k, v, mask=both, is_causal=True)) < 1e-12


def test_custom_scale_and_broadcast_kv(backend):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 4, 9, 16))
    k = rng.standard_normal((2, 1, 12, 16))  # shared by the 4 heads
    v = rng.standard_normal((1, 1, 12, 7))
    out = mcattn.attention(q, k, v, scale=0.3, backend=backend)
    assert out.shape == (2, 4, 9, 7)
    assert rel_error(out, dense_attention(q, k, v, scale=0.3)) < 1e-12


@pytest.mark.parametrize("nq,nk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(backend, nq, nk):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, (2,), nq, nk, 4, 3)
    out = mcattn.attention(q, k, v, backend=backend)
    assert out.shape == (2, nq, 3)
    assert np.all(out == 0)


def test_float16_computes_in_float32_and_returns_float16(backend):
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, (2,), 20, 20, 16, 16, np.float16)
    out = mcattn.attention(q, k, v, backend=backend)
    assert out.dtype == np.float16
    assert rel_error(out, dense_attention(q, k, v)) < 2e-3  # float16 output rounding


def test_results_do_not_depend_on_thread_count(monkeypatch):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, (3, 2), 300, 300, 32, 32, np.float32)
    monkeypatch.setattr(config, "EXACT_CPU_BLOCK_Q", 32)
    outs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(config, "NUM_THREADS", threads)
        outs.append(mcattn.attention(q, k, v, is_causal=True, backend="numba"))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_real_attention_sample(backend):
    """Real MiniLM attention (peaked, with outliers) through every CPU backend."""
    from mcattn.studies.data import load_sample

    sample = load_sample()
    for layer in (0, sample.num_layers - 1):
        q, k, v = sample.q[layer], sample.k[layer], sample.v[layer]
        kpm = sample.key_padding_mask
        out = mcattn.attention(q, k, v, key_padding_mask=kpm, scale=sample.scale, backend=backend)
        ref = dense_attention(q, k, v, mask=kpm[:, None, None, :], scale=sample.scale)
        assert rel_error(out, ref) < 2e-6


def test_matches_torch_sdpa(backend):
    torch = require("torch")
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, (2, 3), 40, 40, 16, 16, np.float32)
    mask = rng.random((2, 1, 40, 40)) > 0.3
    for kwargs, tkwargs in (
        ({"is_causal": True}, {"is_causal": True}),
        ({"attn_mask": mask}, {"attn_mask": torch.from_numpy(mask)}),
        ({"scale": 0.5}, {"scale": 0.5}),
    ):
        out = mcattn.attention(q, k, v, backend=backend, **kwargs)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(a) for a in (q, k, v)), **tkwargs
        ).numpy()
        assert rel_error(out, ref) < 2e-6


def test_info_counts_visible_pairs():
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, (2, 3), 6, 6, 4, 5)
    _, info = mcattn.attention(q, k, v, return_info=True)
    pairs = 2 * 3 * 36
    assert info.method == "exact" and info.ops == info.dense_ops
    assert info.ops["fp32_exp"] == pairs
    assert info.ops["fp32_mul"] == pairs * (4 + 5) + 2 * 3 * 6 * 4 + 2 * 3 * 6 * 5
    _, info = mcattn.attention(q, k, v, is_causal=True, return_info=True)
    assert info.ops["fp32_exp"] == 2 * 3 * 21  # 1 + 2 + ... + 6 visible keys per head
    kpm = np.ones((2, 6), bool)
    kpm[1, 3:] = False
    _, info = mcattn.attention(q, k, v, key_padding_mask=kpm, return_info=True)
    assert info.ops["fp32_exp"] == 3 * 36 + 3 * 18
    assert info.ops_ratio == 1.0 and info.energy_ratio == 1.0


def test_attention_probs():
    rng = np.random.default_rng(10)
    q, k, _ = _qkv(rng, (2, 2), 7, 9, 8, 1)
    kpm = np.ones((2, 9), bool)
    kpm[1] = False
    p = mcattn.attention_probs(q, k, key_padding_mask=kpm, is_causal=True)
    assert p.shape == (2, 2, 7, 9)
    assert np.allclose(p[0].sum(-1), 1.0) and np.all(p[1] == 0)
    eye = np.broadcast_to(np.eye(9), (2, 2, 9, 9))  # probabilities @ identity = probabilities
    ref = dense_attention(q, k, eye, mask=kpm[:, None, None, :], is_causal=True)
    assert rel_error(p, ref) < 1e-12
    with pytest.raises(BackendError, match="numba"):
        mcattn.attention_probs(q, k, backend="numba")


def test_large_sequence_uses_linear_memory():
    """N = 16384 through the Numba kernel in a fresh process: no N x N buffer (1 GiB).

    Peak resident memory is read with getrusage around the call; inputs are 3 MiB, the
    score matrix alone would be 1 GiB.
    """
    import subprocess
    import sys

    code = """
import resource, numpy as np, mcattn
rng = np.random.default_rng(11)
n = 16384
q, k, v = (rng.standard_normal((1, 1, n, 16), dtype=np.float32) for _ in range(3))
mcattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="numba")  # compile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = mcattn.attention(q, k, v, backend="numba")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = np.arange(0, n, 2048)
s = q[0, 0, rows] @ k[0, 0].T / 4.0
p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
err = np.linalg.norm(out[0, 0, rows] - p @ v[0, 0]) / np.linalg.norm(p @ v[0, 0])
print((after - before) / 1024, err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib, err = map(float, result.stdout.split())
    assert err < 2e-6
    assert growth_mib < 128, f"peak RSS grew by {growth_mib:.0f} MiB during the call"

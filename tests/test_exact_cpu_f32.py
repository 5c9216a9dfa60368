"""The float32 CPU exact forward's base-2 path: exp2, masks, causal strips, log-sum-exp."""

import numpy as np
import pytest
from helpers import dense_attention, rel_error

from mcattn import config
from mcattn._cpu_math import exp2_f32
from mcattn._jit import njit
from mcattn._validate import prepare_attention
from mcattn.exact import cpu

TOL32 = 2e-6


@njit(cache=False)
def _exp2_all(t, out):
    for i in range(t.size):
        out[i] = exp2_f32(t[i])


def test_exp2_f32_relative_error_and_limits():
    rng = np.random.default_rng()
    t = (-rng.random(400_000) * 127.0).astype(np.float32)
    t[:6] = [0.0, -0.5, -1.5, -126.0, -np.inf, -200.0]
    out = np.empty_like(t)
    _exp2_all(t, out)
    ref = np.exp2(t.astype(np.float64))
    normal = t >= -125.0
    # Under two float32 units of roundoff (2**-24) over the whole normal range.
    assert np.max(np.abs(out[normal] / ref[normal] - 1.0)) < 2 * 2.0**-24 * 1.5
    assert out[0] == 1.0 and out[4] == 0.0 and out[5] == 0.0
    assert np.all(out[t < -127.5] == 0.0) and np.all(out >= 0.0)


def _masked_inputs(rng, nq, nk, d, dv):
    q, k, v = (rng.standard_normal((2, 3, n, w)).astype(np.float32)
               for n, w in ((nq, d), (nk, d), (nk, dv)))
    additive = (3.0 * rng.standard_normal((2, 1, nq, nk))).astype(np.float32)
    additive[0, 0, 4, :] = -np.inf  # a fully masked row
    return q, k, v, additive


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("blocks", [(7, 5, 2), (16, 16, 5), (512, 512, 128)])
def test_float32_mask_causal_and_lse(monkeypatch, is_causal, blocks):
    """Additive mask (natural-log units), causal strips, ragged blocks, the row lse."""
    bq, bk, diag = blocks
    monkeypatch.setattr(config, "EXACT_CPU_BLOCK_Q", bq)
    monkeypatch.setattr(config, "EXACT_CPU_BLOCK_K", bk)
    monkeypatch.setattr(config, "EXACT_CPU_DIAG_K", diag)
    rng = np.random.default_rng()
    q, k, v, additive = _masked_inputs(rng, 37, 41, 16, 8)
    inp = prepare_attention(q, k, v, attn_mask=additive, is_causal=is_causal)
    out, lse = cpu.forward_lse(inp)
    ref = dense_attention(q, k, v, mask=additive, is_causal=is_causal).reshape(out.shape)
    assert out.dtype == np.float32 and rel_error(out, ref) < TOL32
    assert np.all(out.reshape(2, 3, 37, 8)[0, :, 4] == 0)
    # Reference lse in float64 from the same scores.
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64) / np.sqrt(16) + additive
    if is_causal:
        s = np.where(np.tril(np.ones((37, 41), bool)), s, -np.inf)
    top = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(np.isfinite(top), top, 0)
        ref_lse = (top + np.log(np.exp(s - shift).sum(-1, keepdims=True)))[..., 0]
    ref_lse = ref_lse.reshape(lse.shape)
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.max(np.abs(lse[finite] - ref_lse[finite]) / np.maximum(1.0, np.abs(ref_lse[finite]))) < 1e-5


def test_float32_long_causal_against_float64():
    """Default blocks, several query blocks and diagonal strips, d = 64 (the benchmark shape)."""
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((1, 2, 1300, 64)).astype(np.float32) for _ in range(3))
    for is_causal in (False, True):
        inp = prepare_attention(q, k, v, is_causal=is_causal)
        out = cpu.forward(inp)
        ref = dense_attention(q, k, v, is_causal=is_causal).reshape(out.shape)
        assert rel_error(out, ref) < TOL32

"""MCA's shared draws as reduced GEMMs (mcattn.mca.shared)."""

import numpy as np
import pytest
from helpers import rel_error

import mcattn
from mcattn import config, mca
from mcattn.mca import bounds, naive, shared


def _problem(rng, batch=2, heads=3, n=40, d_in=24, dh=8):
    x = rng.standard_normal((batch, n, d_in))
    w = rng.standard_normal((d_in, heads * dh)) / np.sqrt(d_in)
    b = rng.standard_normal(heads * dh) * 0.1
    r = rng.integers(0, d_in + 6, (batch, heads, n))
    x[1, 3] = 0.0  # a zero input row: exactly the bias
    return x, w, b, r


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reduced_gemms_equal_the_per_draw_reference(dtype):
    rng = np.random.default_rng(0)
    x, w, b, r = _problem(rng)
    ref = naive.value_projection(x, w, b, 3, r, 17, shared_draws=True)
    out = shared.value_projection(*(a.astype(dtype) for a in (x, w, b)), 3, r, 17)
    assert out.dtype == dtype
    assert rel_error(out, ref) < (1e-13 if dtype == np.float64 else 3e-6)
    for backend in ("numba", "numpy", "cuda"):  # cuda: the simulator's host arrays
        got = mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=17, shared_draws=True,
                                   backend=backend)
        assert rel_error(got, ref) < 1e-13, backend


def test_numba_routes_long_sequences_to_the_gemms_and_both_agree(monkeypatch):
    rng = np.random.default_rng(4)
    x, w, b, r = _problem(rng)
    short = mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=5, shared_draws=True,
                                 backend="numba")  # 40 tokens: the per-draw kernel
    monkeypatch.setattr(config, "MCA_SHARED_GEMM_MIN_TOKENS", 40)
    long = mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=5, shared_draws=True,
                                backend="numba")  # the reduced GEMMs
    assert rel_error(long, short) < 1e-13


def test_uniform_budgets_and_single_token_edges():
    rng = np.random.default_rng(1)
    x, w, b, _ = _problem(rng, n=17)
    for value in (1, 5, 23):
        r = np.full((2, 3, 17), value)
        ref = naive.value_projection(x, w, b, 3, r, 3, shared_draws=True)
        assert rel_error(shared.value_projection(x, w, b, 3, r, 3), ref) < 1e-13
    r = np.zeros((2, 3, 17), int)
    r[0, 1, 4] = 9
    ref = naive.value_projection(x, w, None, 3, r, 3, shared_draws=True)
    assert rel_error(shared.value_projection(x, w, None, 3, r, 3), ref) < 1e-13


def test_round_budgets_never_lowers_and_merges():
    rng = np.random.default_rng(2)
    r = rng.integers(0, 400, (2, 4, 300))
    r[..., :10] = 0
    r[..., 10:20] = 384
    rounded = shared.round_budgets(r, 384, 0.25)
    assert np.all(rounded >= r) and np.all(rounded <= np.maximum(r, 384))
    assert np.array_equal(rounded[..., :20], r[..., :20])  # masked and exact tokens untouched
    sampled = (r > 0) & (r < 384)
    assert np.all(rounded[sampled] <= np.ceil(r[sampled] * 1.25) + 1)
    for row, new in zip(r.reshape(-1, 300), rounded.reshape(-1, 300)):
        assert len(np.unique(new)) < len(np.unique(row)) / 3
    assert np.array_equal(shared.round_budgets(r, 384, 0.0), r)


def test_rounded_shared_draws_are_unbiased():
    rng = np.random.default_rng(3)
    x, w, b, r = _problem(rng, n=24)
    r = shared.round_budgets(np.maximum(r // 3, 1), 24, 0.5)
    exact = naive.value_projection(x, w, b, 3, np.full_like(r, 24), 0)
    outs = np.stack([shared.value_projection(x, w, b, 3, r, s) for s in range(500)])
    sem = outs.std(0, ddof=1) / np.sqrt(len(outs))
    varied = sem > 1e-12
    z = (outs.mean(0) - exact)[varied] / sem[varied]
    assert varied.mean() > 0.5
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.1


def test_attention_reports_rounded_budgets_and_the_bound_holds_on_real_attention(monkeypatch):
    from mcattn.studies.data import load_sample

    monkeypatch.setattr(config, "MCA_SHARED_GEMM_MIN_TOKENS", 64)  # the GEMM path, rounding on
    sample = load_sample()
    layer, heads = 4, sample.num_heads
    q, k, x = sample.q[layer], sample.k[layer], sample.x[layer]
    w, b, kpm = sample.w_v[layer], sample.b_v[layer], sample.key_padding_mask
    v = (x @ w + b).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    exact = mcattn.attention(q, k, np.ascontiguousarray(v), key_padding_mask=kpm, scale=sample.scale)
    rows = np.broadcast_to(kpm[:, None, :], exact.shape[:-1])
    probs = mcattn.attention_probs(q, k, key_padding_mask=kpm, scale=sample.scale)
    plain = mca.budgets(probs, 0.4, x.shape[-1], key_padding_mask=kpm)
    errors = []
    for seed in range(4):
        out, info = mca.attention(q, k, x, w, b, num_heads=heads, alpha=0.4, key_padding_mask=kpm,
                                  scale=sample.scale, seed=seed, shared_draws=True, return_info=True)
        errors.append(np.linalg.norm(out - exact, axis=-1)[rows].mean())
    assert np.all(info.budgets >= plain) and np.any(info.budgets > plain)
    assert info.shared_draws and 0 < info.macs_kept < 1
    # Rounded up, never down: the Theorem's bound computed from alpha still holds.
    theorem = bounds.alpha_error_bound(x, w, heads, 0.4, key_padding_mask=kpm)
    assert np.mean(errors) < theorem.mean()
    # The projection's operation count is what the reduced GEMMs did: fewer multiply-adds
    # than the same draws one at a time (repeated rows merge).
    monkeypatch.setattr(config, "MCA_SHARED_SLACK", 0.0)
    _, unrounded = mca.attention(q, k, x, w, b, num_heads=heads, alpha=0.4, key_padding_mask=kpm,
                                 scale=sample.scale, seed=0, shared_draws=True, return_info=True)
    assert np.array_equal(unrounded.budgets, plain)
    _, independent = mca.attention(q, k, x, w, b, num_heads=heads, alpha=0.4, key_padding_mask=kpm,
                                   scale=sample.scale, seed=0, return_info=True)
    assert unrounded.projection_ops["fp32_add"] < independent.projection_ops["fp32_add"]

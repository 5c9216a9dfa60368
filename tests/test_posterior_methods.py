"""Every approximating method's ``info.posterior``: certified bounds hold on every row, random
bounds on at least ``1 - delta`` of the rows (and a bound half as large is caught), on fresh
random inputs and on the embedded MiniLM sample; the inverse meets its target."""

import numpy as np
import pytest

import mcattn
from mcattn import eigen, latte, mca, rfa
from mcattn.posterior import knob_for
from mcattn.studies import data
from mcattn.studies.compare import layer_inputs


def _exact(q, k, v, **masks):
    f64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    return mcattn.attention(*f64, **masks)


def _row_errors(out, ref):
    return np.linalg.norm(np.asarray(out, np.float64) - ref, axis=-1)


@pytest.fixture(scope="module")
def sample():
    return data.load_sample()


def _masks(rng, case, b, n):
    if case == "padding":
        kpm = np.ones((b, n), bool)
        kpm[0, n // 2:] = False
        return {"key_padding_mask": kpm}
    if case == "causal":
        return {"is_causal": True}
    if case == "bias":
        return {"attn_mask": rng.standard_normal((n, n)) * 0.5}
    return {}


def _check_certified(bound, err, rows=None):
    rows = np.ones(err.shape, bool) if rows is None else rows
    assert bound.certified and bound.delta is None
    assert bound.row.shape == err.shape
    assert np.all(bound.row[rows] >= err[rows]), "a certified bound failed on a row"
    ratio = bound.row[rows & (err > 1e-6)] / err[rows & (err > 1e-6)]
    return ratio


# ------------------------------------------------------------------------------- certified


@pytest.mark.parametrize("mode,threshold", [("relative", 2.0), ("relative", 5.0), ("topk", 12),
                                            ("safe", 2.0), ("absolute", 0.0)])
@pytest.mark.parametrize("exact_scores", ["int8", "float"])
@pytest.mark.parametrize("case", ["none", "padding", "causal", "bias"])
def test_latte_bound_holds_on_every_row(mode, threshold, exact_scores, case):
    rng = np.random.default_rng(hash((mode, exact_scores, case)) % 2**32)
    b, h, n, d = 2, 2, 96, 32
    q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
    q *= 1.5  # peaked rows: the kept sets are small
    masks = _masks(rng, case, b, n)
    out, info = latte.attention(q, k, v, threshold=threshold, mode=mode, exact_scores=exact_scores,
                                return_info=True, **masks)
    ratio = _check_certified(info.posterior, _row_errors(out, _exact(q, k, v, **masks)))
    assert np.median(ratio) < 60  # useful, not only true


def test_latte_bound_on_real_attention(sample):
    inputs = layer_inputs(sample, 2)
    kpm = np.asarray(inputs.key_padding_mask, bool)
    theta = latte.calibrate(inputs.q, inputs.k, target_mass=0.9, key_padding_mask=kpm, scale=inputs.scale)
    ref = _exact(inputs.q, inputs.k, inputs.v, key_padding_mask=kpm, scale=inputs.scale)
    rows = np.broadcast_to(kpm[:, None, :], ref.shape[:-1])
    for exact_scores, limit in (("float", 12), ("int8", 20)):
        out, info = latte.attention(inputs.q, inputs.k, inputs.v, threshold=theta, key_padding_mask=kpm,
                                    scale=inputs.scale, exact_scores=exact_scores, return_info=True)
        ratio = _check_certified(info.posterior, _row_errors(out, ref), rows)
        assert np.median(ratio) < limit  # measured 6.0 (float) and 9.2 (int8)


def test_latte_soft_mode_has_no_bound():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 1, 16, 8)) for _ in range(3))
    _, info = latte.attention(q, k, v, threshold=2.0, soft=True, backend="numpy", return_info=True)
    assert info.posterior is None


@pytest.mark.parametrize("case", ["none", "padding", "causal"])
@pytest.mark.parametrize("columns", [8, 24])
def test_eigen_bound_holds_on_every_row(case, columns):
    rng = np.random.default_rng(columns + len(case))
    b, h, n, d = 2, 2, 64, 16
    base = rng.standard_normal((n, d))
    q = (base + 0.3 * rng.standard_normal((b, h, n, d))).astype(np.float32)
    k = (base + 0.3 * rng.standard_normal((b, h, n, d))).astype(np.float32)
    v = rng.standard_normal((b, h, n, d)).astype(np.float32)
    bases = eigen.fit_heads(q, k, rank=8)
    masks = _masks(rng, case, b, n)
    out, info = eigen.attention(q, k, v, basis=bases, columns=columns, return_info=True, **masks)
    _check_certified(info.posterior, _row_errors(out, _exact(q, k, v, **masks)))


def test_eigen_bound_on_real_attention(sample):
    from mcattn.studies.eigen.compare import layer_bases

    inputs = layer_inputs(sample, 5)
    kpm = np.asarray(inputs.key_padding_mask, bool)
    ref = _exact(inputs.q, inputs.k, inputs.v, key_padding_mask=kpm, scale=inputs.scale)
    out, info = eigen.attention(inputs.q, inputs.k, inputs.v, basis=layer_bases(inputs), columns=32,
                                key_padding_mask=kpm, scale=inputs.scale, return_info=True)
    rows = np.broadcast_to(kpm[:, None, :], ref.shape[:-1])
    ratio = _check_certified(info.posterior, _row_errors(out, ref), rows)
    assert np.median(ratio) < 40  # measured 18.8


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"kind": "arccos"}])
def test_rfa_hull_bound_holds_on_every_row(kwargs):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 2, 80, 16)) for _ in range(3))
    out, info = rfa.attention(q, k, v, num_features=32, seed=1, return_info=True, **kwargs)
    ref = _exact(q, k, v, is_causal=kwargs.get("is_causal", False))
    if kwargs.get("kind") == "arccos":  # its target is another kernel: still a mean of the values
        ref = _exact(q, k, v)
    _check_certified(info.posterior, _row_errors(out, ref))


# ------------------------------------------------------------------------------- random


def _coverage(make, delta, seeds, scale=1.0):
    covered, total = 0, 0
    for seed in seeds:
        out, bound, ref, rows = make(seed)
        err = _row_errors(out, ref)
        ok = rows & (err > 0)
        assert bound.delta == delta and not bound.certified
        covered += int((scale * bound.row[ok] >= err[ok]).sum())
        total += int(ok.sum())
    return covered / total


def _mca_case(shared_draws, delta):
    rng = np.random.default_rng(11)
    b, h, n, dh, d_in = 1, 4, 96, 16, 64
    x = rng.standard_normal((b, n, d_in))
    w = rng.standard_normal((d_in, h * dh)) / 8
    q, k = (rng.standard_normal((b, h, n, dh)) for _ in range(2))
    v = (x @ w).reshape(b, n, h, dh).transpose(0, 2, 1, 3)
    ref = _exact(q, k, v)

    def make(seed):
        out, info = mca.attention(q, k, x, w, num_heads=h, alpha=0.3, seed=seed, delta=delta,
                                  shared_draws=shared_draws, return_info=True)
        return out, info.posterior, ref, np.ones(ref.shape[:-1], bool)

    return make


@pytest.mark.parametrize("delta", [0.05, 0.01])
def test_mca_bound_covers_and_a_halved_bound_is_caught(delta):
    make = _mca_case(False, delta)
    seeds = range(12)
    assert _coverage(make, delta, seeds) >= 1 - delta - 0.01
    assert _coverage(make, delta, seeds, scale=0.5) < 1 - delta - 0.01  # power: 2x too small fails


def test_mca_shared_draws_bound_covers():
    make = _mca_case(True, 0.05)
    assert _coverage(make, 0.05, range(8)) >= 0.94


def test_mca_bound_on_real_attention(sample):
    inputs = layer_inputs(sample, 2)
    kpm = np.asarray(inputs.key_padding_mask, bool)
    heads = inputs.q.shape[1]
    x, w, bv = (np.asarray(a, np.float64) for a in (inputs.x, inputs.w_v, inputs.b_v))
    v = (x @ w + bv).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    ref = _exact(inputs.q, inputs.k, v, key_padding_mask=kpm, scale=inputs.scale)
    rows = np.broadcast_to(kpm[:, None, :], ref.shape[:-1])

    def make(seed):
        out, info = mca.attention(inputs.q, inputs.k, inputs.x, inputs.w_v, inputs.b_v, num_heads=heads,
                                  alpha=0.2, key_padding_mask=kpm, scale=inputs.scale, seed=seed,
                                  return_info=True)
        return out, info.posterior, ref, rows

    assert _coverage(make, 0.05, range(3)) >= 0.95  # measured 0.99


def _rfa_case(delta):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 4, 128, 16)) * s for s in (0.6, 0.6, 1.0))
    ref = _exact(q, k, v)

    def make(seed):
        out, info = rfa.attention(q, k, v, num_features=64, kind="sincos", seed=seed, delta=delta,
                                  return_info=True)
        return out, info.posterior, ref, np.ones(ref.shape[:-1], bool)

    return make


def test_rfa_sincos_bound_covers_and_a_halved_bound_is_caught():
    make = _rfa_case(0.05)
    seeds = range(10)
    assert _coverage(make, 0.05, seeds) >= 0.94
    assert _coverage(make, 0.05, seeds, scale=0.5) < 0.94


def test_rfa_sincos_causal_has_no_bound():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 16, 8)) for _ in range(3))
    _, info = rfa.attention(q, k, v, num_features=8, kind="sincos", is_causal=True, return_info=True)
    assert info.posterior is None


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, float("nan")])
def test_bad_delta_is_refused(delta):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 8, 4)) for _ in range(3))
    with pytest.raises(ValueError, match="delta"):
        rfa.attention(q, k, v, num_features=4, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        mca.attention(q, k, rng.standard_normal((1, 8, 6)), rng.standard_normal((6, 4)), num_heads=1,
                      alpha=0.5, delta=delta)


# ------------------------------------------------------------------------------- inverse


def test_knob_for_meets_the_target_and_is_near_the_cheapest():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 96, 16)) for _ in range(3))

    def bound_of(theta):
        return latte.attention(q, k, v, threshold=theta, exact_scores="float", return_info=True)[1].posterior

    theta, bound = knob_for(bound_of, 0.2, 0.0, 40.0, larger_is_safer=True, statistic="median")
    assert bound.median <= 0.2
    assert bound_of(theta * 0.9).median > 0.2  # a cheaper knob misses it

    def mca_bound(alpha):
        x = np.random.default_rng(4).standard_normal((1, 96, 32))
        w = np.random.default_rng(5).standard_normal((32, 32)) / 6
        return mca.attention(q, k, x, w, num_heads=2, alpha=alpha, seed=0, return_info=True)[1].posterior

    alpha, bound = knob_for(mca_bound, 0.05, 0.01, 2.0, larger_is_safer=False, statistic="max")
    assert float(bound.row.max()) <= 0.05 and alpha > 0.01


def test_knob_for_says_when_the_target_cannot_be_met():
    from mcattn.posterior import from_rows

    with pytest.raises(ValueError, match="safest knob"):
        knob_for(lambda _: from_rows(np.ones((1, 2)), np.ones((1, 2, 3)), certified=True), 0.1, 0, 10,
                 larger_is_safer=True, statistic="max")
    with pytest.raises(ValueError, match="statistic"):
        knob_for(lambda _: None, 0.1, 0, 1, larger_is_safer=True, statistic="mean")

"""LATTE's fast CPU path (issue 22): the int8 (VNNI) estimate and score tiles, the vector keep
rule, and the block-wise kept-key pass, against exact integer products and the reference.

The relative and absolute rules without a float mask and without ``return_info`` take that
path (``mcattn.latte.cpu._row_keep_plain`` and ``_block_output``); every other case keeps
the per-row code, tested in test_latte.py. Kept sets must be identical, key for key, with
VNNI on and off.
"""

import numpy as np
import pytest
from helpers import rel_error
from numba import njit

from mcattn import config, latte
from mcattn.latte import vnni
from mcattn.studies import data


@njit
def _tiles(est, qw, kw, corr, rows, keys):
    for ti in range(0, rows, vnni.MR):
        for tj in range(0, keys, vnni.NR):
            vnni.estimate_tile(est, qw, kw, corr, ti, tj)


def _packed_product(q8, k8, full, plain=False):
    """``hi(q8) . hi(k8)`` (or ``q8 . k8``) through the packing and tile routines."""
    nq, d = q8.shape
    nk = k8.shape[0]
    d4 = (d + 3) // 4
    nk_pad = -(-nk // vnni.NR) * vnni.NR
    rows_pad = -(-nq // vnni.MR) * vnni.MR
    kbytes = np.zeros(d4 * nk_pad * 4, np.int8)
    kw = kbytes.view(np.int32).reshape(d4, nk_pad)
    corr = np.zeros(nk_pad, np.int32)
    vnni.pack_keys(k8[None], 0, nk, full, kbytes.reshape(d4, nk_pad, 4), kw, corr)
    qbytes = np.zeros(rows_pad * d4 * 4, np.uint8)
    qw = qbytes.view(np.int32).reshape(rows_pad, d4)
    vnni.pack_queries(q8[None], 0, 0, nq, full, qbytes.reshape(rows_pad, 4 * d4))
    est = np.full((rows_pad, nk_pad), np.nan, np.float32)
    if plain:
        for ti in range(0, nq, vnni.MR):
            for tj in range(0, nk, vnni.NR):
                vnni._plain_tile(est, qw, kw, corr, ti, tj, tj)
    else:
        _tiles(est, qw, kw, corr, nq, nk)
    return est[:nq, :nk]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("shape", [(13, 70, 64), (6, 64, 33), (1, 1, 1), (20, 130, 128)])
def test_tiles_are_the_exact_integer_products(full, shape):
    nq, nk, d = shape
    rng = np.random.default_rng(nq * nk + d)
    q8 = rng.integers(-127, 128, (nq, d)).astype(np.int8)
    k8 = rng.integers(-127, 128, (nk, d)).astype(np.int8)
    q8[0, :] = -127  # the extremes of both ranges
    k8[0, :] = -127
    ref = (q8.astype(np.int64) @ k8.astype(np.int64).T if full
           else (q8.astype(np.int64) >> 4) @ (k8.astype(np.int64) >> 4).T)
    got = _packed_product(q8, k8, full)
    assert np.array_equal(got, ref.astype(np.float32)) and np.array_equal(got.astype(np.int64), ref)
    if nq * nk <= 1000:  # the scalar fallback (hosts without VNNI) gives the same integers
        assert np.array_equal(_packed_product(q8, k8, full, plain=True), got)


@njit
def _keep_helpers(est, sk, cut, idx):
    g8, g16 = est.shape[0] // 8, est.shape[0] // 16
    return vnni.max_groups(est, sk, g8), vnni.compress_groups(est, sk, g16, cut, idx)


@njit
def _screened(est, sk, s_k, cut, idx):
    return vnni.compress_groups_screened(est, sk, s_k, est.shape[0] // 16, cut, idx)


@pytest.mark.parametrize("n", [16, 37, 40, 4096])
def test_vector_max_and_kept_indices_match_numpy(n):
    rng = np.random.default_rng(n)
    est = rng.integers(-4096, 4097, n).astype(np.float32)
    sk = (256 * rng.random(n).astype(np.float32)).astype(np.float64)
    u = est.astype(np.float64) * sk
    j0 = int(np.argsort(u)[int(0.85 * n)])
    j1 = (j0 + 3) % (n // 16 * 16)
    est[j1], sk[j1] = est[j0], sk[j0]  # a tie at the cut: both are kept
    u = est.astype(np.float64) * sk
    cut = float(u[j0])
    idx = np.full(n + 16, -1, np.int32)
    top, count = _keep_helpers(est, sk, cut, idx)
    whole8, whole16 = n // 8 * 8, n // 16 * 16
    assert top == u[:whole8].max()
    expect = np.flatnonzero(u[:whole16] >= cut)
    assert count == len(expect) and np.array_equal(idx[:count], expect)
    assert 0 < count < whole16  # the test sees kept and dropped keys
    # The float32 screen: the same sets, also where float32 cannot tell u from the cut (the
    # tie above; a cut just above or below a key's u, equal to it in float32).
    s_k = (sk / 256).astype(np.float32)
    assert np.array_equal(s_k.astype(np.float64) * 256, sk)
    near = (cut, np.nextafter(cut, np.inf), np.nextafter(cut, -np.inf))
    assert all(np.float32(c / 256) == np.float32(cut / 256) for c in near)
    for c in near + (0.0, -1e300, 1e300):
        got = np.full(n + 16, -1, np.int32)
        k = _screened(est, sk, s_k, c, got)
        expect = np.flatnonzero(u[:whole16] >= c)
        assert k == len(expect) and np.array_equal(got[:k], expect)


@njit
def _kept_rows(sc, dots, qb, kpad, idx, cnt, corr, s_k, c):
    tops = np.empty(qb.shape[0])
    for i in range(qb.shape[0]):
        vnni.kept_dots(dots, i, qb, kpad, idx, 0, cnt[i])
        tops[i] = vnni.kept_scores(sc, i, qb, kpad, idx, cnt[i], corr, s_k, 0, c[i])
    return tops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [24, 64, 100])
def test_kept_scores_are_the_scalar_scores_bit_for_bit(dtype, d):
    """The gathered int8 dot products (16 keys at a time, any tail) are the exact integers, and
    their scaling is the scalar code's float64 expression rounded once to the scores' dtype."""
    rng = np.random.default_rng(d)
    nk, counts = 90, [0, 1, 15, 16, 17, 33, 90]
    rows = len(counts)
    k8 = rng.integers(-127, 128, (nk, d)).astype(np.int8)
    q8 = rng.integers(-127, 128, (rows, d)).astype(np.int8)
    k8[0], q8[0] = -127, -127  # the extremes of both ranges
    dpad = -(-d // 64) * 64
    kpad = np.zeros((nk, dpad), np.int8)
    kpad[:, :d] = k8
    qb = np.full((rows, dpad), 77, np.uint8)  # bytes past d meet zero key bytes
    qb[:, :d] = (q8.astype(np.int32) + 128).astype(np.uint8)
    idx = np.full((rows, nk + 16), nk + 10**6, np.int32)  # slack slots hold no valid key
    for i, n in enumerate(counts):
        idx[i, :n] = np.sort(rng.choice(nk, n, replace=False))
    corr = (128 * k8.astype(np.int32).sum(1)).astype(np.int32)
    s_k = (rng.random((1, nk)) * 0.02 + 1e-3).astype(np.float32)
    c = rng.random(rows) * 0.1
    dots = np.zeros((rows, nk + 32), np.int32)
    sc = np.zeros((rows, nk + 16), dtype)
    tops = _kept_rows(sc, dots, qb, kpad, idx, np.array(counts), corr, s_k, c)
    for i, n in enumerate(counts):
        j = idx[i, :n]
        exact = q8[i].astype(np.int64) @ k8[j].astype(np.int64).T
        assert np.array_equal(dots[i, :n] - corr[j], exact)
        expect = (c[i] * s_k[0, j].astype(np.float64) * exact.astype(np.float64)).astype(dtype)
        assert np.array_equal(sc[i, :n], expect)
        assert tops[i] == (expect.max() if n else -np.inf)


def _qkv(shape, n, nk, d, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape + (n, d)).astype(dtype),
            rng.standard_normal(shape + (nk, d)).astype(dtype),
            rng.standard_normal(shape + (nk, d + 3)).astype(dtype))


@pytest.mark.parametrize("vnni_on", [True, False])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("case", ["square", "causal", "wide", "float64"])
def test_fast_path_matches_the_reference(vnni_on, mode, case, monkeypatch):
    monkeypatch.setattr(config, "LATTE_CPU_VNNI", vnni_on)
    monkeypatch.setattr(config, "LATTE_CPU_BLOCK_K", 40)  # several key chunks per row
    n, nk, dtype, causal = 45, 45, np.float32, False
    if case == "causal":
        n, nk, causal = 83, 83, True
    elif case == "wide":
        n, nk = 29, 150
    elif case == "float64":
        dtype, nk = np.float64, 77
    q, k, v = _qkv((2, 3), n, nk, 24, dtype, seed=31)
    theta = {"relative": np.array([1.0, 2.0, 3.0]), "absolute": 0.2}[mode]
    kw = {"threshold": theta, "mode": mode, "is_causal": causal}
    keep_ref = latte.kept_mask(q, k, backend="numpy", **kw)
    keep = latte.kept_mask(q, k, backend="numba", **kw)
    assert np.array_equal(keep, keep_ref)
    assert 0.05 < keep_ref.mean() < 0.9  # kept and dropped keys on every path
    for scores in ("int8", "float"):
        ref = latte.attention(q, k, v, exact_scores=scores, backend="numpy", **kw)
        out = latte.attention(q, k, v, exact_scores=scores, backend="numba", **kw)
        assert rel_error(out, ref) < (1e-12 if dtype == np.float64 else 2e-6)


def test_fast_path_on_real_attention():
    """The embedded MiniLM sample (layer 2, unpadded tokens of each sequence), 15 % kept."""
    s = data.load_sample()
    for row in range(3):
        length = int(s.key_padding_mask[row].sum())
        assert s.key_padding_mask[row, :length].all()
        q, k, v = (a[2, row, :, :length] for a in (s.q, s.k, s.v))
        theta = latte.calibrate(q, k, target_keep=0.15, scale=s.scale)
        keep_ref = latte.kept_mask(q, k, threshold=theta, scale=s.scale, backend="numpy")
        ref = latte.attention(q, k, v, threshold=theta, scale=s.scale, backend="numpy")
        for vnni_on in (True, False):
            config_vnni = config.LATTE_CPU_VNNI
            config.LATTE_CPU_VNNI = vnni_on
            try:
                keep = latte.kept_mask(q, k, threshold=theta, scale=s.scale, backend="numba")
                out = latte.attention(q, k, v, threshold=theta, scale=s.scale, backend="numba")
            finally:
                config.LATTE_CPU_VNNI = config_vnni
            assert np.array_equal(keep, keep_ref)
            assert rel_error(out, ref) < 2e-6
        assert keep_ref.mean() < 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_quantisation_is_the_reference_bit_for_bit(dtype):
    """mcattn.latte.cpu.quantize_rows (used for every host array) against the NumPy reference:
    random rows of several magnitudes, a zero row, exact .5 ties, inf and NaN rows."""
    from mcattn.latte import cpu, naive

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 200, 37)).astype(dtype) * np.logspace(-30, 30, 200)[:, None].astype(dtype)
    x[0, 0] = 0
    x[0, 1, 5] = np.inf
    x[0, 2, 3] = np.nan
    x[1, 4] = np.arange(37) - 18.5  # scale 18.5 / 127: q / scale has halves to round to even
    x[2, 5] = 127.0 * (np.arange(37) % 3 - 1) + 0.5
    with np.errstate(all="ignore"):
        ref8, ref_s = naive.quantize_rows(x)
        got8, got_s = cpu.quantize_rows(x)
    assert got8.dtype == np.int8 and got_s.dtype == np.float32 and got_s.shape == (3, 200, 1)
    assert np.array_equal(got8, ref8) and np.array_equal(got_s, ref_s)
    assert np.abs(ref8).max() == 127 and (np.diff(ref8[1, 4].astype(int)) >= 0).all()

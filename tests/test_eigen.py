"""Eigen reconstruction: fits, overlaps, columns, attention against the float64 reference, bounds."""

import numpy as np
import pytest
from helpers import dense_attention, rel_error, require

from mcattn import eigen
from mcattn.eigen import bounds, naive
from mcattn.eigen.plan import make_plan
from mcattn.errors import ShapeError

BACKENDS = ["numpy", "numba"]


def _rows(rng, count=300, n=24, rank=5, noise=0.05):
    """Rows near a rank-``rank`` affine subspace of R^n (decaying spectrum)."""
    basis = np.linalg.qr(rng.standard_normal((n, rank)))[0].T
    coef = rng.standard_normal((count, rank)) * np.linspace(3, 1, rank)
    return 0.5 + coef @ basis + noise * rng.standard_normal((count, n))


def _qkv(rng, shape=(2, 3, 20, 6), dv=5):
    q = rng.standard_normal(shape)
    k = rng.standard_normal(shape)
    v = rng.standard_normal(shape[:-1] + (dv,))
    return q, k, v


@pytest.fixture(scope="module")
def real_rows():
    """Score rows of the embedded MiniLM sample (layer 2, all heads): 48-token windows of its two
    news documents (106 and 122 tokens), one document to fit, the other to test."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k = s.q[2].astype(np.float64), s.k[2].astype(np.float64)
    tokens = s.key_padding_mask.sum(1)
    docs = [eigen.score_rows(q[b, :, :tokens[b]], k[b, :, :tokens[b]], length=48) for b in (0, 1)]
    return docs[0], docs[1]


# --- fit ---------------------------------------------------------------------------


def test_fit_is_the_svd_of_centred_rows():
    rows = _rows(np.random.default_rng(0))
    b = eigen.fit(rows, rank=5)
    centred = rows - rows.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    assert np.allclose(b.mean, rows.mean(0))
    assert np.allclose(np.abs(b.components @ vt[:5].T), np.eye(5), atol=1e-10)
    assert np.allclose(b.explained_variance, s[:5] ** 2 / (len(rows) - 1))
    assert np.isclose(b.total_variance, (s**2).sum() / (len(rows) - 1))
    assert np.allclose(b.components @ b.components.T, np.eye(5), atol=1e-12)
    assert b.effective_rank(0.99) <= 5 and b.effective_rank(0.5) >= 1
    assert eigen.fit(rows, rank=3).effective_rank(0.9999) is None  # beyond the kept rank


@pytest.mark.parametrize("center", [True, False, "position"])
def test_streaming_fit_equals_one_shot(center):
    rows = _rows(np.random.default_rng(1), count=24 * 12)
    one = eigen.fit(rows, rank=6, center=center)
    chunks = (rows[i:i + 48] for i in range(0, len(rows), 48))
    stream = eigen.fit(chunks, rank=6, center=center)
    assert np.allclose(stream.components, one.components, atol=1e-8)
    assert np.allclose(stream.explained_variance, one.explained_variance, rtol=1e-10)
    assert np.isclose(stream.total_variance, one.total_variance)
    assert np.allclose(stream.mean, one.mean)


def test_randomized_fit_matches_full():
    rows = _rows(np.random.default_rng(2), count=400, n=40, rank=6, noise=0.01)
    full = eigen.fit(rows, rank=6)
    rand = eigen.fit(rows, rank=6, method="randomized", seed=0)
    assert eigen.overlap(full, rand) > 1 - 1e-8
    assert np.allclose(rand.explained_variance, full.explained_variance, rtol=1e-6)


def test_dask_fit_on_a_local_cluster_equals_in_memory():
    da = require("dask.array")
    distributed = require("dask.distributed")
    rows = _rows(np.random.default_rng(3), count=24 * 10)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        lazy = da.from_array(rows, chunks=(48, 24))
        got = eigen.fit(lazy, rank=4, center="position")
    ref = eigen.fit(rows, rank=4, center="position")
    assert np.allclose(got.components, ref.components, atol=1e-8)
    assert np.allclose(got.position_mean, ref.position_mean)
    with pytest.raises(ShapeError, match="whole windows"):
        eigen.fit(da.from_array(rows, chunks=(50, 24)), center="position")


def test_fit_rejects_bad_input():
    with pytest.raises(ShapeError):
        eigen.fit(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        eigen.fit(np.zeros((1, 4)))
    with pytest.raises(ShapeError, match="columns"):
        eigen.fit(iter([np.zeros((3, 4)), np.zeros((3, 5))]))
    with pytest.raises(ValueError, match="rank"):
        eigen.fit(np.ones((5, 4)), rank=7)
    with pytest.raises(ValueError, match="method"):
        eigen.fit(np.ones((5, 4)), method="qr")


# --- overlap, columns -----------------------------------------------------------------


def test_overlap_is_one_for_the_same_basis_and_chance_for_unrelated_ones():
    rng = np.random.default_rng(4)
    b = eigen.fit(_rows(rng, n=60, rank=6), rank=6)
    assert np.isclose(eigen.overlap(b, b), 1.0)
    assert np.allclose(eigen.principal_angles(b, b), 0.0, atol=1e-6)
    # Independent random subspaces of R^60 of rank 6: E overlap = r/n = 0.1.
    values = [eigen.overlap(eigen.fit(rng.standard_normal((200, 60)), rank=6),
                            eigen.fit(rng.standard_normal((200, 60)), rank=6)) for _ in range(10)]
    assert abs(np.mean(values) - 0.1) < 0.03
    with pytest.raises(ShapeError):
        eigen.overlap(b, eigen.fit(rng.standard_normal((10, 8))))


@pytest.mark.parametrize("method", eigen.COLUMN_METHODS)
def test_select_columns_gives_distinct_sorted_indices(method):
    b = eigen.fit(_rows(np.random.default_rng(5)), rank=5)
    for m in (5, 9, 24):
        cols = eigen.select_columns(b, m, method=method, seed=1)
        assert len(cols) == m == len(np.unique(cols)) and np.all(np.diff(cols) > 0)
        assert cols.min() >= 0 and cols.max() < 24
    with pytest.raises(ValueError, match="rank"):
        eigen.select_columns(b, 4, method=method)


def test_qdeim_keeps_the_deim_constant_small():
    b = eigen.fit(_rows(np.random.default_rng(6), n=40, rank=6), rank=6)
    q = bounds.deim_constant(b, eigen.select_columns(b, 6))
    first = bounds.deim_constant(b, eigen.select_columns(b, 6, method="first"))
    assert q <= first and q < np.sqrt(6 * 34 + 1) * 2  # Q-DEIM's guarantee, sqrt(n - r + 1) * const


# --- attention ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_columns_give_exact_attention(backend):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng)
    b = eigen.fit(eigen.score_rows(q.reshape(-1, 20, 6), k.reshape(-1, 20, 6)), rank=4)
    mask = rng.random((2, 20)) > 0.3
    for est in eigen.ESTIMATORS:
        out = eigen.attention(q, k, v, basis=b, columns=np.arange(20), estimator=est, backend=backend,
                              key_padding_mask=mask, is_causal=True)
        ref = dense_attention(q, k, v, mask=mask[:, None, None, :], is_causal=True)
        assert rel_error(out, ref) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_in_an_affine_subspace_are_reconstructed_exactly(backend):
    """Keys built so that every score row lies in one rank-r affine subspace."""
    rng = np.random.default_rng(8)
    n, d, r = 30, 5, 4
    k = rng.standard_normal((n, d))
    k[:, -1] = 1.0  # q_d = const adds the same shift to every row: an affine offset
    def queries(count):
        q = rng.standard_normal((count, d))
        q[:, r:] = 0.7  # only r free coordinates (+ the constant): rows mean + span(r)
        return q
    rows = queries(500) @ k.T / np.sqrt(d)
    b = eigen.fit(rows, rank=r)
    cols = eigen.select_columns(b, r)
    q = queries(n)
    v = rng.standard_normal((n, 3))
    out = eigen.attention(q, k, v, basis=b, columns=cols, estimator="deim", backend=backend)
    assert rel_error(out, dense_attention(q, k, v)) < 1e-10
    s, _ = naive.reconstruct(_canon(q, k, v), make_plan(b, cols, estimator="deim"), 0)
    assert np.allclose(s, q @ k.T / np.sqrt(d), atol=1e-10)


def _canon(q, k, v, **kw):
    from mcattn._validate import prepare_attention

    return prepare_attention(q, k, v, **kw)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("per_query", [0, 5])
@pytest.mark.parametrize("estimator", ["conditional", "deim"])
def test_numba_matches_the_reference(dtype, tol, per_query, estimator):
    rng = np.random.default_rng(9)
    q, k, v = (x.astype(dtype) for x in _qkv(rng, (2, 3, 17, 6)))
    bases = eigen.fit_heads(q, k, rank=5, center="position")
    kw = dict(basis=bases, columns=np.array([0, 3, 5, 8, 11, 16]), per_query=per_query,
              estimator=estimator)
    masks = [{}, {"is_causal": True}, {"key_padding_mask": rng.random((2, 17)) > 0.4},
             {"attn_mask": rng.standard_normal((17, 17)).astype(dtype)}]
    for extra in masks:
        ref = eigen.attention(*(x.astype(np.float64) for x in (q, k, v)), backend="numpy",
                              **kw, **{n: (a.astype(np.float64) if hasattr(a, "dtype") and
                                           a.dtype.kind == "f" else a) for n, a in extra.items()})
        out = eigen.attention(q, k, v, backend="numba", **kw, **extra)
        assert out.dtype == dtype
        assert rel_error(out, ref) < tol, extra


def test_n_equals_one_and_fully_masked_rows():
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, (4, 1, 3))
    b = eigen.fit(rng.standard_normal((10, 1)), rank=1)
    for backend in BACKENDS:
        out = eigen.attention(q, k, v, basis=b, columns=np.array([0]), backend=backend)
        assert np.allclose(out, v)  # one key: softmax weight 1
    q, k, v = _qkv(rng, (2, 8, 4))
    b = eigen.fit(rng.standard_normal((30, 8)), rank=2)
    mask = np.ones((2, 8), bool)
    mask[1] = False
    for backend in BACKENDS:
        out = eigen.attention(q, k, v, basis=b, columns=4, key_padding_mask=mask, backend=backend)
        assert np.all(out[1] == 0) and np.isfinite(out).all()


def test_bad_input_gets_clear_errors():
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, (20, 6))
    b = eigen.fit(eigen.score_rows(q, k), rank=5)
    with pytest.raises(ValueError, match="at least rank"):
        eigen.attention(q, k, v, basis=b, columns=np.arange(4), estimator="deim")
    with pytest.raises(ValueError, match="between the rank"):
        eigen.attention(q, k, v, basis=b, columns=3)
    with pytest.raises(ValueError, match="distinct"):
        eigen.attention(q, k, v, basis=b, columns=np.array([0, 1, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        eigen.attention(q, k, v, basis=b, columns=np.array([0, 1, 2, 3, 4, 20]))
    other = eigen.fit(rng.standard_normal((30, 12)), rank=5)
    with pytest.raises(ShapeError, match="12 keys"):
        eigen.attention(q, k, v, basis=other, columns=6)
    with pytest.raises(ShapeError, match="per-head"):
        eigen.attention(q, k, v, basis=[b, b], columns=6)
    with pytest.raises(ValueError, match="estimator"):
        eigen.attention(q, k, v, basis=b, columns=6, estimator="kriging")


def test_info_counts_show_when_work_is_saved():
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, (2, 128, 64))
    b = eigen.fit(eigen.score_rows(q, k), rank=8)
    _, small = eigen.attention(q, k, v, basis=b, columns=16, per_query=8, return_info=True)
    assert small.partial_score_macs == 2 * 128 * 16 * 64
    assert small.reconstruction_macs == 2 * 128 * 8 * 128
    assert small.partial_score_macs + small.reconstruction_macs < small.dense_score_macs
    assert small.ops.total < small.dense_ops.total
    _, big = eigen.attention(q, k, v, basis=b, columns=96, per_query=32, return_info=True)
    assert big.partial_score_macs + big.reconstruction_macs > big.dense_score_macs


# --- bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["deim", "conditional"])
def test_row_bound_holds_on_every_real_row(real_rows, estimator):
    fit_rows, test_rows = real_rows
    b = eigen.fit(fit_rows, rank=12, center="position")
    for m in (12, 20, 40):
        cols = eigen.select_columns(b, m)
        plan = make_plan(b, cols, estimator=estimator)
        rec = np.stack([(plan.base[0] + test_rows[w * 48:(w + 1) * 48][:, cols] @ plan.weights[0])
                        for w in range(len(test_rows) // 48)]).reshape(-1, 48)
        rec[:, cols] = test_rows[:, cols]
        err = np.linalg.norm(rec - test_rows, axis=1)
        bound = bounds.row_error_bound(b, cols, test_rows, estimator=estimator)
        assert np.all(err <= bound * (1 + 1e-9) + 1e-9)
        assert np.mean(err / bound) > 0.05  # not vacuous


def test_softmax_and_output_bounds_hold():
    rng = np.random.default_rng(13)
    for _ in range(200):
        n = rng.integers(2, 30)
        a = rng.standard_normal(n) * rng.uniform(0.1, 5)
        delta = rng.standard_normal(n) * rng.uniform(0.01, 3)
        v = rng.standard_normal((n, 4))
        p = np.exp(a - a.max())
        p /= p.sum()
        ph = np.exp(a + delta - (a + delta).max())
        ph /= ph.sum()
        norm = np.linalg.norm(delta)
        assert np.abs(ph - p).sum() <= bounds.probability_error_bound(norm) + 1e-12
        assert np.linalg.norm((ph - p) @ v) <= bounds.output_error_bound(norm, v)[0] + 1e-12


def test_expected_error_and_inverses(real_rows):
    fit_rows, test_rows = real_rows
    b = eigen.fit(fit_rows, center="position")
    cols = eigen.select_columns(b, 24, rank=12)
    rms_bound = bounds.expected_row_error(b, cols, 12)
    in_sample = bounds.row_error_bound(b, cols, fit_rows, 12)
    assert np.sqrt(np.mean(in_sample**2)) <= rms_bound * (1 + 1e-9)
    r = bounds.rank_for_target(b, 24, rms_bound)
    assert r is not None and r <= 12
    assert bounds.expected_row_error(b, eigen.select_columns(b, 24, rank=r), r) <= rms_bound
    m = bounds.columns_for_target(b, rms_bound, rank=12)
    assert m is not None and m <= 24

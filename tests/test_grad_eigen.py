"""eigen's backward (mcattn/eigen/grad.py): the training forward is eigen's forward, gradients
pass float64 gradcheck in every estimator / per-query / mask mode, equal autograd of an
independent reference on real attention, and flow through JAX, TensorFlow and a model."""

import numpy as np
import pytest
from helpers import rel_error, require

from mcattn import eigen
from mcattn.eigen import grad

ESTIMATORS = [("conditional", None), ("conditional", 0), ("deim", 0), ("deim", 2)]


def _bases(rng, heads, n, d, center="position", rank=3):
    return eigen.fit_heads(rng.standard_normal((6, heads, n, d)), rng.standard_normal((6, heads, n, d)),
                           rank=rank, center=center)


def _columns(estimator, per_query, n):
    """An int budget (Q-DEIM fixed columns + per-query ones) or explicit fixed columns."""
    if per_query is None:
        return 5  # an eighth fixed, the rest per query
    return np.array([0, 3, 5, 7]) if estimator == "deim" else np.array([1, 4, n - 1])


def _masks(rng, batch, n):
    attn = rng.random((batch, 1, n, n)) > 0.3
    attn[..., 0] = True
    kpm = np.ones((batch, n), bool)
    kpm[-1, n - 3:] = False
    return [{}, {"is_causal": True}, {"attn_mask": attn}, {"attn_mask": np.where(attn, 0.4, -np.inf)},
            {"key_padding_mask": kpm}, {"attn_mask": attn, "is_causal": True}]


@pytest.mark.parametrize("estimator,per_query", ESTIMATORS)
@pytest.mark.parametrize("center", ["position", True])
def test_training_forward_is_eigens_forward(estimator, per_query, center):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 12, 4)) for _ in range(3))
    bases = _bases(rng, 2, 12, 4, center, rank=4)
    for extra in _masks(rng, 2, 12):
        kw = dict(basis=bases, columns=_columns(estimator, per_query, 12), per_query=per_query,
                  estimator=estimator, **extra)
        out, (chosen,) = grad.forward(q, k, v, **kw)
        assert chosen.shape[-1] == grad.make_plan(bases, kw["columns"], per_query=per_query,
                                                  estimator=estimator).per_query
        for backend in ("numpy", "numba"):
            assert np.abs(out - eigen.attention(q, k, v, backend=backend, **kw)).max() < 1e-13


@pytest.mark.parametrize("estimator,per_query", ESTIMATORS)
def test_torch_gradcheck_float64(estimator, per_query):
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    rng = np.random.default_rng(1)
    n = 10
    bases = _bases(rng, 2, n, 3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, s, generator=g, dtype=torch.float64).requires_grad_(True)
               for s in (3, 3, 2))
    cols = _columns(estimator, per_query, n)
    for extra in _masks(rng, 2, n):
        extra = {name: torch.tensor(m) if isinstance(m, np.ndarray) else m for name, m in extra.items()}

        def f(a, b, c, extra=extra):
            return attention(a, b, c, method="eigen", basis=bases, columns=cols, per_query=per_query,
                             estimator=estimator, **extra)

        assert torch.autograd.gradcheck(f, (q, k, v)), extra
    # one basis for all rows, keys and values broadcast over the heads
    plain = _bases(rng, 1, n, 3, center=True)[0]
    kb, vb = (t[:, :1].detach().clone().requires_grad_(True) for t in (k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, method="eigen", basis=plain, columns=cols, per_query=per_query,
                                  estimator=estimator), (q, kb, vb))


def _torch_reference(q, k, v, plan, chosen, scale, kpm=None):
    """Independent of mcattn's code: the whole score matrix, the reconstructed entries
    replaced where eigen computes them (fixed and chosen columns), softmax, @ v."""
    torch = require("torch")
    full = q @ k.transpose(-1, -2) * scale  # [B, H, N, N]
    b, h, n, _ = full.shape
    cols = torch.tensor(plan.columns)  # [H, m]
    a_s = torch.gather(full, -1, cols[None, :, None, :].expand(b, h, n, -1))
    rec = torch.tensor(plan.base)[None, :, :n] + a_s @ torch.tensor(plan.weights)[None]
    computed = torch.zeros(b, h, n, n, dtype=torch.bool)
    computed[:, torch.arange(h)[:, None], :, cols] = True
    c = torch.tensor(chosen).reshape(b, h, n, -1)
    bi, hi, ii, pi = torch.nonzero(c >= 0, as_tuple=True)
    computed[bi, hi, ii, c[bi, hi, ii, pi]] = True
    s = torch.where(computed, full, rec)
    if kpm is not None:
        s = s.masked_fill(~torch.tensor(kpm)[:, None, None, :], -torch.inf)
    return torch.softmax(s, -1) @ v


def test_real_attention_backward_equals_autograd_of_a_reference():
    """Layer 1 of the embedded MiniLM sample, per-head position-centred bases fitted on the
    other sequences of the same length class; our backward = autograd of the reference."""
    torch = require("torch")
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (np.asarray(a[1], np.float64) for a in (s.q, s.k, s.v))  # [8, 12, 122, 32]
    kpm = np.asarray(s.key_padding_mask)
    bases = eigen.fit_heads(q[:4], k[:4], rank=16, center=True, scale=s.scale)
    rows = slice(4, 6)
    q, k, v, kpm = q[rows], k[rows], v[rows], kpm[rows]
    plan = eigen.make_plan(bases, 32)  # 4 fixed (Q-DEIM) columns, 28 chosen per query
    kw = dict(basis=bases, columns=plan, key_padding_mask=kpm, scale=s.scale)
    out, res = grad.forward(q, k, v, **kw)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    ours = grad.backward(q, k, v, out, res, dout, **kw)
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    ref = _torch_reference(qt, kt, vt, plan, res[0], s.scale, kpm)
    assert rel_error(out, ref.detach().numpy()) < 1e-12
    (ref * torch.tensor(dout)).sum().backward()
    for name, t in (("q", qt), ("k", kt), ("v", vt)):
        assert rel_error(ours[name], t.grad.numpy()) < 1e-10, name


def _small_problem():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 10, 3)) for _ in range(3))
    bases = _bases(rng, 2, 10, 3)
    kw = dict(basis=bases, columns=np.array([1, 4, 9]), per_query=2)
    _, (chosen,) = grad.forward(q, k, v, **kw)
    plan = eigen.make_plan(bases, kw["columns"], per_query=2)
    computed = np.zeros((1, 2, 10, 10), bool)
    computed[:, np.arange(2)[:, None], :, plan.columns] = True
    c = chosen.reshape(1, 2, 10, 2)
    b_i, h_i, i_i, p_i = np.nonzero(c >= 0)
    computed[b_i, h_i, i_i, c[b_i, h_i, i_i, p_i]] = True
    dout = rng.standard_normal((1, 2, 10, 3))
    return q, k, v, kw, plan, computed, dout


def test_jax_gradients_against_a_jax_reference():
    jax = require("jax")
    import jax.numpy as jnp

    from mcattn.frameworks.jax import attention

    jax.config.update("jax_enable_x64", True)
    try:
        q, k, v, kw, plan, computed, dout = _small_problem()
        scale = 1 / np.sqrt(3)

        def reference(q, k, v):
            full = q @ jnp.swapaxes(k, -1, -2) * scale
            a_s = jnp.take_along_axis(full, jnp.asarray(plan.columns)[None, :, None, :], -1)
            rec = plan.base[None] + a_s @ plan.weights[None]
            return jax.nn.softmax(jnp.where(computed, full, rec), -1) @ v

        loss = lambda f: lambda *a: (f(*a) * dout).sum()  # noqa: E731
        args = tuple(jnp.asarray(a) for a in (q, k, v))
        ours = lambda *a: attention(*a, method="eigen", **kw)  # noqa: E731
        got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(*args)
        ref = jax.grad(loss(reference), argnums=(0, 1, 2))(*args)
        for a, r in zip(got, ref):
            assert a.shape == r.shape and float(jnp.abs(a - r).max()) < 1e-10
    finally:
        jax.config.update("jax_enable_x64", False)


def test_tensorflow_gradients_against_a_tensorflow_reference():
    tf = require("tensorflow")
    from mcattn.frameworks.tensorflow import attention

    q, k, v, kw, plan, computed, dout = _small_problem()
    args = [tf.constant(a) for a in (q, k, v)]
    scale = 1 / np.sqrt(3)

    def reference(q, k, v):
        full = tf.matmul(q, k, transpose_b=True) * scale
        a_s = tf.gather(full, plan.columns, axis=-1, batch_dims=0)  # [B, H, N, H, m]
        a_s = tf.stack([a_s[:, h, :, h] for h in range(2)], 1)
        rec = plan.base[None] + tf.matmul(a_s, plan.weights[None])
        return tf.matmul(tf.nn.softmax(tf.where(computed, full, rec), -1), v)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(fn(*args) * dout)
        return tape.gradient(loss, args)

    got = grads(lambda *a: attention(*a, method="eigen", **kw))
    ref = grads(reference)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and float(tf.reduce_max(tf.abs(a - r))) < 1e-10


@pytest.mark.slow
def test_gradients_reach_a_real_models_weights_through_use_method():
    torch = require("torch")
    from mcattn.frameworks.torch import use_method
    from mcattn.studies.eigen.realdata import load_minilm

    model = load_minilm()
    bert = model[0].auto_model.eval()
    batch = model.tokenizer(["a gripping , funny and moving film about the sea .",
                             "the central bank raised rates again this spring ."], padding=True,
                            return_tensors="pt")
    weight = bert.encoder.layer[2].attention.self.query.weight

    def step():
        bert.zero_grad()
        out = bert(**batch).last_hidden_state
        (out ** 2).mean().backward()
        return weight.grad.clone(), out.detach()

    reference, ref_out = step()
    with use_method(bert, "eigen", num_columns=200):  # n <= num_columns: exact attention
        exact, _ = step()
    assert (exact - reference).norm() / reference.norm() < 1e-4
    with use_method(bert, "eigen", num_columns=6):
        ours, out = step()
        with torch.no_grad():
            plain = bert(**batch).last_hidden_state
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    assert (out - plain).abs().max() < 1e-5  # the training forward is the inference forward
    assert not torch.equal(out, ref_out)  # and eigen did run

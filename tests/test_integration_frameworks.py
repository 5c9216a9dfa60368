"""The adapters inside real framework code: ``use_method`` blocks that do not interfere
(two models, nested blocks, threads, exceptions, shared configs), and gradients that are
first order only and say so when differentiated again (torch, JAX, TensorFlow)."""

import copy
import threading

import numpy as np
import pytest
from helpers import require

from mcattn.errors import GradientNotSupportedError
from mcattn.registry import get_method, method_names

RFA = {"num_features": 8, "seed": 0}
#: Every method with a backward (a new one fails below until ``_problem`` gives its knobs).
TRAINED = [name for name in method_names() if get_method(name).grad is not None]


# ---------------------------------------------------------------- use_method


def _tiny_bert(seed=0, config=None, attn_implementation="sdpa"):
    """A random-weight two-layer BertModel (eval mode) and its config."""
    torch = require("torch")
    transformers = require("transformers")
    if config is None:
        config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                         intermediate_size=64, vocab_size=100,
                                         attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def batch():
    torch = require("torch")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding: the mask reaches the attention function
    return {"input_ids": ids, "attention_mask": mask}


def _run(model, batch):
    torch = require("torch")
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _gap(a, b):
    return float((a - b).abs().max())


def _registered():
    """The mcattn names registered with transformers (attention and mask functions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return [n for i in (AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS) for n in i._global_mapping
            if n.startswith("mcattn")]


@pytest.fixture(scope="module")
def models(batch):
    """``m``, its deep copy ``m2``, and each model's output with its own attention, with
    mcattn's exact alone and with rfa alone."""
    from mcattn.frameworks.torch import use_method

    m = _tiny_bert()
    m2 = copy.deepcopy(m)
    ref = {"own": _run(m, batch)}
    with use_method(m, "exact"):
        ref["exact"] = _run(m, batch)
    with use_method(m2, "rfa", **RFA):
        ref["rfa"] = _run(m2, batch)
    assert _gap(ref["exact"], ref["own"]) < 1e-5  # mcattn's exact is the model's sdpa
    assert _gap(ref["rfa"], ref["exact"]) > 1e-4  # so the tests below can tell them apart
    return m, m2, ref


def test_use_method_two_models_at_once_each_run_their_own(models, batch):
    from mcattn.frameworks.torch import use_method

    m, m2, ref = models
    with use_method(m, "exact"), use_method(m2, "rfa", **RFA):
        assert _gap(_run(m, batch), ref["exact"]) < 1e-6
        assert _gap(_run(m2, batch), ref["rfa"]) < 1e-6
    assert m.config._attn_implementation == m2.config._attn_implementation == "sdpa"
    assert _gap(_run(m, batch), ref["own"]) == 0 and not _registered()


def test_use_method_nested_blocks_restore_the_outer_method(models, batch):
    from mcattn.frameworks.torch import use_method

    m, _, ref = models
    with use_method(m, "exact"):
        with use_method(m, "rfa", **RFA):
            assert _gap(_run(m, batch), ref["rfa"]) < 1e-6
        assert _gap(_run(m, batch), ref["exact"]) < 1e-6  # the outer block's own method again
        with use_method(m.encoder.layer[1], "rfa", **RFA):  # one layer: the other keeps exact
            one_layer = _run(m, batch)
    assert _gap(one_layer, ref["exact"]) > 1e-4 and _gap(one_layer, ref["rfa"]) > 1e-4
    assert m.config._attn_implementation == "sdpa" and not _registered()


def test_use_method_restores_after_an_exception(models, batch):
    from mcattn.frameworks.torch import use_method

    m, _, ref = models
    with use_method(m, "exact"):
        with pytest.raises(RuntimeError, match="inside"):
            with use_method(m, "rfa", **RFA):
                raise RuntimeError("inside the block")
        assert _gap(_run(m, batch), ref["exact"]) < 1e-6
    with pytest.raises(RuntimeError, match="inside"):
        with use_method(m, "rfa", **RFA):
            raise RuntimeError("inside the block")
    assert m.config._attn_implementation == "sdpa" and not _registered()
    assert _gap(_run(m, batch), ref["own"]) == 0


def test_use_method_two_models_in_two_threads(models, batch):
    from mcattn.frameworks.torch import use_method

    m, m2, ref = models
    barrier = threading.Barrier(2, timeout=60)
    outputs, failures = {}, []

    def work(model, method, options, key):
        try:
            with use_method(model, method, **options):
                barrier.wait()  # both blocks are open now
                outputs[key] = [_run(model, batch) for _ in range(3)]
                barrier.wait()
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(m, "exact", {}, "exact")),
               threading.Thread(target=work, args=(m2, "rfa", RFA, "rfa"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for key in ("exact", "rfa"):
        assert all(_gap(out, ref[key]) < 1e-6 for out in outputs[key]), key
    assert m.config._attn_implementation == m2.config._attn_implementation == "sdpa"
    assert not _registered()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_use_method_leaves_a_model_sharing_the_config_alone(batch, implementation):
    """Two models built on one config object: a block on one does not reach the other."""
    from mcattn.frameworks.torch import use_method

    a = _tiny_bert(seed=0, attn_implementation=implementation)
    b = _tiny_bert(seed=1, config=a.config)
    assert a.config is b.config
    own = {"a": _run(a, batch), "b": _run(b, batch)}
    with use_method(b, "rfa", **RFA):
        assert _gap(_run(a, batch), own["a"]) < 1e-6  # a keeps its own attention
        b_rfa = _run(b, batch)
    with use_method(a, "exact"):
        a_exact = _run(a, batch)
    assert _gap(a_exact, own["a"]) < 1e-5 and _gap(b_rfa, own["b"]) > 1e-4
    with use_method(a, "exact"), use_method(b, "rfa", **RFA):
        assert _gap(_run(a, batch), a_exact) < 1e-6
        assert _gap(_run(b, batch), b_rfa) < 1e-6
    assert a.config._attn_implementation == implementation and not _registered()


def test_use_method_hooks_belong_to_their_block(models, batch):
    """mca's value-input hook: an inner block neither removes the outer block's hook nor
    deletes the input it keeps; the outer block cleans up."""
    from mcattn.frameworks.torch import use_method

    m, _, ref = models
    value = m.encoder.layer[0].attention.self.value
    with use_method(m, "mca", alpha=0.05, seed=0):
        outer = _run(m, batch)
        kept = value._mcattn_input
        for method, options in (("exact", {}), ("mca", {"alpha": 0.05, "seed": 0})):
            with use_method(m, method, **options):
                _run(m, batch)
            assert len(value._forward_pre_hooks) == 1 and value._mcattn_input is not None
        assert kept.shape == (2, 9, 32)
    assert not value._forward_pre_hooks and not hasattr(value, "_mcattn_input")
    assert _gap(outer, ref["exact"]) > 0 and not _registered()


# ---------------------------------------------------------------- second order


def _problem():
    """q, k, v ``[1, 2, 6, 4]`` float64 and the knobs of every method with a backward."""
    from mcattn import eigen

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 6, 4)) * 0.7 for _ in range(3))
    bases = eigen.fit_heads(rng.standard_normal((5, 2, 6, 4)), rng.standard_normal((5, 2, 6, 4)), rank=3)
    knobs = {"exact": {}, "rfa": dict(RFA), "eatt": {}, "latte": {"threshold": 0.5},
             "hybrid": {"threshold": 3, "block": 2},
             "eigen": {"basis": bases, "columns": np.array([1, 3, 5]), "per_query": 1},
             "mca": {"x": rng.standard_normal((1, 6, 8)), "w_v": rng.standard_normal((8, 8)),
                     "alpha": 1.0, "seed": 0}}
    return q, k, v, knobs


@pytest.mark.parametrize("method", TRAINED)
def test_torch_create_graph_gradients_refuse_a_second_backward(method):
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    q, k, v, knobs = _problem()
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tv = None if method == "mca" else tv
    inputs = [t for t in (tq, tk, tv) if t is not None]

    def loss():
        return (attention(tq, tk, tv, method=method, **knobs[method]) ** 2).sum()

    plain = torch.autograd.grad(loss(), inputs)
    graph = torch.autograd.grad(loss(), inputs, create_graph=True)
    for a, b in zip(graph, plain):
        assert a.requires_grad and torch.equal(a.detach(), b)  # first order: unchanged
    penalty = sum((g ** 2).sum() for g in graph)
    with pytest.raises(GradientNotSupportedError, match=f"method {method!r}: .*first order only"):
        penalty.backward()
    with pytest.raises(GradientNotSupportedError, match="first order only"):
        torch.autograd.grad(graph[0].sum(), tq)


@pytest.mark.parametrize("method", TRAINED)
def test_jax_second_order_raises(method):
    jax = require("jax")
    from mcattn.frameworks.jax import attention

    q, k, v, knobs = _problem()  # float32 in JAX (x64 is off)
    v = None if method == "mca" else v

    def loss(a):
        return (attention(a, k, v, method=method, **knobs[method]) ** 2).sum()

    assert np.all(np.isfinite(np.asarray(jax.grad(loss)(q))))  # first order works
    with pytest.raises(GradientNotSupportedError, match=f"method {method!r}: .*first order only"):
        jax.grad(lambda a: (jax.grad(loss)(a) ** 2).sum())(q)
    with pytest.raises(GradientNotSupportedError, match="first order only"):
        jax.jit(jax.grad(lambda a: jax.grad(loss)(a).sum()))(q)
    for forward_mode in (jax.hessian(loss), jax.jacfwd(loss), lambda a: jax.jvp(loss, (a,), (a,))):
        with pytest.raises(TypeError, match="forward-mode"):  # JAX's own error for custom_vjp
            forward_mode(q)


@pytest.mark.parametrize("method", TRAINED)
def test_tensorflow_nested_tape_raises(method):
    tf = require("tensorflow")
    from mcattn.frameworks.tensorflow import attention

    q, k, v, knobs = _problem()
    x = tf.constant(q)
    k, v = tf.constant(k), None if method == "mca" else tf.constant(v)

    def inner_gradient():
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(attention(x, k, v, method=method, **knobs[method]) ** 2)
        return inner.gradient(loss, x)

    first = inner_gradient()
    with tf.GradientTape() as outer:
        outer.watch(x)
        penalty = tf.reduce_sum(inner_gradient() ** 2)
    assert float(tf.reduce_max(tf.abs(first))) > 0
    with pytest.raises(GradientNotSupportedError, match=f"method {method!r}: .*first order only"):
        outer.gradient(penalty, x)

    def in_graph():
        with tf.GradientTape() as outer:
            outer.watch(x)
            penalty = tf.reduce_sum(inner_gradient() ** 2)
        return outer.gradient(penalty, x)

    with pytest.raises(GradientNotSupportedError, match="first order only"):
        tf.function(in_graph, autograph=False)()
    with pytest.raises(Exception, match="GradientNotSupportedError: .*first order only"):
        tf.function(in_graph)()  # autograph re-raises errors of tracing as its StagingError

"""A method is one spec: a toy method registered at run time is reachable everywhere a
built-in one is (``mcattn methods``, the front door, ``use_method``, selftest, compare,
the CUDA source list), and ``use_method`` runs every method in a BERT model that is not
the packaged one, with thresholds and bases calibrated on that model's own batch."""

import itertools

import numpy as np
import pytest
from helpers import dense_attention, rel_error, require

import mcattn
from mcattn import registry
from mcattn._plugin import Method
from mcattn.cli import main

CALLS = itertools.count()


def scaled_attention(q, k, v, *, factor=1.0, attn_mask=None, key_padding_mask=None, is_causal=False,
                     scale=None, backend=None, check_finite=True, return_info=False):
    """A toy seventh method: exact attention times ``factor``."""
    next(CALLS)
    out = mcattn.attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           is_causal=is_causal, scale=scale, backend=backend, check_finite=check_finite,
                           return_info=return_info)
    if return_info:
        out, info = out
        return out * factor, info
    return out * factor


TOY = Method(name="scaled", description="exact attention times a factor (a test's toy method)",
             attention=scaled_attention, knobs_for=lambda rng, heads, nk, dv: {"factor": 0.5})


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


def test_the_toy_method_is_listed_and_runs_through_the_front_door(toy, capsys):
    assert "scaled" in [m.name for m in mcattn.methods()]
    assert main(["methods"]) == 0
    assert "scaled" in capsys.readouterr().out and "factor=1.0" in str(mcattn.methods()[-1])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 11, 8)) for _ in range(3))
    out = mcattn.attention(q, k, v, method="scaled", factor=2.0, is_causal=True)
    assert rel_error(out, 2.0 * dense_attention(q, k, v, is_causal=True)) < 1e-12
    with pytest.raises(TypeError, match="takes no knob 'alpha'"):
        mcattn.attention(q, k, v, method="scaled", alpha=0.1)
    registry.unregister("scaled")
    with pytest.raises(ValueError, match="unknown method 'scaled'"):
        mcattn.attention(q, k, v, method="scaled")


def test_the_toy_method_runs_in_selftest_and_compare(toy):
    from mcattn.selftest import run_selftest
    from mcattn.studies.compare import run_comparison
    from mcattn.studies.data import load_sample

    rows = run_selftest(["numpy", "numba"], ["scaled"])
    assert [r.status for r in rows] == ["pass"] * 4
    rows = run_comparison(load_sample(), ["scaled"], repeats=1, layers=[0])
    toy_rows = [r for r in rows if r.method == "scaled"]
    assert len(toy_rows) == 1 and toy_rows[0].error_median == pytest.approx(0.0, abs=1e-6)


def test_the_toy_methods_compare_entry_is_found_by_the_registry(toy, monkeypatch):
    """A plug-in with a comparison entry of its own: its sweep runs with no CLI edit."""
    import sys
    import types

    from mcattn.studies import entries
    from mcattn.studies.compare import run_comparison
    from mcattn.studies.data import load_sample
    from mcattn.studies.entries import MethodEntry, Trial

    def run(inputs, value, seed):
        out, info = scaled_attention(inputs.q, inputs.k, inputs.v, factor=1 + value,
                                     key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                                     return_info=True)
        return Trial(out=out, info=info, bound=value)

    module = types.ModuleType("toy_study")
    module.ENTRY = MethodEntry(name="scaled", knob="eps", values=(0.0, 0.1), run=run)
    monkeypatch.setitem(sys.modules, "toy_study", module)
    monkeypatch.setitem(entries.METHOD_ENTRIES, "scaled", "toy_study:ENTRY")
    rows = run_comparison(load_sample(), ["scaled"], repeats=1, layers=[0, 1])
    got = {r.value: r for r in rows if r.method == "scaled"}
    assert got[0.0].error_median == pytest.approx(0.0, abs=1e-6)
    assert got[0.1].error_median == pytest.approx(0.1, rel=1e-4)  # ||0.1 O|| / ||O||


def test_built_in_names_cannot_be_replaced_and_only_methods_register():
    with pytest.raises(ValueError, match="built-in"):
        registry.register(Method(name="exact", description="", attention=scaled_attention))
    with pytest.raises(TypeError, match="Method"):
        registry.register("scaled")


def test_kernel_sources_come_from_the_specs():
    from mcattn import _cupy

    sources = _cupy.kernel_sources()
    assert set(_cupy.SHARED_SOURCES) <= set(sources)
    for name in registry.method_names():
        for path, kernels in registry.get_method(name).kernel_sources.items():
            assert sources[path] == kernels and _cupy.kernel_path(path).is_file()
    assert "exact/kernels/exact.cu" in sources and "eigen/kernels/eigen.cu" in sources


def test_no_engine_names_a_method():
    """front, use_method, selftest, the autograd adapters, the CUDA source list and the
    studies' engines (compare, evaluate, energy, finetune) read the specs and the entries:
    none of them spells a method's name in code (docstrings and comments aside)."""
    import ast
    import pathlib

    root = pathlib.Path(mcattn.__file__).parent
    names = set(registry.method_names())
    for rel in ("front.py", "selftest.py", "_cupy.py", "_dask.py", "frameworks/torch.py",
                "frameworks/_grad.py", "frameworks/jax.py", "frameworks/tensorflow.py", "cli.py",
                "studies/compare.py", "studies/evaluate.py", "studies/energy.py",
                "studies/finetune.py"):
        tree = ast.parse((root / rel).read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names
                 and id(n) not in docstrings]
        # "exact": the adapters fall back to exact attention by name (the baseline, not a plug-in)
        assert set(named) <= {"exact"}, (rel, named)


# --------------------------------------------------- use_method on another BERT


def _bert(seed=0):
    """A random-weight BertModel unlike the packaged one: hidden 64, 4 heads, 3 layers."""
    torch = require("torch")
    transformers = require("transformers")
    config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                     intermediate_size=128, vocab_size=200, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def _batch(seed, n=24):
    torch = require("torch")
    ids = torch.randint(0, 200, (3, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, n, dtype=torch.long)
    mask[2, n - 5:] = 0  # padding reaches the method (and the calibration)
    return {"input_ids": ids, "attention_mask": mask}


#: use_method options per method on this model; the calibrated ones fit on ``calibration``.
MODEL_OPTIONS = {
    "exact": {},
    "mca": {"alpha": 0.3, "seed": 0},
    "rfa": {"num_features": 64, "seed": 0},
    "eatt": {"alignment": "l1"},
    "latte": {"target_mass": 0.95},
    "eigen": {"num_columns": 8},
    "hybrid": {"target_keep": 0.25},
}
#: Largest relative error of the last hidden state against the model's own attention
#: (eatt is a different attention function, not an approximation: only finite).
MAX_ERROR = {"exact": 1e-5, "mca": 0.5, "rfa": 0.5, "eatt": None, "latte": 0.2, "eigen": 0.5,
             "hybrid": 0.2}


def test_every_registered_method_has_model_options():
    assert set(registry.method_names()) <= set(MODEL_OPTIONS)


@pytest.fixture(scope="module")
def bert():
    torch = require("torch")
    model = _bert()
    with torch.no_grad():
        ref = model(**_batch(1)).last_hidden_state
    return model, ref


@pytest.mark.parametrize("method", list(MODEL_OPTIONS))
def test_use_method_runs_every_method_in_another_bert(bert, method):
    torch = require("torch")
    from mcattn.frameworks.torch import use_method

    model, ref = bert
    options = dict(MODEL_OPTIONS[method])
    if (registry.get_method(method).model or None) and registry.get_method(method).model.calibrate:
        options["calibration"] = _batch(2)  # another batch of the same model
    with torch.no_grad(), use_method(model, method, **options):
        out = model(**_batch(1)).last_hidden_state
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    err = rel_error(out.numpy(), ref.numpy())
    if MAX_ERROR[method] is not None:
        assert err < MAX_ERROR[method], (method, err)
    if method != "exact":
        assert err > 1e-6, (method, err)  # the method ran, not exact attention


def _layer_inputs(model, batch):
    """The exact q, k and key mask of every self-attention layer of ``model`` on ``batch``."""
    torch = require("torch")
    from mcattn.frameworks.torch import use_method

    seen = []

    def record(q, k, v, *, method, attn_mask=None, scale=None, **kw):
        seen.append((q.numpy().astype(np.float64), k.numpy().astype(np.float64),
                     attn_mask[:, 0].any(-2).numpy(), scale))
        return original(q, k, v, method=method, attn_mask=attn_mask, scale=scale, **kw)

    import mcattn.frameworks.torch as adapter

    original = adapter.attention
    adapter.attention = record
    try:
        with torch.no_grad(), use_method(model, "exact"):
            model(**batch)
    finally:
        adapter.attention = original
    return seen


def test_latte_thresholds_are_fitted_on_the_calibration_batch(bert, monkeypatch):
    """The thresholds each layer runs with are mcattn.latte.calibrate on that layer's own
    attention of the calibration batch: a float64 reference from captured q, k."""
    torch = require("torch")
    import mcattn.frameworks.torch as adapter
    from mcattn import latte
    from mcattn.frameworks.torch import use_method

    model, _ = bert
    expected = [latte.calibrate(q, k, target_mass=0.95, key_padding_mask=kpm, scale=s)
                for q, k, kpm, s in _layer_inputs(model, _batch(2))]
    used = []
    original = adapter.attention

    def spy(q, k, v, *, method, **kw):
        if method == "latte":
            used.append(np.asarray(kw["threshold"], dtype=np.float64))
        return original(q, k, v, method=method, **kw)

    monkeypatch.setattr(adapter, "attention", spy)
    with torch.no_grad(), use_method(model, "latte", target_mass=0.95, calibration=_batch(2)):
        model(**_batch(1))
        model(**_batch(3))  # the same thresholds: calibrated once, before the block
    assert len(used) == 6
    for i, theta in enumerate(used):
        assert theta.shape == (4,)
        np.testing.assert_allclose(theta, expected[i % 3], rtol=1e-5, atol=1e-6)


def test_eigen_calibrates_per_length_and_on_the_first_batch_without_one(bert, monkeypatch):
    """Without a calibration batch, eigen fits each layer's bases on the first batch of each
    length; a callable calibration gives a batch per length."""
    torch = require("torch")
    from mcattn.frameworks.torch import use_method

    model, _ = bert
    b24, b32 = _batch(1, 24), _batch(1, 32)
    with torch.no_grad():
        ref24, ref32 = (model(**b).last_hidden_state.numpy() for b in (b24, b32))
        with use_method(model, "eigen", num_columns=8):  # fitted on the batch itself
            own24 = model(**b24).last_hidden_state.numpy()
            own32 = model(**b32).last_hidden_state.numpy()
        assert rel_error(own24, ref24) < 1e-3 and rel_error(own32, ref32) < 0.1
        lengths = []

        def calibration(n):
            lengths.append(n)
            return _batch(5, n)

        with use_method(model, "eigen", num_columns=8, calibration=calibration):
            other24 = model(**b24).last_hidden_state.numpy()
            model(**b24)
            model(**b32)
    assert lengths == [24, 32]  # one calibration run per new length, for every layer at once
    # another batch's bases: other bases, another approximation of the same attention
    assert rel_error(other24, own24) > 1e-5 and rel_error(other24, ref24) < 0.5


def test_use_method_says_what_it_does_not_support(bert):
    require("torch")
    from mcattn.frameworks.torch import use_method

    model, _ = bert
    with pytest.raises(TypeError, match="target_mass"):  # neither thresholds nor how to fit them
        with use_method(model, "latte"):
            pass
    with pytest.raises(TypeError, match="calibration= is for methods"):
        with use_method(model, "rfa", num_features=8, calibration=_batch(2)):
            pass
    with pytest.raises(TypeError, match="AttentionInterface"):
        with use_method(require("torch").nn.Linear(3, 3), "exact"):
            pass


def test_attention_dropout_is_named_not_silently_dropped():
    torch = require("torch")
    from mcattn.frameworks.torch import use_method

    model = _bert().train()
    with torch.no_grad(), use_method(model, "exact"), pytest.warns(RuntimeWarning, match="dropout"):
        model(**_batch(1))

"""mcattn.tune: the per-layer search, its plan, the unmeetable target, bad arguments, the CLI."""

import itertools
import json
import math

import numpy as np
import pytest
from helpers import require

from mcattn.plan import load_plan, save_plan
from mcattn.tuning import LayerOption, _lagrange_sequence, tune

GRID = {"latte": ("target_mass", (0.99, 0.9, 0.7)), "mca": ("alpha", (0.1, 0.4, 1.0))}


@pytest.fixture(scope="module")
def l3():
    require("torch")
    require("onnx")
    require("gensim")
    from mcattn.studies.models import load_model

    return load_model("paraphrase-MiniLM-L3-v2")


@pytest.fixture(scope="module")
def batches(l3):
    from mcattn.studies.tune import calibration_batches

    return calibration_batches(l3, 9, batch_size=4, max_length=64)


def _cosine(encoder, batches, plan=None):
    """Worst batch's mean cosine of the mean-pooled last states to exact, from scratch."""
    import torch

    from mcattn.frameworks.torch import use_method

    def pooled():
        out = []
        with torch.no_grad():
            for b in batches:
                h = encoder.bert(**b).last_hidden_state.double()
                m = b["attention_mask"].unsqueeze(-1).double()
                out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out)

    exact = pooled()
    with use_method(encoder.bert, plan=plan):
        got = pooled()
    cos = (got * exact).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(exact, axis=1)
    sizes = np.cumsum([len(b["input_ids"]) for b in batches])[:-1]
    return min(float(c.mean()) for c in np.split(cos, sizes))  # the worst batch's mean


@pytest.fixture(scope="module")
def tuned(l3, batches):
    return tune(l3.bert, batches, target=0.99, methods=["latte", "mca"], grid=GRID, name=l3.name)


def test_tuned_plan_meets_its_level_when_reapplied(l3, batches, tuned, tmp_path):
    assert tuned.met, tuned.message
    p = tuned.plan.predicted
    assert p["required"] == pytest.approx(1 - 0.01 * 0.75)
    assert 1 - tuned.chosen.loss >= p["required"]
    # the plan file (inline fitted thresholds) reproduces the search's measurement
    save_plan(tuned.plan, tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json")
    assert again == tuned.plan
    assert _cosine(l3, batches, again) == pytest.approx(1 - tuned.chosen.loss, abs=1e-9)
    # something cheaper than exact was chosen, and no uniform setting meeting the level is cheaper
    assert tuned.chosen.cost < tuned.exact_cost and p["cost_ratio"] < 1
    meeting = [t for t in tuned.tried if t.label.startswith("uniform") and t.meets]
    assert all(tuned.chosen.cost <= t.cost for t in meeting)
    assert tuned.uniform is None or tuned.uniform in meeting
    # every layer's choice is one of its measured options, with that option's fitted knobs
    for choice in again.layers:
        assert choice.method in ("exact", "latte", "mca")
        if choice.method == "latte":
            theta = choice.knobs["threshold"]
            assert theta.shape == (l3.bert.config.num_attention_heads,) and theta.dtype == np.float32


def test_costs_are_the_layers_measured_ops(l3, batches, tuned):
    """The exact cost of a layer is exact_ops + the dense value projection over real tokens."""
    import mcattn
    from mcattn.frameworks.torch import layer_inputs

    layer = layer_inputs(l3.bert, batches[0])[0]
    q, k, v = (layer[n].astype(np.float32) for n in ("q", "k", "v"))
    _, info = mcattn.attention(q, k, v, key_padding_mask=layer["key_padding_mask"], return_info=True)
    linear = l3.bert.encoder.layer[0].attention.self.value
    tokens = int(batches[0]["attention_mask"].sum())
    proj = tokens * linear.in_features * linear.out_features * 2 + tokens * linear.out_features
    first = info.ops.total + proj  # batch 0 of layer 0; the others add theirs
    total = sum(o.cost for o in tuned.layer_options if o.layer == 0 and o.candidate.method == "exact")
    assert first < total < first * (len(batches) + 1)
    assert all(o.cost > 0 and math.isfinite(o.loss) for o in tuned.layer_options)


def test_calibration_groups_are_documents_long_and_short_sentences(batches):
    from mcattn.studies.tune import calibration_groups

    docs, long, short = calibration_groups(30)
    assert (len(docs), len(long), len(short)) == (10, 10, 10)
    assert all(len(t.split()) >= 50 for t in docs) and all(len(t.split()) >= 13 for t in long)
    assert all(4 <= len(t.split()) <= 12 for t in short)
    assert len(set(docs + long + short)) == 30
    assert len(batches) == 3 and all(len(b["input_ids"]) == 3 for b in batches)  # kinds not mixed
    with pytest.raises(ValueError, match="must be in"):
        calibration_groups(2)


def test_a_sweep_stops_after_its_first_miss(tuned):
    stop = 0.01 * 0.75  # tune's stop_loss: the required level's loss
    for layer in range(3):
        for method, (_, values) in GRID.items():
            measured = [o for o in tuned.layer_options if o.layer == layer and o.candidate.method == method]
            assert [o.candidate.value for o in measured] == list(values[:len(measured)])
            misses = [i for i, o in enumerate(measured) if o.loss > stop]
            assert misses in ([], [len(measured) - 1])  # only the last measured one misses
            if not misses:
                assert len(measured) == len(values)


def test_lagrange_sequence_is_the_lower_hull():
    rng = np.random.default_rng(4)
    fronts = []
    for layer in range(3):
        loss = np.concatenate([[0.0], np.sort(rng.random(4))])
        cost = np.concatenate([[10.0], np.sort(rng.random(4) * 10)[::-1]])
        fronts.append([LayerOption(layer, None, {}, float(c), float(e)) for c, e in zip(cost, loss)])
    sequence = _lagrange_sequence(fronts)
    keys = {tuple(id(o) for o in p) for p in sequence}
    for lam in np.geomspace(1e-3, 1e3, 40):  # every lam's per-layer minimiser is in the sequence
        best = min(itertools.product(*fronts), key=lambda p: sum(o.cost + lam * o.loss for o in p))
        assert tuple(id(o) for o in best) in keys
    assert sequence[-1] == tuple(f[0] for f in fronts)  # all exact, the most expensive
    costs = [sum(o.cost for o in p) for p in sequence]
    assert costs == sorted(costs)


def test_unmeetable_target_returns_the_exact_plan(l3, batches):
    with pytest.warns(RuntimeWarning, match="returning the exact plan"):
        result = tune(l3.bert, batches, target=1.0, methods=["mca"], grid={"mca": ("alpha", (0.1,))})
    assert not result.met and "no plan of mca meets cosine min 1.0" in result.message
    assert [c.method for c in result.plan.layers] == ["exact"] * 3
    assert result.plan.predicted["cost_ratio"] == 1.0


def test_layer_bound_admits_only_methods_with_a_bound(l3, batches):
    # E-Att has no a-posteriori bound: under layer_bound nothing but exact is admitted
    with pytest.warns(RuntimeWarning, match="layer_bound 10.0 admitted 0 of 3 single-layer swaps"):
        result = tune(l3.bert, batches, target=0.5, methods=["eatt"], layer_bound=10.0,
                      grid={"eatt": ("alignment", ("hamming",))}, margin=0.0, objective="energy")
    assert not result.met and all(o.bound == math.inf for o in result.layer_options if o.candidate.knob)
    # latte's certified bound: the level admits the layers whose bound is within it, only those
    result = tune(l3.bert, batches, target=0.9, methods=["latte"], layer_bound=3.0, objective="energy",
                  grid={"latte": ("target_mass", (0.99, 0.5))})
    bounds = {(o.layer, o.candidate.value): o.bound for o in result.layer_options if o.candidate.knob}
    assert all(b > 0 for b in bounds.values())
    assert any(b <= 3.0 for b in bounds.values()) and any(b > 3.0 for b in bounds.values()), bounds
    chosen = [o for o in result.chosen.options if o.candidate.knob]
    assert result.met and chosen and all(o.bound <= 3.0 for o in chosen)


@pytest.mark.parametrize("kwargs, message", [
    (dict(metric="l2"), "metric must be one of cosine, token_error"),
    (dict(objective="flops"), "objective must be one of ops, energy, time"),
    (dict(target=1.5), r"a cosine target must be in \(0, 1\]"),
    (dict(target=float("nan")), "target must be a number"),
    (dict(metric="token_error", target=-0.1), "a token_error target must be >= 0"),
    (dict(margin=1.0), r"margin must be in \[0, 1\)"),
    (dict(layer_bound=0), "layer_bound must be > 0"),
    (dict(methods=["nope"]), "unknown method 'nope'"),
    (dict(methods=["eatt"]), "no knob grid for 'eatt'"),
    (dict(methods=["eigen"], grid={"eigen": ("num_columns", (16,))}), "one sequence length only"),
])
def test_bad_arguments_fail_before_any_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tune(None, [], **kwargs)  # no model is touched


def test_token_error_target_and_energy_objective(l3, batches):
    result = tune(l3.bert, batches, target=0.1, metric="token_error", objective="energy",
                  methods=["latte"], grid={"latte": ("target_mass", (0.9, 0.5))})
    assert result.met and result.plan.target == {"metric": "token_error", "max": 0.1}
    assert result.chosen.loss <= 0.075
    # in energy a latte layer (int4 estimate) is cheaper than the exact one
    exact = {o.layer: o.cost for o in result.layer_options if o.candidate.knob is None}
    assert all(o.cost < exact[o.layer] for o in result.layer_options if o.candidate.knob)


def test_on_call_reports_each_layer_call(l3, batches):
    import torch

    from mcattn.frameworks.torch import attention_modules, use_method

    calls = []
    with use_method(l3.bert, "latte", target_mass=0.9, on_call=calls.append), torch.no_grad():
        l3.bert(**batches[0])
    modules = attention_modules(l3.bert)
    assert [c.module for c in calls] == modules
    assert all(c.tokens == int(batches[0]["attention_mask"].sum()) and c.seconds > 0 for c in calls)
    assert all(c.info.method == "latte" and c.info.ops.total > 0 for c in calls)
    with pytest.raises(TypeError, match="on_call must be callable"):
        with use_method(l3.bert, "mca", on_call=3):
            pass


def test_cli_tune_then_evaluate_the_plan(l3, tmp_path, capsys):
    require("sklearn")
    from mcattn.cli import main

    out, fig, js = tmp_path / "plan.json", tmp_path / "pareto.png", tmp_path / "tune.json"
    status = main(["tune", "--model", "paraphrase-MiniLM-L3-v2", "--calibration-docs", "6",
                   "--target", "0.98", "--methods", "latte", "--grid", "latte:target_mass=0.9,0.7",
                   "--objective", "energy",
                   "--out", str(out), "--plot", str(fig), "--json", str(js), "--no-progress"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "held-out (250 texts): cosine" in text and "met" in text
    plan = load_plan(out)
    assert plan.measured["target_met"] and plan.measured["heldout_cosine"] >= 0.98
    assert fig.stat().st_size > 1000 and json.loads(js.read_text())["plan"]["model"] == plan.model
    assert main(["evaluate", "--plan", str(out), "--no-progress"]) == 0
    rows = capsys.readouterr().out
    assert "plan plan.json" in rows and "exact" in rows
    cos = float(rows.strip().splitlines()[-1].split()[-1])
    assert cos == pytest.approx(plan.measured["heldout_cosine"], abs=5e-5)


@pytest.mark.parametrize("argv, message", [
    (["tune", "--target", "2"], "--target: a cosine target must be in (0, 1]"),
    (["tune", "--grid", "mca:alpha"], "--grid: expected METHOD:KNOB=V1,V2"),
    (["tune", "--methods", "eigen"], "no knob grid for 'eigen'"),
    (["tune", "--out", "plan.txt"], "--out: 'plan.txt': expected a file name ending in one of .json"),
    (["evaluate", "--plan", "missing.json"], "--plan: cannot read plan file"),
])
def test_cli_refuses_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    from mcattn.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and message in err, err


def test_cli_refuses_a_plan_for_another_model(tmp_path, capsys):
    from mcattn.cli import main
    from mcattn.plan import Plan

    save_plan(Plan("bert-base", ()), tmp_path / "p.json")
    with pytest.raises(SystemExit):
        main(["evaluate", "--plan", str(tmp_path / "p.json")])
    assert "is for model 'bert-base'" in capsys.readouterr().err

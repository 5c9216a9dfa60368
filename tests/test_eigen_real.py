"""eigen on real models: the compare entry, the model adapter, the second (ONNX) model."""

import numpy as np
import pytest
from helpers import rel_error, require

from mcattn import eigen


def test_compare_entry_runs_on_the_embedded_sample():
    from mcattn.studies.compare import run_comparison
    from mcattn.studies.data import load_sample

    rows = run_comparison(load_sample(), ["eigen"], repeats=1, layers=[0])
    errors = {r.value: r.error_median for r in rows if r.method == "eigen"}
    assert set(errors) == {16, 32, 48, 64}
    assert errors[64] <= errors[16]


def test_onnx_second_model_has_the_l6_vocabulary_and_runs():
    require("onnx")
    from mcattn.studies.eigen.onnx_bert import NumpyBert, load_weights

    w = load_weights()
    assert w["embeddings.word_embeddings.weight"].shape == (30522, 384)
    for i in range(3):
        for name in ("query", "key", "value"):
            assert w[f"encoder.layer.{i}.attention.self.{name}.weight"].shape == (384, 384)
    hidden, qkv = NumpyBert(w)(np.array([[101, 7592, 2088, 102]]))
    assert hidden.shape == (1, 4, 384) and len(qkv) == 3 and qkv[0]["q"].shape == (1, 12, 4, 32)
    assert np.isfinite(hidden).all()


@pytest.mark.slow
def test_model_adapter_error_shrinks_with_columns():
    torch = require("torch")
    from mcattn.frameworks.torch import use_method
    from mcattn.studies.eigen.calibration import TextWindows
    from mcattn.studies.eigen.realdata import load_minilm

    model = load_minilm()
    bert = model[0].auto_model.eval()
    batch = model.tokenizer(["The quick brown fox jumps over the lazy dog near the old river bank "
                             "while the farmers watched from the hill above the valley."] * 2,
                            return_tensors="pt")
    text = TextWindows(model.tokenizer)  # held-out text: bases not fitted on the batch itself
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state.numpy()
        errs = []
        for m in (8, 16, 200):
            with use_method(bert, "eigen", num_columns=m, calibration=text):
                errs.append(rel_error(bert(**batch).last_hidden_state.numpy(), ref))
    assert errs[2] < 1e-5  # n <= num_columns: exact attention
    assert errs[1] <= errs[0] and errs[0] < 1.0


def test_fit_heads_and_plan_reuse():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 16, 4)) for _ in range(3))
    bases = eigen.fit_heads(q, k, rank=4, center=True)
    plan = eigen.make_plan(bases, 8)
    assert plan.num_fixed + plan.per_query == 8 and plan.per_query == 7
    a = eigen.attention(q, k, v, basis=bases, columns=plan)
    b = eigen.attention(q, k, v, basis=bases, columns=8)
    assert np.array_equal(a, b)

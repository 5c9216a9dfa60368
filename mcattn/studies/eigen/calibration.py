"""Held-out calibration text for eigen inside all-MiniLM-L6-v2 (``mcattn evaluate``,
``mcattn finetune``).

Eigen's bases describe score rows of one length, and a model sees batches of many
lengths, so ``use_method(model, "eigen", num_columns=m, calibration=...)`` fits the bases
of each layer per padded length ``N`` (:mod:`mcattn.eigen.spec`: rank ``min(24, N)``,
centred per query position). :class:`TextWindows` is the ``calibration`` the studies pass:
for a length ``N``, windows of ``N`` tokens of text the evaluation tasks never see
(gensim's ``head500.noblanks.cor``, stemmed Wikipedia), ``[CLS] ... [SEP]``, enough
windows for :data:`CALIBRATION_ROWS` score rows per head. The model runs them with exact
attention, so the bases come from the very model being evaluated.
"""

import math

import numpy as np

__all__ = ["TextWindows", "CALIBRATION_ROWS"]

#: Score rows per head and layer the bases of one length are fitted on.
CALIBRATION_ROWS = 2000


class TextWindows:
    """``calibration=`` for ``use_method``: ``length -> {"input_ids": [W, length]}``.

    Parameters
    ----------
    tokenizer : transformers tokenizer, optional
        all-MiniLM-L6-v2's (loaded from the packaged model when None).
    rows : int
        Score rows per head: ``ceil(rows / length)`` windows.
    """

    def __init__(self, tokenizer=None, rows=CALIBRATION_ROWS):
        self._tokenizer, self.rows, self._stream = tokenizer, int(rows), None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..evaluate import _load_model

            self._tokenizer = _load_model().tokenizer
        return self._tokenizer

    def stream(self):
        """The calibration text's token ids (without special tokens)."""
        if self._stream is None:
            from gensim.test.utils import datapath

            with open(datapath("head500.noblanks.cor"), encoding="latin-1") as fh:
                text = fh.read(400_000)
            self._stream = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._stream

    def __call__(self, length):
        import torch

        stream, tok = self.stream(), self.tokenizer
        body = max(1, length - 2)
        count = min(math.ceil(self.rows / length), len(stream) // body)
        ids = np.empty((count, length), np.int64)
        for w in range(count):
            ids[w, 1:-1] = stream[w * body:(w + 1) * body][: length - 2]
            ids[w, 0], ids[w, -1] = tok.cls_token_id, tok.sep_token_id
        return {"input_ids": torch.from_numpy(ids)}

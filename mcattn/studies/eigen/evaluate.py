"""The paper's claims measured on real attention: ``python -m mcattn.studies.eigen.evaluate``.

Writes the tables of docs/eigen.md between its markers (and the raw text to
``docs/measurements/eigen_evaluate.txt``):

1. spectrum and effective rank (90/95/99 %) of the score rows of every layer of
   all-MiniLM-L6-v2 and of paraphrase-MiniLM-L3-v2 (ONNX, run in NumPy with L6's
   tokenizer after :func:`mcattn.studies.eigen.onnx_bert.vocabulary_check`);
2. subspace overlap (rank 24) between all layer pairs of L6, and between L6 and L3;
3. reconstruction error and bound against rank and columns for each column method
   (the spec's DEIM construction, fitted on lee.cor documents 0-24, tested on 25-49);
4. the held-out variants of :mod:`mcattn.studies.eigen.heldout`.

Rows: windows of 96 tokens (:mod:`mcattn.studies.eigen.realdata`), heads pooled per layer.
Needs ``mcattn[eval]`` (torch, the model, gensim, onnx and the ONNX model package).
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from ...eigen import bounds, fit, overlap, score_rows, select_columns
from ...eigen.plan import make_plan
from .._tables import markdown_table

__all__ = ["collect", "claims_tables", "reconstruction_table", "main"]

LENGTH, RANK = 96, 24
START = "<!-- eigen-evaluate:start -->"
END = "<!-- eigen-evaluate:end -->"


def _rows(layer):
    q, k = layer["q"].astype(np.float64), layer["k"].astype(np.float64)
    return score_rows(q.reshape(-1, LENGTH, q.shape[-1]), k.reshape(-1, LENGTH, k.shape[-1]))


def collect():
    """Capture both models' q/k/v on the fit and test windows (and the vocabulary check)."""
    from .onnx_bert import NumpyBert, vocabulary_check
    from .realdata import FIT_DOCS, TEST_DOCS, capture_qkv, lee_documents, load_minilm, window_ids

    model = load_minilm()
    bert6 = model[0].auto_model.eval()
    texts = lee_documents()
    ids_fit = window_ids(model.tokenizer, [texts[i] for i in FIT_DOCS], LENGTH)
    ids_test = window_ids(model.tokenizer, [texts[i] for i in TEST_DOCS], LENGTH)
    l3 = NumpyBert()
    vocab = vocabulary_check(l3.w["embeddings.word_embeddings.weight"],
                             bert6.embeddings.word_embeddings.weight.detach().numpy())
    return {
        "l6_fit": capture_qkv(bert6, ids_fit), "l6_test": capture_qkv(bert6, ids_test),
        "l3_fit": l3(ids_fit)[1], "vocab": vocab, "windows": (len(ids_fit), len(ids_test)),
    }


def claims_tables(data):
    """Markdown: spectrum/effective-rank table and the overlap tables."""
    fits = {}
    for name, layers in (("L6", data["l6_fit"]), ("L3", data["l3_fit"])):
        for i, layer in enumerate(layers):
            fits[(name, i)] = fit(_rows(layer))
    rows = []
    for (name, i), b in fits.items():
        frac = b.explained_fraction()
        rows.append([f"{name} layer {i}", b.n_rows, f"{frac[0]:.3f}", f"{frac[4]:.3f}", f"{frac[23]:.3f}",
                     b.effective_rank(0.90), b.effective_rank(0.95), b.effective_rank(0.99)])
    spectrum = markdown_table(["model, layer", "rows", "top-1", "top-5", "top-24", "rank 90 %", "rank 95 %",
                               "rank 99 %"], rows, align="l" + "r" * 7)
    l6 = [fits[("L6", i)] for i in range(len(data["l6_fit"]))]
    l3 = [fits[("L3", i)] for i in range(len(data["l3_fit"]))]
    overlaps = markdown_table(["", *(f"L6 {j}" for j in range(len(l6)))],
                              [[f"{name} {i}", *(f"{overlap(bi, bj, RANK):.2f}" for bj in l6)]
                               for name, bases in (("L6", l6), ("L3", l3)) for i, bi in enumerate(bases)],
                              align="l" + "r" * len(l6))
    angles_note = (f"chance level for two random {RANK}-dimensional subspaces of R^{LENGTH}: "
                   f"{RANK / LENGTH:.2f}")
    return spectrum, overlaps, angles_note


def _softmax_out(s, v):
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


def reconstruction_table(data, ranks=(8, 16, 24), extra=(0, 8, 24),
                         methods=("qdeim", "uniform", "first", "random")):
    """Markdown: DEIM reconstruction error and bounds against rank, columns and column method.

    Figures averaged over the 6 layers; per layer one basis (heads pooled) fitted on the
    fit windows and the test windows' rows reconstructed. ``row err``: ``sqrt(mean ||a_hat -
    a||^2) / sqrt(mean ||a - mean||^2)``; ``bound``: the same with the deterministic
    bound; ``holds``: fraction of rows where the bound holds; ``E-bound``: the expected
    (RMS) bound over the same denominator; ``out err``: attention-output error.
    """
    table = []
    per_layer = []
    for f, t in zip(data["l6_fit"], data["l6_test"]):
        b = fit(_rows(f))
        test_rows = _rows(t)
        q, k, v = (t[x].astype(np.float64) for x in ("q", "k", "v"))
        per_layer.append((b, test_rows, q, k, v))
    for method in methods:
        for r in ranks:
            for add in extra:
                m = r + add
                stats = []
                for b, rows, q, _k, v in per_layer:
                    cols = select_columns(b, m, method=method, rank=r, seed=0)
                    plan = make_plan(b, cols, rank=r, estimator="deim")
                    rec = plan.base[0] + rows[:, cols] @ plan.weights[0]
                    rec[:, cols] = rows[:, cols]
                    err = np.linalg.norm(rec - rows, axis=1)
                    bnd = bounds.row_error_bound(b, cols, rows, rank=r)
                    spread = np.sqrt(np.mean(np.sum((rows - b.mean) ** 2, axis=1)))
                    exp_b = bounds.expected_row_error(b, cols, r)
                    s_exact = rows.reshape(q.shape[:-1] + (LENGTH,))
                    out = _softmax_out(rec.reshape(s_exact.shape), v)
                    ref = _softmax_out(s_exact, v)
                    stats.append((np.sqrt(np.mean(err**2)) / spread, np.sqrt(np.mean(bnd**2)) / spread,
                                  float(np.mean(err <= bnd * (1 + 1e-9) + 1e-9)), exp_b / spread,
                                  np.linalg.norm(out - ref) / np.linalg.norm(ref)))
                s = np.mean(stats, axis=0)
                table.append([method, r, m, *(f"{x:.3f}" for x in s)])
    return markdown_table(["columns", "rank", "m", "row err", "bound", "holds", "E-bound", "out err"], table,
                          align="l" + "r" * 7)


def render(data, heldout_table, seconds):
    spectrum, overlaps, chance = claims_tables(data)
    recon = reconstruction_table(data)
    vocab = data["vocab"]
    return f"""{START}
_Written by `python -m mcattn.studies.eigen.evaluate` ({seconds:.0f} s on a shared 2-core machine).
Windows of {LENGTH} tokens of gensim's lee.cor: {data['windows'][0]} fit windows (documents 0-24)
and {data['windows'][1]} test windows (documents 25-49); 12 heads pooled per layer._

Vocabulary check (paraphrase-MiniLM-L3-v2 ONNX vs all-MiniLM-L6-v2): both word embeddings
have {vocab['rows'][0]:,} / {vocab['rows'][1]:,} rows; the token-token cosine similarities of
2,000 random tokens correlate at {vocab['correlation']:.3f} between the two models (rows
shuffled: {vocab['shuffled_correlation']:.3f}), so the rows index the same uncased WordPiece
tokens and L6's tokenizer serves L3.

### Spectrum and effective rank of score rows (fit windows, heads pooled, mean-centred)

Fraction of the variance in the top 1 / 5 / 24 directions and the number of directions
that explain 90 / 95 / 99 % of it (of {LENGTH}).

{spectrum}

### Subspace overlap `||U1 U2^T||_F^2 / {RANK}` between layers and models (rank {RANK})

{chance}.

{overlaps}

### Reconstruction error and bound against rank, columns and column method (DEIM, held out)

Layer average. `row err` and `bound` are RMS over test rows relative to the RMS spread of
the rows about the mean; `holds` is the fraction of rows where the deterministic bound holds;
`E-bound` the expected (RMS) bound from the tail eigenvalues; `out err` the attention-output error.

{recon}

### What brings the output error down (rank {RANK}, 32 of {LENGTH} columns, held out)

{heldout_table}
{END}"""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcattn.studies.eigen.evaluate", description=__doc__)
    parser.add_argument("--doc", default="docs/eigen.md", help="Markdown file to update between the markers")
    parser.add_argument("--raw", default="docs/measurements/eigen_evaluate.txt")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from . import heldout

    t0 = time.time()
    with threadpool_limits(1, user_api="blas"):  # small matrices on a shared machine
        data = collect()
        held = heldout.format_table(heldout.run(data=(data["l6_fit"], data["l6_test"])))
        text = render(data, held, time.time() - t0)
    Path(args.raw).write_text(text + "\n")
    doc = Path(args.doc)
    old = doc.read_text() if doc.exists() else f"# eigen\n\n{START}\n{END}\n"
    if START in old and END in old:
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    doc.write_text(new)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

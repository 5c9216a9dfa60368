"""What brings the error down: eigen reconstruction variants on held-out real attention.

``python -m mcattn.studies.eigen.heldout [--out FILE]`` fits bases on MiniLM-L6 attention of
``lee.cor`` documents 0-24 and measures the attention-output error
``||O~ - O|| / ||O||`` per layer on documents 25-49 (windows of 96 tokens, see
:mod:`mcattn.studies.eigen.realdata`), at rank 24 with 32 of the 96 columns computed per query
row, for each variant in :data:`VARIANTS`. Needs ``mcattn[eval]``.
"""

import argparse
import sys
import time

import numpy as np

from ...eigen import attention, fit, fit_heads, score_rows
from ...eigen.plan import _pick_columns
from .._tables import markdown_table

__all__ = ["VARIANTS", "run", "format_table", "main"]

RANK, BUDGET, LENGTH = 24, 32, 96

#: name -> (description, options). Options: heads ("pooled"/"per-head"), center, estimator,
#: fixed (fixed columns), per_query, and "post" for the two probes that change the scores.
VARIANTS = {
    "pca": ("plain PCA per layer (heads pooled), Q-DEIM, DEIM (the spec's construction)",
            dict(heads="pooled", center=True, estimator="deim", fixed=32, per_query=0)),
    "per-head": ("one basis per head", dict(heads="per-head", center=True, estimator="deim",
                                            fixed=32, per_query=0)),
    "position": ("per head, centred by the mean row of each query position",
                 dict(heads="per-head", center="position", estimator="deim", fixed=32, per_query=0)),
    "clip": ("position + reconstructed logits clipped at the largest computed one",
             dict(heads="per-head", center="position", estimator="deim", fixed=32, per_query=0,
                  post="clip")),
    "drop": ("position, only the 32 computed columns (the others masked)",
             dict(heads="per-head", center="position", estimator="deim", fixed=32, per_query=0,
                  post="drop")),
    "conditional": ("position + conditional (PPCA) estimator, 32 fixed columns",
                    dict(heads="per-head", center="position", estimator="conditional", fixed=32,
                         per_query=0)),
    "deim+pq8": ("position + DEIM, 24 fixed + 8 per query", dict(heads="per-head", center="position",
                                                               estimator="deim", fixed=24, per_query=8)),
    "cond+pq16": ("position + conditional, 16 fixed + 16 per query",
                  dict(heads="per-head", center="position", estimator="conditional", fixed=16,
                       per_query=16)),
    "cond+pq24": ("position + conditional, 8 fixed + 24 per query",
                  dict(heads="per-head", center="position", estimator="conditional", fixed=8,
                       per_query=24)),
    "cond+pq28": ("position + conditional, 4 fixed + 28 per query (the default)",
                  dict(heads="per-head", center="position", estimator="conditional", fixed=4,
                       per_query=28)),
    "oracle": ("reference: the true top 32 keys of every row exact, the others masked",
               dict(oracle=True)),
}


def _softmax_out(s, v):
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


def _variant_output(opts, fit_qk, q, k, v):
    """Output ``[W, H, n, dv]`` of one variant on one layer."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    if opts.get("oracle"):
        s = scale * q @ np.swapaxes(k, -1, -2)
        keep = np.argsort(-s, axis=-1)[..., :BUDGET]
        masked = np.full_like(s, -np.inf)
        np.put_along_axis(masked, keep, np.take_along_axis(s, keep, -1), -1)
        return _softmax_out(masked, v)
    fq, fk = fit_qk
    if opts["heads"] == "pooled":
        rows = score_rows(fq.reshape(-1, LENGTH, fq.shape[-1]), fk.reshape(-1, LENGTH, fk.shape[-1]))
        bases = (fit(rows, rank=RANK, center=opts["center"]),)
    else:
        bases = fit_heads(fq, fk, rank=RANK, center=opts["center"])
    cols = [_pick_columns(b, RANK, opts["fixed"], "qdeim") for b in bases]
    post = opts.get("post")
    if post is None:
        return attention(q, k, v, basis=bases if len(bases) > 1 else bases[0], columns=cols,
                         per_query=opts["per_query"], estimator=opts["estimator"])
    from ...eigen.plan import make_plan

    plan = make_plan(bases, cols, estimator=opts["estimator"])
    s = scale * q @ np.swapaxes(k, -1, -2)
    out = np.empty(q.shape[:-1] + (v.shape[-1],))
    for h in range(q.shape[1]):
        c = plan.columns[h % plan.num_heads]
        a_s = s[:, h][..., c]
        rec = plan.base[h % plan.num_heads] + a_s @ plan.weights[h % plan.num_heads]
        rec[..., c] = a_s
        if post == "clip":
            rec = np.minimum(rec, a_s.max(-1, keepdims=True))
            rec[..., c] = a_s
        else:
            keep = np.full_like(rec, -np.inf)
            keep[..., c] = a_s
            rec = keep
        out[:, h] = _softmax_out(rec, v[:, h])
    return out


def run(variants=None, layers=range(6), data=None):
    """Errors per variant and layer: ``{name: [err_layer0, ...]}``.

    ``data``: ``(fit_layers, test_layers)`` as :func:`mcattn.studies.eigen.realdata.lee_windows`
    returns them (captured when None).
    """
    if data is None:
        from .realdata import FIT_DOCS, TEST_DOCS, lee_windows

        data = (lee_windows(FIT_DOCS, LENGTH), lee_windows(TEST_DOCS, LENGTH))
    fit_layers, test_layers = data
    names = list(VARIANTS) if variants is None else list(variants)
    result = {name: [] for name in names}
    for layer in layers:
        f = fit_layers[layer]
        t = test_layers[layer]
        q, k, v = (t[x].astype(np.float64) for x in ("q", "k", "v"))
        ref = _softmax_out(q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), v)
        fit_qk = (f["q"].astype(np.float64), f["k"].astype(np.float64))
        for name in names:
            out = _variant_output(VARIANTS[name][1], fit_qk, q, k, v)
            result[name].append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
    return result


def format_table(result, layers=range(6)):
    """A Markdown table: one row per variant, one column per layer, and the mean."""
    layers = list(layers)
    return markdown_table(["variant", *(f"layer {i}" for i in layers), "mean"],
                          [[f"`{name}`: {VARIANTS[name][0]}", *(f"{e:.3f}" for e in errs),
                            f"{np.mean(errs):.3f}"] for name, errs in result.items()],
                          align="l" + "r" * (len(layers) + 1))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcattn.studies.eigen.heldout", description=__doc__)
    parser.add_argument("--out", help="also write the table and the setup to this file")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    t0 = time.time()
    with threadpool_limits(1, user_api="blas"):  # small matrices: one BLAS thread is fastest here
        result = run()
    table = format_table(result)
    text = (f"# eigen on held-out MiniLM-L6 attention: fit lee.cor docs 0-24, test docs 25-49, "
            f"windows of {LENGTH}, rank {RANK}, {BUDGET} of {LENGTH} columns per row\n"
            f"# output error ||O~ - O|| / ||O|| per layer (all heads, all test windows)\n"
            f"# command: python -m mcattn.studies.eigen.heldout --out <this file>  "
            f"({time.time() - t0:.0f} s)\n\n"
            + table + "\n")
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

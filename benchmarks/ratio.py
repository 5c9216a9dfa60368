"""Ratio harness: mcattn's time over a baseline's, measured in one process.

Usage::

    python benchmarks/ratio.py exact                       # numba / torch SDPA, N = 1024 ... 16384
    python benchmarks/ratio.py exact --sizes 1024 4096 --causal --memory
    python benchmarks/ratio.py exact --json out.json       # also write the rows
    python benchmarks/ratio.py CASE --help                 # a case's own options
    python benchmarks/ratio.py mca --settle 0              # no pause between timed blocks

Timings on this (shared, noisy) machine are only comparable as ratios: each row times
the mcattn call and the baseline alternately, several rounds, and keeps the best of each.
Bare seconds are printed for context only. Each timed block starts after a pause
(``--settle``, default ``benchmarks.common.SETTLE_S`` = 0.15 s) in which the other
side's idle BLAS threads stop spinning. A case is a function ``ratio_rows(argv)``
in one of the asv suite modules returning ``(title, rows)``; adding a case is one line
in :data:`CASES`.
"""

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: case name -> "module:function" returning (title, iterable of row dicts)
CASES = {
    "exact": "benchmarks.bench_exact:ratio_rows",
    "mca": "benchmarks.bench_mca:ratio_rows",
    "mca_uniform": "benchmarks.bench_mca:uniform_ratio_rows",
    "mca_long": "benchmarks.bench_mca:long_ratio_rows",
    "rfa": "benchmarks.bench_rfa:ratio_rows",
    "train": "benchmarks.bench_train:ratio_rows",
    "eatt": "benchmarks.bench_eatt:ratio_rows",
    "latte": "benchmarks.bench_latte:ratio_rows",
    "eigen": "benchmarks.bench_eigen:ratio_rows",
}


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in CASES:
        print(__doc__)
        print("cases:", ", ".join(CASES))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    case, rest = argv[0], argv[1:]
    json_path = None
    if "--json" in rest:
        i = rest.index("--json")
        json_path = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    from benchmarks import common

    if "--settle" in rest:
        i = rest.index("--settle")
        common.SETTLE_S = float(rest[i + 1])
        rest = rest[:i] + rest[i + 2 :]
    module, func = CASES[case].split(":")
    title, rows = getattr(importlib.import_module(module), func)(rest)
    title = f"{title}; settle {common.SETTLE_S} s"
    print(f"# {title}")
    collected = []
    for row in rows:
        if not collected:
            print("  ".join(f"{key:>12}" for key in row))
        print("  ".join(f"{_fmt(val):>12}" for val in row.values()), flush=True)
        collected.append(row)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"title": title, "rows": collected}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

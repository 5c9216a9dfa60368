#!/bin/sh
# Issue 22's exact rows: numba / torch SDPA at N = 4096 and 16384, non-causal and causal,
# three runs, each command under an exclusive benchmark lock; raw output in
# docs/measurements/ratio_exact_TAG_run{1,2,3}.txt (both modes in one file per run).
# Usage: [LOCK=/path/to/lock] sh benchmarks/exact_ratio_runs.sh [TAG]   (default tag s35)
# (The i22 files were written by the former layout: one file per run and mode.)
tag=${1:-s35}
lock=${LOCK:-/tmp/s35/cpu.lock}
out=docs/measurements
for run in 1 2 3; do
  {
    for mode in "" "--causal"; do
      echo "# $(date -u +%H:%M:%S) UTC; uptime before: $(uptime)"
      echo "# command: python benchmarks/ratio.py exact --sizes 4096 16384 $mode"
      flock -x -w 1200 "$lock" python benchmarks/ratio.py exact --sizes 4096 16384 $mode
      echo "# uptime after: $(uptime)"
    done
  } > $out/ratio_exact_${tag}_run$run.txt 2>&1
done

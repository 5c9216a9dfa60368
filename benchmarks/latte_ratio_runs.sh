#!/bin/sh
# Issue 22's LATTE rows: latte (numba) / exact (numba) at N = 4096 and 16384, 15 % of the keys
# kept, with the per-phase times, three runs, each under an exclusive benchmark lock; raw
# output in docs/measurements/ratio_latte_TAG_run{1,2,3}.txt.
# Usage: [LOCK=/path/to/lock] sh benchmarks/latte_ratio_runs.sh [TAG]   (default tag s35)
tag=${1:-s35}
lock=${LOCK:-/tmp/s35/cpu.lock}
out=docs/measurements
for run in 1 2 3; do
  {
    echo "# $(date -u +%H:%M:%S) UTC; uptime before: $(uptime)"
    echo "# command: python benchmarks/ratio.py latte --sizes 4096 16384 --rounds 5 --phases"
    flock -x -w 1200 "$lock" python benchmarks/ratio.py latte --sizes 4096 16384 --rounds 5 --phases
    echo "# uptime after: $(uptime)"
  } > $out/ratio_latte_${tag}_run$run.txt 2>&1
done

#!/bin/sh
# Issue 22's exact rows: numba / torch SDPA at N = 4096 and 16384, non-causal and causal,
# three runs each, each under the shared benchmark lock; raw output in docs/measurements/.
# Usage: sh benchmarks/exact_ratio_runs.sh [TAG]   (default tag i22)
tag=${1:-i22}
out=docs/measurements
for run in 1 2 3; do
  for mode in "" "--causal"; do
    name=ratio_exact${mode:+_causal}_${tag}_run$run
    {
      echo "# $(date -u +%H:%M:%S) UTC; uptime before: $(uptime)"
      echo "# command: python benchmarks/ratio.py exact --sizes 4096 16384 $mode"
      flock /tmp/s33/bench.lock python benchmarks/ratio.py exact --sizes 4096 16384 $mode \
        --json $out/$name.json
      echo "# uptime after: $(uptime)"
    } > $out/$name.txt 2>&1
  done
done

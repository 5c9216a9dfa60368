#!/bin/sh
# Issue 22's MCA rows: shared draws with share="row" and share="batch" on the embedded
# sample's real budgets against the dense GEMM over the real tokens (ratio.py mca --packed),
# and at uniform budgets N = 4096 against the dense GEMM (ratio.py mca_uniform), three runs
# each, each under the exclusive CPU lock; raw output in docs/measurements/.
# Usage: sh benchmarks/mca_batch_runs.sh [TAG [LOCK [EXTRA]]]  (default tag s34, lock
# /tmp/s34/cpu.lock; EXTRA, e.g. "--settle 0", is passed to every ratio.py call)
tag=${1:-s34}
lock=${2:-/tmp/s34/cpu.lock}
extra=$3
out=docs/measurements
for run in 1 2 3; do
  for case in "mca --packed" "mca_uniform --no-independent --fractions 0.1 0.2 0.4"; do
    name=ratio_$(echo "$case" | cut -d' ' -f1)_batch_${tag}_run$run
    {
      echo "# $(date -u +%H:%M:%S) UTC; uptime before: $(uptime)"
      echo "# command: python benchmarks/ratio.py $case $extra --json $out/$name.json"
      flock -x -w 1200 "$lock" python benchmarks/ratio.py $case $extra --json $out/$name.json
      echo "# uptime after: $(uptime)"
    } > $out/$name.txt 2>&1
  done
done

#!/usr/bin/env bash
# One-shot check of mcattn on a machine with an NVIDIA GPU (docs/cuda-testing.md).
#
# Run from the repository root: tests/cuda/on_device.sh
# Expects Python 3.12 with CuPy (CUDA 13), numba-cuda, torch, JAX and pytest installed and
# NO network: mcattn is installed from this working tree without touching those packages
# (pip --no-deps --no-build-isolation); a pure-Python dependency missing there is taken
# from the wheels folder .whl/ prepared beforehand (command in docs/cuda-testing.md).
# Then the CUDA test lanes run on the real device (not the simulator), then
# `mcattn selftest --bench --json`. Results go to docs/measurements/gpu-*.txt|json.
# Finishes within 8 minutes (time limits per step: 20 + 20 + 180 + 105 + 60 + 40 + 25 + 20 + 10 s, then 30 + 10 s only while they fit in 470 s); prints a short summary last;
# exits 1 when anything failed or mismatched.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT_DIR=docs/measurements
mkdir -p "$OUT_DIR"
export NUMBA_ENABLE_CUDASIM=0 PYTHONUNBUFFERED=1
START=$(date +%s)
declare -a SUMMARY=()
FAILED=0
step() {  # step NAME SECONDS LOGFILE COMMAND...: run with a time limit, record the outcome
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > >(tee "$log") 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok    $name (${took}s)")
    else
        [ $rc -eq 124 ] && SUMMARY+=("FAIL  $name: timed out after ${limit}s") \
                        || SUMMARY+=("FAIL  $name: exit $rc (${took}s), see $log")
        FAILED=1
    fi
    return $rc
}

# 1. The machine.
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "on_device.sh: no NVIDIA GPU here (nvidia-smi -L failed); this script is for a GPU machine" >&2
    exit 1
fi
{
    echo "# tests/cuda/on_device.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
    $PY - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "cuda-bindings",
             "nvidia-cuda-nvrtc", "torch", "jax", "pytest", "array-api-compat"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} > "$OUT_DIR/gpu-environment.txt" 2>&1
cat "$OUT_DIR/gpu-environment.txt"

# 2. Install mcattn from the tree; missing pure-Python dependencies from .whl/.
MISSING=$($PY - <<'EOF'
import configparser, importlib.metadata as md, re
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
needs = [re.split(r"[<>=!~ ;\[]", r.strip())[0] for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
needs += ["pytest-timeout"]
missing = []
for dist in needs:
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        missing.append(dist)
print(" ".join(missing))
EOF
)
if [ -n "$MISSING" ]; then
    echo "installing from .whl/: $MISSING"
    step "install missing dependencies ($MISSING)" 20 /tmp/mcattn-wheels.log \
        $PY -m pip install -q --no-index --no-deps --find-links .whl $MISSING
fi
step "pip install -e . (no deps, no build isolation)" 20 /tmp/mcattn-install.log \
    $PY -m pip install -q --no-build-isolation --no-deps -e .

# 3. The CUDA test lanes on the device (conftest leaves the simulator off). They include
#    MCA's shared-draw kernels (test_mca_shared_cuda.py: both GPU backends against the CPU plan).
step "pytest tests/cuda on the GPU" 180 "$OUT_DIR/gpu-pytest.txt" \
    $PY -m pytest tests/cuda -q -p no:cacheprovider -o addopts="-ra --strict-markers" --timeout=180

# 4. The self-test with GPU timings next to torch SDPA (its mca-shared rows check MCA's
#    shared draws on every backend; their bench stops at N = 4096).
step "mcattn selftest --bench" 105 "$OUT_DIR/gpu-selftest.txt" \
    $PY -m mcattn.cli selftest --bench --json "$OUT_DIR/gpu-selftest.json"

# 5. The tensor-core exact forward against torch SDPA (flash) in float16 / bfloat16, and the
#    float32 kernel against SDPA float32: table and one summary line per kernel.
step "exact_mma vs SDPA" 60 "$OUT_DIR/gpu-exact-mma-log.txt" \
    $PY benchmarks/gpu/exact_mma_vs_sdpa.py --out "$OUT_DIR/gpu-exact-mma.txt"

# 6. LATTE's tensor-core forward (15 % kept, random and clustered inputs) against SDPA flash:
#    one summary line per type and input kind; a case that errors prints its line, the rest run.
step "latte_mma vs SDPA" 40 "$OUT_DIR/gpu-latte-mma-log.txt" \
    $PY benchmarks/gpu/latte_mma_vs_sdpa.py --out "$OUT_DIR/gpu-latte-mma.txt"

# 7. E-Att's Hamming alignment on the tile machinery against SDPA flash (N = 4k-16k).
step "eatt_mma vs SDPA" 25 "$OUT_DIR/gpu-eatt-mma-log.txt" \
    $PY benchmarks/gpu/eatt_mma_vs_sdpa.py --out "$OUT_DIR/gpu-eatt-mma.txt"

# 8. rfa on tensor cores against SDPA flash: non-causal (N = 4k, 16k) and causal (N = 16k).
step "rfa_mma vs SDPA" 20 "$OUT_DIR/gpu-rfa-mma-log.txt" \
    $PY benchmarks/gpu/rfa_mma_vs_sdpa.py --out "$OUT_DIR/gpu-rfa-mma.txt"

# 9. MCA's shared draws (cuBLAS GEMMs and mca_shared.cu) against the dense cuBLAS projection.
step "mca_shared vs dense" 10 "$OUT_DIR/gpu-mca-shared-log.txt" \
    $PY benchmarks/gpu/mca_shared_vs_dense.py --out "$OUT_DIR/gpu-mca-shared.txt"

# 10-11. Within what is left of the 8 minutes (each step needs its whole limit left, else it
#    is skipped with a summary line): eigen's GEMM path at N = 4k, d = 128 against SDPA, and
#    the rfa decoder step (rfa_step.cu) against the array-code step.
if_time_left() {  # if_time_left NAME SECONDS ...: step, when the limit still fits in 470 s
    local name=$1 limit=$2
    if [ $(( $(date +%s) - START + limit )) -le 470 ]; then
        step "$@"
    else
        SUMMARY+=("skip  $name: under ${limit}s of the 8 minutes left")
    fi
}
if_time_left "eigen_gemm vs SDPA" 30 "$OUT_DIR/gpu-eigen-gemm-log.txt" \
    $PY benchmarks/gpu/eigen_gemm_vs_sdpa.py --out "$OUT_DIR/gpu-eigen-gemm.txt"
if_time_left "rfa decode step" 10 "$OUT_DIR/gpu-rfa-decode-log.txt" \
    $PY benchmarks/gpu/rfa_decode_gpu.py --out "$OUT_DIR/gpu-rfa-decode.txt"

# On a GPU machine the GPU backends must have run: a GPU row that did not pass, or a bench
# without GPU timings, fails the script.
if $PY - "$OUT_DIR/gpu-selftest.json" > /tmp/mcattn-gpu-rows.txt 2>&1 <<'PYEOF'
import json, sys
try:
    payload = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"no selftest JSON: {exc}")
bad = [f"{r['backend']} {r['method']} {r['dtype']}: {r['status']} {r['note']}" for r in payload["rows"]
       if r["backend"] in ("cupy", "cuda") and r["status"] != "pass"]
if not any(r.get("ms") for r in payload.get("bench", [])):
    bad.append("no GPU timing in the bench")
print("\n".join(bad) or "every GPU row passed")
sys.exit(1 if bad else 0)
PYEOF
then
    SUMMARY+=("ok    GPU backends ran (cupy and cuda rows, bench)")
else
    SUMMARY+=("FAIL  GPU backends: $(head -3 /tmp/mcattn-gpu-rows.txt | tr '\n' ';')")
    FAILED=1
fi

# 10. Summary, last.
echo
echo "=== on_device.sh summary ($(( $(date +%s) - START ))s, $(head -2 "$OUT_DIR/gpu-environment.txt" | tail -1)) ==="
grep -E "passed|failed" "$OUT_DIR/gpu-pytest.txt" | tail -1 | sed 's/^/pytest: /'
grep -E "^selftest:" "$OUT_DIR/gpu-selftest.txt" | tail -1
grep -E "^\S+ +\S+ +\S+ +(FAIL|error) " "$OUT_DIR/gpu-selftest.txt" | head -5
grep -E "^(summary|MISMATCH)" "$OUT_DIR/gpu-exact-mma.txt" 2>/dev/null
for kernel in latte-mma eatt-mma rfa-mma mca-shared eigen-gemm rfa-decode; do  # the tile kernels' summaries, or their last error lines
    grep -E "^(summary|MISMATCH)" "$OUT_DIR/gpu-$kernel.txt" 2>/dev/null \
        || grep -E "Error|MISMATCH" "$OUT_DIR/gpu-$kernel-log.txt" 2>/dev/null | tail -3
done
printf '%s\n' "${SUMMARY[@]}"
if [ $FAILED -ne 0 ]; then
    echo "on_device.sh: FAILED (see above); results in $OUT_DIR/gpu-*"
    exit 1
fi
echo "on_device.sh: all passed; results in $OUT_DIR/gpu-*"

#!/usr/bin/env bash
# Every GPU check of slak_triton in one command, in under ten minutes on an H100:
#   1. environment report (nvidia-smi, Python / torch / triton / CUDA versions, git commit),
#   2. the GPU test tier: pytest -m gpu -q,
#   3. slak-bench op --quick, writing JSON, CSV and a PNG plot,
#   4. slak-bench candidates at SLaK-T stage 1, bf16, dense: every autotune candidate of the forward, input and
#      weight gradient timed, the records that refit the static model (bench/NOTES.md).
#
# Usage: bench/gpu_check.sh [OUTDIR]          (OUTDIR defaults to bench/results/)
# Env:   PYTHON (default python3), GPU_CHECK_PYTEST_TIMEOUT (s, default 300), GPU_CHECK_BENCH_TIMEOUT (s, default 360),
#        GPU_CHECK_CANDIDATES_TIMEOUT (s, default 150; 0 skips step 4),
#        SLAK_GPU_CHECK_ALLOW_CPU=1 to run on a machine without CUDA (CPU mode; for testing this script only).
#
# Works offline: if slak_triton is not importable it installs the checkout with
#   pip install --no-deps --no-build-isolation -e .
# (torch, triton, einops, pytest, hypothesis and matplotlib must already be there).
# Outputs: OUTDIR/<device>-<UTC stamp>.{json,csv,png} plus -env.txt, -pytest.log, -bench.log, -candidates.json,
#          -candidates.log, -summary.txt.
# Exit status: 0 when every step passed, 1 when one failed, 2 when it could not start.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-$ROOT/bench/results}"
PY="${PYTHON:-python3}"
PYTEST_TIMEOUT="${GPU_CHECK_PYTEST_TIMEOUT:-300}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-360}"
CANDIDATES_TIMEOUT="${GPU_CHECK_CANDIDATES_TIMEOUT:-150}"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || exit 2
START=$(date +%s)

if ! "$PY" -c "import slak_triton.bench.cli" >/dev/null 2>&1; then
    echo "== slak_triton is not importable with $PY: installing this checkout (no deps, no build isolation)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" || { echo "install failed"; exit 2; }
fi

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_CUDA" != "1" ] && [ "${SLAK_GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    echo "gpu_check.sh: no CUDA device visible to $PY. This script is the GPU check; on a CPU-only machine run"
    echo "  slak-bench --quick   (CPU mode) and the test suite instead, or set SLAK_GPU_CHECK_ALLOW_CPU=1."
    exit 2
fi

SLUG=$("$PY" -c "
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu-mode'
print(re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-'))")
STAMP=$(date -u +%Y%m%d-%H%M%S)
BASE="$OUTDIR/$SLUG-$STAMP"
STATUS=0
SUMMARY=()

step() {  # step NAME RC
    if [ "$2" -eq 0 ]; then SUMMARY+=("PASS  $1"); else SUMMARY+=("FAIL  $1 (exit $2)"); STATUS=1; fi
}

echo "== [1/4] environment -> $BASE-env.txt"
{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "git commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | sed 's/^/git dirty: /'
    echo "--- nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    echo "--- versions"
    "$PY" - <<'EOF'
import platform, sys
import torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.1f} GiB")
for mod in ("slak_triton", "einops", "hypothesis", "pytest", "matplotlib"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except ImportError as e:
        print(mod, "MISSING", e)
EOF
} 2>&1 | tee "$BASE-env.txt"
step "environment report" "${PIPESTATUS[0]}"

echo "== [2/4] pytest -m gpu -q (timeout ${PYTEST_TIMEOUT}s) -> $BASE-pytest.log"
timeout "$PYTEST_TIMEOUT" "$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$BASE-pytest.log"
rc=${PIPESTATUS[0]}
# exit 5 = no test selected: not a failure of the GPU tier itself, but say so.
if [ "$rc" -eq 5 ]; then SUMMARY+=("NOTE  pytest -m gpu selected no test"); rc=0; fi
step "pytest -m gpu" "$rc"

echo "== [3/4] slak-bench op --quick (timeout ${BENCH_TIMEOUT}s) -> $BASE.{json,csv,png}"
timeout "$BENCH_TIMEOUT" "$PY" -m slak_triton.bench.cli op --quick --measure-ceilings \
    --json "$BASE.json" --csv "$BASE.csv" --plot "$BASE.png" 2>&1 | tee "$BASE-bench.log"
step "slak-bench op --quick" "${PIPESTATUS[0]}"

if [ "$CANDIDATES_TIMEOUT" -gt 0 ]; then
    echo "== [4/4] slak-bench candidates, stage 1 bf16 (timeout ${CANDIDATES_TIMEOUT}s) -> $BASE-candidates.json"
    timeout "$CANDIDATES_TIMEOUT" "$PY" -m slak_triton.bench.cli candidates --stages 1 --kinds fwd,dx,dw \
        --dtypes bf16 --densities 1.0 --no-progress --json "$BASE-candidates.json" 2>&1 | tee "$BASE-candidates.log"
    step "slak-bench candidates (stage 1, bf16)" "${PIPESTATUS[0]}"
else
    SUMMARY+=("NOTE  slak-bench candidates skipped (GPU_CHECK_CANDIDATES_TIMEOUT=0)")
fi

ELAPSED=$(( $(date +%s) - START ))
{
    echo "gpu_check.sh on $SLUG at $STAMP, ${ELAPSED}s"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$BASE-summary.txt"
exit "$STATUS"

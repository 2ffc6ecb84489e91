#!/usr/bin/env bash
# One lent-GPU session: install, GPU test tier, op timings. Usage: bash scripts/gpu_session.sh OUTDIR [cases...]
set -uo pipefail
OUT=${1:-/tmp/out}; shift || true
mkdir -p "$OUT"
pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)" | tee -a "$OUT/env.txt"
export PYTHONUNBUFFERED=1
SLAK_TRITON_AUTOTUNE=0 timeout 200 python3 -m pytest -q -m gpu tests/test_lk_conv2d.py -x 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 scripts/gpu_bench_op.py --out "$OUT/op.json" --cases "$@" 2>&1 | tee "$OUT/op.txt"

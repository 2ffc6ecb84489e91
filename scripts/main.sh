#!/usr/bin/env bash
# The main job: set-up (idempotent) then the quick benchmark (CPU mode here: PyTorch timed on CPU, Triton kernels
# checked against the reference under the interpreter; GPU numbers on a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/slak-bench --quick "$@"

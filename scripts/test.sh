#!/usr/bin/env bash
# The test command: set-up (idempotent) then the whole suite; Triton kernels run under the interpreter on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec .venv/bin/python -m pytest -q "$@"

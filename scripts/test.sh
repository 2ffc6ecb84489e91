#!/usr/bin/env bash
# The test command: set-up (idempotent) then the whole suite; Triton kernels run under the interpreter on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
# the set-up installed the test, train and timm extras: their tests must run, not skip
export SLAK_REQUIRE_EXTRAS=${SLAK_REQUIRE_EXTRAS:-1}
exec .venv/bin/python -m pytest -q "$@"

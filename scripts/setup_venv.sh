#!/usr/bin/env bash
# Creates .venv (if missing) and installs slak_triton with its test extras, CPU torch and the CI constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the CPU wheel (constraints), so that nothing pulls a CUDA build
.venv/bin/python -m pip install -q -c .ci/constraints.txt torch
.venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test,train]"

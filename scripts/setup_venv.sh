#!/usr/bin/env bash
# Creates .venv (if missing) and installs slak_triton with its test, train and timm extras under the pins of
# .ci/constraints.txt (torch first, so that nothing resolves another torch build).
# Quiet: pip's output goes to .venv/setup.log and one line says what happened (the log's tail on a failure).
# Idempotent and fast: a stamp of pyproject.toml, the constraints and this script skips an up-to-date venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${SLAK_EXTRAS:-test,train,timm}
STAMP=.venv/.setup-stamp
want=$(cat pyproject.toml .ci/constraints.txt scripts/setup_venv.sh | sha256sum | cut -c1-16)-$EXTRAS
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: .venv is up to date (extras $EXTRAS)"
  exit 0
fi
t0=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  echo "setup: installing into a new .venv (first run: about 2 minutes, 5.5 GB; log: .venv/setup.log)"
else
  echo "setup: updating .venv (log: .venv/setup.log)"
fi
LOG=.venv/setup.log
: > "$LOG"
pipq() {
  # -qq: no progress bars and no warnings (this machine's pip config names index folders that do not all exist)
  if ! .venv/bin/python -m pip install -qq --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
    echo "setup: pip install $* failed; the end of .venv/setup.log:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}
.venv/bin/python -m pip install -qq --disable-pip-version-check --upgrade pip >>"$LOG" 2>&1 || true
# torch first, pinned (constraints), so that nothing pulls another build
pipq -c .ci/constraints.txt torch
pipq -c .ci/constraints.txt -e ".[$EXTRAS]"
echo "$want" > "$STAMP"
versions=$(.venv/bin/python -c "import importlib.metadata as m
out = []
for p in ('torch', 'triton', 'torchvision', 'timm'):
    try:
        out.append(p + ' ' + m.version(p))
    except m.PackageNotFoundError:
        pass
print(', '.join(out))")
echo "setup: done in $(( $(date +%s) - t0 ))s ($versions)"

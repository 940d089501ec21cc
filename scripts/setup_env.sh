#!/usr/bin/env bash
# Create .venv (if missing) and install the runtime (+ test) requirements into it. Idempotent.
#   bash scripts/setup_env.sh          runtime only
#   bash scripts/setup_env.sh --test   runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
reqs=(-r requirements.txt)
[ "${1:-}" = "--test" ] && reqs+=(-r requirements-test.txt)
.venv/bin/python -m pip install -q "${reqs[@]}"

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
# The browser test (tests/test_browser.py) drives Debian's chromium; install it once if missing (root or sudo).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup_env: could not install chromium (apt-get); tests/test_browser.py will skip or fail" >&2
fi

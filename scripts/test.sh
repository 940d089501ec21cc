#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the whole suite (CPU only, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q "$@"

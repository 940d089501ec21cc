#!/usr/bin/env bash
# Install the runtime into .venv and start the lab on the bundled tiny FLUX (http://127.0.0.1:7860).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python app.py "$@"

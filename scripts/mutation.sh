#!/usr/bin/env bash
# Mutation testing of the decision / maths code (issue 17), within a time budget; not part of CI.
#   bash scripts/mutation.sh [--budget-minutes 60] [--max-children 2] [--keep] [MUTANT_NAME_OR_GLOB ...]
# Installs mutmut==3.8.1 into .venv when missing (PYTHON=... picks another interpreter). See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 10 "${PYTHON:-.venv/bin/python}" -m scripts.mutation "$@"

#!/usr/bin/env bash
# One device call (H100, < 600 s): the SpeCa benchmark (bash scripts/bench/gpu_speca.sh: kernel tests, eager and
# compiled rows) and then, in what time is left, SpecDiff's text-token rows eager (gpu_specdiff.sh text with
# TEXT_MODES=eager: plain, SpecDiff 0.85/0.95 with text_tokens compute and cache, TaylorSeerCache lite), so that
# both need one machine start. From the repository root, carry [".whl"]: bash scripts/bench/gpu_speca_text.sh
# Under $OUT (8 files at most come back): gpu.txt, kernels.log, eager/compiled .log/.json, flux_text.log/.json.
# LIMIT_S (default 585): the whole call's seconds; ROWS / CROWS choose gpu_speca.sh's rows.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:-/tmp/out} bash scripts/bench/gpu_speca.sh
LEFT=$(( ${LIMIT_S:-585} - ($(date +%s) - START) ))
echo "=== SpecDiff text rows, eager, ${LEFT} s left"
if [ "$LEFT" -gt 60 ]; then
  OUT="${OUT:-/tmp/out}/specdiff" WHL=.whl TEXT_MODES=eager TEXT_S=$((LEFT - 15)) \
    bash scripts/bench/gpu_specdiff.sh text 2>&1 | grep -v "^W1\|recompil\|^V1\|^I1" | tail -12
  mv "${OUT:-/tmp/out}"/specdiff/flux_text.* "${OUT:-/tmp/out}/" 2>/dev/null
  rm -rf "${OUT:-/tmp/out}/specdiff"
fi
exit 0

#!/usr/bin/env bash
# One device call: host vs device time per SpeCa step, eager then compiled (python -m scripts.bench.timeline_speca).
# From the repository root, carry [".whl"]: bash scripts/bench/gpu_timeline.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/device_env.sh .whl
timeout 100 python3 -m pytest -q -x tests/test_speca_graphs.py tests/test_speca_kernels.py 2>&1 | tail -15
timeout 150 python3 -m scripts.bench.timeline_speca "$@" > "$OUT/timeline_eager.log" 2>&1; echo "eager exit $?"
timeout 250 python3 -m scripts.bench.timeline_speca --compile "$@" > "$OUT/timeline_compiled.log" 2>&1; echo "compiled exit $?"
grep -h "^\[" "$OUT"/timeline_*.log
grep -h "step" "$OUT/timeline_compiled.log" | tail -22

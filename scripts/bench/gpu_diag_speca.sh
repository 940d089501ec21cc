#!/usr/bin/env bash
# One device call (< 9 min): the CUDA graph tests, then why a compiled SpeCa speculative step costs more than one block. Host vs device time
# per step with the host's Python profile (timeline_speca --compile --cprofile), then torch.profiler's top device
# ops of two compiled speculative steps (profile_speca --compile). Logs under $OUT.
# From the repository root, carry [".whl"]: bash scripts/bench/gpu_diag_speca.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/device_env.sh .whl
timeout 100 python3 -m pytest -q tests/test_speca_graphs.py tests/test_specdiff_graphs.py 2>&1 | tail -4
timeout 230 python3 -m scripts.bench.timeline_speca --compile --cprofile > "$OUT/timeline_compiled.log" 2>&1
echo "timeline exit $?"
timeout 220 python3 -m scripts.bench.profile_speca --compile > "$OUT/profile_compiled.log" 2>&1; echo "profile exit $?"
grep -h "^\[" "$OUT/timeline_compiled.log"
grep -A22 "tottime" "$OUT/timeline_compiled.log" | head -30
grep -E "single block|per step" "$OUT/profile_compiled.log"
grep -B2 -A22 "Self CUDA" "$OUT/profile_compiled.log" | head -30
exit 0

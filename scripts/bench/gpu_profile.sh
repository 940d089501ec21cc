#!/usr/bin/env bash
# One device call: where a SpeCa speculative step's time goes, eager then compiled (python -m scripts.bench.profile_speca).
# From the repository root, carry [".whl"]: bash scripts/bench/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/device_env.sh .whl
timeout 200 python3 -m scripts.bench.profile_speca > "$OUT/profile_eager.log" 2>&1; echo "eager exit $?"
timeout 300 python3 -m scripts.bench.profile_speca --compile > "$OUT/profile_compiled.log" 2>&1; echo "compiled exit $?"
for f in eager compiled; do echo "== $f"; grep -E "single block|accumulate|per step|^[0-9]+ (full|accepted|rejected|spec)" "$OUT/profile_$f.log" | tail -16; done

#!/usr/bin/env bash
# One device call (< 9 min): SpeCa's verification vs fixed schedules and the peers on the bundled trained tiny
# models (issue 10, item 1). 1) scripts.bench.pareto_speca over 16 prompts of the tiny FLUX (28 steps) and the tiny
# HunyuanVideo (30 steps): every curve, 8 worker processes on the one GPU; 2) scripts.bench.diagnose_speca on each
# model (16 prompts): teacher-forced errors and signal correlations, and the oracle verification curve.
# Under $OUT: pareto.json / .log, diagnose-flux.json / .log, diagnose-video.json / .log.
# From the repository root: bash scripts/bench/gpu_pareto.sh   (carry: [".whl"]: the diffusers and cache-dit wheels)
# Every stage writes as it goes, so a stage cut short by its time limit still reports what it finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/device_env.sh .whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${PARETO_S:-380} python3 -m scripts.bench.pareto_speca --device cuda --workers ${WORKERS:-8} --threads 2 \
  --json "$OUT/pareto.json" > "$OUT/pareto.log" 2>&1; echo "pareto exit $?" >> "$OUT/pareto.log"
for m in flux video; do
  timeout ${DIAG_S:-70} python3 -m scripts.bench.diagnose_speca --device cuda --model $m --prompts 16 \
    --configs "stack o1,stack o2" --oracle --json "$OUT/diagnose-$m.json" > "$OUT/diagnose-$m.log" 2>&1
  echo "diagnose $m exit $?" >> "$OUT/diagnose-$m.log"
done
# the tables (the reply shows the end of the output); if pareto was cut short, tabulate what it wrote
[ -s "$OUT/pareto.json" ] && python3 -m scripts.bench.pareto_speca --from-json "$OUT/pareto.json" | tail -45
for m in flux video; do grep -v "Loading\|deprecat\|transformers\]" "$OUT/diagnose-$m.log" | tail -30; done
exit 0

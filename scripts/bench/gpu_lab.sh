#!/usr/bin/env bash
# One device call (H100, < 590 s with the install): the lab at full size (issue 13). Builds FLUX.1-dev- and
# HunyuanVideo-shaped pipeline folders with random bf16 weights (both at once), times the bare pipeline calls,
# serves each with `app.py --model FOLDER` and drives /generate through gradio_client: FLUX 1024² Full, SpeCa,
# SpecDiff, TaylorSeer at 28 steps, Full and SpeCa at 50, SpeCa compiled at 28; HunyuanVideo 544x960, 33 frames,
# 10 steps: Full, SpeCa, SpecDiff (python -m scripts.bench.gpu_lab all; its docstring says what and how).
# Needs the slim wheels (bash scripts/bench/slim_wheels.sh -> .whl-lab, 10.6 MiB): carry [".whl-lab"].
# From the repository root: bash scripts/bench/gpu_lab.sh [gpu_lab options, e.g. --families flux]; LAB_S (default
# 560) caps the whole call in seconds   (writes gpu_lab.json, bare-*.json, app-logs.tgz (app logs, server timelines), gpu.txt
# under $OUT; prints the table last)
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
source scripts/bench/device_env.sh .whl-lab
export GRADIO_ANALYTICS_ENABLED=False
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  df -h /tmp /dev/shm | tail -2; free -g | head -2
  python3 -c "import torch, diffusers, gradio, transformers, cv2; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'gradio', gradio.__version__, 'transformers', transformers.__version__, 'cv2', cv2.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
# what is left of $LAB_S (560) s after the install, for the whole run (each stage has its own deadline inside)
BUDGET=$(( ${LAB_S:-560} - ($(date +%s) - START) ))
timeout $((BUDGET + 15)) python3 -m scripts.bench.gpu_lab all --out "$OUT" --budget-s "$BUDGET" "$@" 2>&1 \
  | grep -v "it/s\]\|Loading\|Writing\|torchvision\|deprecate\|FutureWarning" | tee "$OUT/gpu_lab.log"
# where each request's time went on the server (the app's timelines against the client's times)
python3 -m scripts.lab.timeline_table "$OUT" 2>&1 | tee "$OUT/timeline_table.txt"
# the device returns at most 8 files: the app logs and the server timelines travel as one archive
(cd "$OUT" && rm -rf work && tar czf app-logs.tgz app-*.log app-*-timeline.jsonl 2>/dev/null && rm -f app-*.log app-*-timeline.jsonl)
exit 0

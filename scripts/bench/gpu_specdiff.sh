#!/usr/bin/env bash
# SpecDiff's GPU checks and benchmarks, one device call (docs/specdiff.md). Run from the folder that holds
# accel/ and scripts/; the diffusers wheel comes from $WHL (default ../.whl), results go to $OUT.
#
#   bash scripts/bench/gpu_specdiff.sh kernels flux video     # kernel checks + timings, FLUX eager, HunyuanVideo
#   bash scripts/bench/gpu_specdiff.sh compiled               # FLUX under compile_repeated_blocks
#
# Stages (each under its own time limit, so that one slow stage leaves the others' results):
#   kernels   python -m scripts.bench.specdiff_kernels: every kernel against torch on random inputs, then timings;
#             a wrong Triton kernel turns Triton off for the later stages (SPECLAB_TRITON=0), a wrong LSE path
#             turns that off (SPECLAB_SDPA_LSE=0)
#   flux      FLUX.1-dev-sized random bf16 transformer, 1024², 28 steps, eager: plain, SpecDiff 0.85/0.95 with
#             C3 history and taylor (CUDA graphs on; 0.85 again without them, outputs compared), SpeCa every:8,
#             diffusers TaylorSeerCache lite N5O1; a profiler table of one SpecDiff call
#   compiled  the same model under regional compilation: plain, SpecDiff 0.85/0.95, TaylorSeerCache lite
#   both      eager (SpecDiff at query strides 2 and 4) then compiled, in one process
#   text      FLUX, eager then compiled in one process ($TEXT_MODES, default eager,compiled): plain, SpecDiff
#             0.85/0.95 with text_tokens compute and cache, TaylorSeerCache lite N5O1
#   video     HunyuanVideo-sized random bf16 transformer, 544x960, 33 frames, 50 steps: plain, SpecDiff 0.85
set -o pipefail
OUT=${OUT:-/tmp/specdiff_out}
mkdir -p "$OUT"
WHL=${WHL:-../.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,temperature.gpu,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

for stage in "$@"; do
  echo "=== $stage $(date +%T)" | tee -a "$OUT/gpu.txt"
  case $stage in
    kernels)
      timeout "${KERNELS_S:-80}" python3 -m scripts.bench.specdiff_kernels --json "$OUT/kernels.json" 2>&1 \
        | tee "$OUT/kernels.log"
      rc=$?
      if [ $rc -eq 2 ]; then echo "Triton kernel check failed: SPECLAB_TRITON=0 from here"; export SPECLAB_TRITON=0; fi
      if [ $rc -eq 3 ]; then echo "LSE path check failed: SPECLAB_SDPA_LSE=0 from here"; export SPECLAB_SDPA_LSE=0; fi
      ;;
    flux)
      timeout "${FLUX_S:-170}" python3 -m scripts.bench.specdiff --random-flux-dev --steps 28 --size 1024 \
        --cache-rates 0.85,0.95 --c3-modes history,taylor --score-every 4 --taylorseer lite --speca every:8 \
        --graphs-check --profile "$OUT/profile.txt" --repeats 3 --json "$OUT/flux_eager.json" 2>&1 \
        | tee "$OUT/flux_eager.log"
      ;;
    compiled)
      timeout "${COMPILED_S:-330}" python3 -m scripts.bench.specdiff --random-flux-dev --steps 28 --size 1024 \
        --modes compiled --cache-rates 0.85,0.95 --c3-modes history --score-every 4 --taylorseer lite \
        --repeats 3 --json "$OUT/flux_compiled.json" 2>&1 | tee "$OUT/flux_compiled.log"
      ;;
    both)  # eager (query strides 2 and 4) then compiled, one process (one model build)
      timeout "${BOTH_S:-265}" python3 -m scripts.bench.specdiff --random-flux-dev --steps 28 --size 1024 \
        --modes eager,compiled --cache-rates 0.85,0.95 --c3-modes history --score-every 4 \
        --score-query-stride 2,4 --taylorseer lite --repeats 3 --json "$OUT/flux_both.json" 2>&1 \
        | tee "$OUT/flux_both.log"
      ;;
    text)
      timeout "${TEXT_S:-420}" python3 -m scripts.bench.specdiff --random-flux-dev --steps 28 --size 1024 \
        --modes "${TEXT_MODES:-eager,compiled}" --cache-rates 0.85,0.95 --text-tokens compute,cache --score-every 4 \
        --taylorseer lite --repeats 3 \
        --json "$OUT/flux_text.json" 2>&1 | tee "$OUT/flux_text.log"
      ;;
    video)
      timeout "${VIDEO_S:-150}" python3 -m scripts.bench.video --schedules "" --cache-rates 0.85 --repeats 1 \
        --json "$OUT/video.json" 2>&1 | tee "$OUT/video.log"
      ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)" | tee -a "$OUT/gpu.txt"

#!/usr/bin/env bash
# SpeCa and SpecDiff under diffusers' context parallelism, one device call on a machine with 2 GPUs
# (docs/distributed.md). Run from the folder that holds accel/ and scripts/; the diffusers wheel comes from $WHL
# (default .whl), results go to $OUT.
#
#   bash scripts/bench/gpu_multi.sh smoke flux video
#
# Stages (each under its own time limit, so that one slow stage leaves the others' results):
#   smoke  FLUX-small random bf16 at 512², 8 steps: 1 GPU, then 2 ranks (Ulysses): NCCL, the all-to-alls and the
#          rank-consistent decisions work before the big run
#   flux   FLUX.1-dev-sized random bf16 transformer at 2048², 28 steps: plain / SpeCa adaptive / SpeCa every:8 /
#          SpecDiff 0.85, first on GPU 0 alone (the reference), then on 2 ranks; wall times, outputs against the
#          1-GPU run of the same row, decisions equal to it, decisions identical on both ranks (summary.json)
#   video  HunyuanVideo: diffusers 0.42.1 has no context-parallel plan for HunyuanVideoTransformer3DModel (and
#          SpecLab's HunyuanVideo adapter refuses CP): prints what this diffusers has, runs nothing
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/multi_out}
mkdir -p "$OUT"
WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=index,name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"

pair() {  # name, time limit of each pass, then the benchmark's arguments
  local name=$1 limit=$2; shift 2
  mkdir -p "$OUT/$name"
  echo "--- $name: 1 GPU $(date +%T)"
  CUDA_VISIBLE_DEVICES=0 timeout "$limit" python3 -m scripts.bench.multi_gpu --out "$OUT/$name" "$@" 2>&1 \
    | grep -v "UserWarning\|warnings.warn" | tee "$OUT/$name/1gpu.log"
  echo "--- $name: 2 ranks $(date +%T)"
  timeout "$limit" python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m scripts.bench.multi_gpu \
    --out "$OUT/$name" "$@" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$OUT/$name/2gpu.log"
}

for stage in "$@"; do
  echo "=== $stage $(date +%T)" | tee -a "$OUT/gpu.txt"
  case $stage in
    smoke) pair smoke "${SMOKE_S:-90}" --model flux-small --size 512 --steps 8 ;;
    flux) pair flux "${FLUX_S:-270}" --model flux-dev --size 2048 --steps "${FLUX_STEPS:-28}" --repeats 1 ;;
    video)
      python3 -c "
from diffusers import HunyuanVideoTransformer3DModel as M
print('HunyuanVideoTransformer3DModel._cp_plan =', getattr(M, '_cp_plan', None))
print('not run: without a CP plan enable_parallelism refuses this model; SpecLab refuses CP on it (docs/distributed.md)')
" 2>&1 | tee "$OUT/video.log"
      ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)" | tee -a "$OUT/gpu.txt"

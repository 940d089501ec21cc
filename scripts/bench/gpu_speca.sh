#!/usr/bin/env bash
# One device call (H100, < 9 min): the SpeCa benchmark of issue 10, eager then regionally compiled
# (compile_repeated_blocks), on the FLUX.1-dev-sized random bf16 transformer at 1024², 50 steps. Rows: plain,
# SpeCa stack / per-block / output forecast at every:8 (order 1), SpeCa stack / output at every:12 (7 full steps
# of 50), cache-dit DBCache F1B0 + TaylorSeer o1 at the same mask, diffusers TaylorSeerCache lite interval 8;
# 3 timed calls each.
# First the Triton kernel tests (tests/test_kernels.py, tests/test_speca_kernels.py): if they fail, the benchmarks
# run on the torch fallbacks (SPECLAB_FUSED=0) and say so. Under $OUT: gpu.txt, kernels.log, eager.log/.json,
# compiled.log/.json (compiled.log carries TORCH_LOGS=recompiles).
# From the repository root: bash scripts/bench/gpu_speca.sh
# Needs the diffusers and cache-dit wheels in .whl (carry: [".whl"]); the device image has no diffusers.
# Time limits per stage keep the whole call inside 9 minutes; each row is printed as JSON when it ends, so a
# stage cut short still reports the rows it finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/bench/device_env.sh .whl
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, diffusers, cache_dit; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'cache-dit', cache_dit.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/gpu.txt"
KTESTS=${KTESTS:-tests/test_kernels.py tests/test_speca_kernels.py tests/test_speca_graphs.py tests/test_specdiff_graphs.py}
timeout 90 python3 -m pytest -q $KTESTS > "$OUT/kernels.log" 2>&1
k=$?; echo "exit $k" >> "$OUT/kernels.log"; tail -2 "$OUT/kernels.log"
if [ $k -ne 0 ]; then export SPECLAB_FUSED=0; echo "kernel tests failed: benchmarks on the torch fallbacks"; fi
ROWS=${ROWS:-stack/every:8/1,per_block/every:8/1,stack/every:12/1,output/every:8/1,output/every:12/1,cachedit,lite}
# compiled: the SpeCa rows that share the plain graphs first, the per-block forecast (two tapped graphs) last
CROWS=${CROWS:-stack/every:8/1,stack/every:12/1,output/every:8/1,output/every:12/1,cachedit,lite,per_block/every:8/1}
timeout 140 python3 -m scripts.bench.speca --rows "$ROWS" --repeats 3 --json "$OUT/eager.json" \
  > "$OUT/eager.log" 2>&1; echo "eager exit $?" >> "$OUT/eager.log"
TORCH_LOGS=recompiles timeout 300 python3 -m scripts.bench.speca --compile --rows "$CROWS" --repeats 3 \
  --json "$OUT/compiled.json" > "$OUT/compiled.log" 2>&1; echo "compiled exit $?" >> "$OUT/compiled.log"
# the tables (the reply shows the end of the output)
grep -v "^{" "$OUT/eager.log" | grep -v "Cache-DiT\|transformers\]" | tail -14
grep -c "Recompiling" "$OUT/compiled.log" | sed 's/^/recompile messages in compiled.log: /'
grep -v "^{" "$OUT/compiled.log" | grep -v "Cache-DiT\|transformers\]\|__recompiles\|^V1\|^W1\|^I1" | tail -12
[ -n "${SPECLAB_FUSED:-}" ] && echo "(torch fallbacks: SPECLAB_FUSED=0)"
exit 0

#!/usr/bin/env bash
# One device call (H100, < 10 min): build and train the tiny HunyuanVideo in two variants side by side
# (8 and 16 latent channels; the tiny model leaves the GPU mostly idle, so two runs cost about one), each
# scored for motion/colour adherence at checkpoints and at the end. Results come back under $OUT:
# NAME.log (the training log) and NAME.tar.part* (the model folder with train_log.json and samples.png,
# split under the 16 MiB per-file limit). Unpack here with:
#   cat NAME.tar.part* | tar -x -C /tmp      # -> /tmp/NAME/
# With CONTINUE_FROM=FOLDER it instead continues one trained folder alone (-> cont.log, cont.tar.part*).
# Needs the diffusers/transformers wheels in .whl (the device image has no diffusers).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
VAE_S=${VAE_S:-160}; DIT_S=${DIT_S:-270}
run() {
  local name=$1 ch=$2; shift 2
  python3 -m scripts.tiny_video.build --out "/tmp/$name" --force --latent-channels "$ch" > "$OUT/$name.log" 2>&1
  python3 -m scripts.tiny_video.train --model "/tmp/$name" --eval --vae-bf16 --vae-seconds "$VAE_S" \
    --dit-seconds "$DIT_S" --eval-every 60 --log-every 500 "$@" >> "$OUT/$name.log" 2>&1
  cp "$OUT/$name.log" "/tmp/$name/train_stdout.log"
  tar -C /tmp -cf "/tmp/$name.tar" "$name" && split -b 15M "/tmp/$name.tar" "$OUT/$name.tar.part"
}
if [ -n "${CONTINUE_FROM:-}" ]; then
  # Second stage: continue a trained folder alone on the GPU (VAE fine-tune, then the transformer warm-started
  # from its weights; the VAE's latents move little, the transformer adapts within its first steps).
  rm -rf /tmp/cont && cp -r "$CONTINUE_FROM" /tmp/cont && rm -f /tmp/cont/samples.png
  python3 -m scripts.tiny_video.train --model /tmp/cont --eval --vae-bf16 --vae-seconds "$VAE_S" --vae-lr 5e-4 \
    --dit-seconds "$DIT_S" --lr 6e-4 --eval-every 110 --log-every 500 \
    > "$OUT/cont.log" 2>&1 || echo "cont failed"
  cp "$OUT/cont.log" /tmp/cont/train_stdout.log
  tar -C /tmp -cf /tmp/cont.tar cont && split -b 15M /tmp/cont.tar "$OUT/cont.tar.part"
  names=cont
else
  run c8 8 & p1=$!
  run c16 16 & p2=$!
  wait $p1 || echo "c8 failed"
  wait $p2 || echo "c16 failed"
  names="c8 c16"
fi
for n in $names; do grep -h "vae done\|encoded\|eval at\|dit done\|adherence" "$OUT/$n.log" || true; done
ls -la "$OUT"

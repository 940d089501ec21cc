# Sourced by the one-call device scripts (scripts/bench/gpu_*.sh) from the repository root: installs the carried
# wheels of folder $1 (e.g. .whl; the device image has no diffusers) into /tmp/site, sets the environment every
# device run uses, and makes $OUT. Usage: source scripts/bench/device_env.sh .whl   (name the folder: without it,
# $1 would be the sourcing script's own first argument)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${1:?the wheel folder, e.g. .whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"

#!/usr/bin/env bash
# The wheels that carry the lab (gradio, plotly, diffusers and what they need beyond the device image's packages)
# to a GPU machine, slimmed (scripts/bench/slim_wheels.py) to fit the device's 64 MiB limit with the tree.
#   bash scripts/bench/slim_wheels.sh            # -> .whl-lab/ for CPython 3.12 manylinux x86_64 (the device)
#   PYVER=3.11 DEST=/tmp/whl311 bash scripts/bench/slim_wheels.sh   # the same set for a local check
# Then, on the device: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#   --target /tmp/site .whl-lab/*.whl && export PYTHONPATH=/tmp/site
# The list: what gradio 6.31 / gradio_client / plotly / diffusers import that the device image lacks
# (/work/.library/device/KINDS.md "Python packages already there"; fastapi imports opentelemetry-api). gradio's
# the check (scripts/bench/check_slim_wheels.py) proves the set serves /generate.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl-lab}
CACHE=${CACHE:-/tmp/speclab-wheels-$PYVER}
PKGS="gradio==6.31.0 gradio_client==2.7.2 hf-gradio==0.4.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 orjson==3.13.0
python-multipart==0.0.34 safehttpx==0.1.7 groovy==0.1.2 semantic-version==2.10.0 tomlkit==0.14.0 brotli==1.2.1
pydub==0.25.1 pytz==2026.6 plotly==7.1.0 opentelemetry-api==1.45.2 diffusers==0.42.1"
mkdir -p "$CACHE"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$CACHE" $PKGS
rm -rf "$DEST"
python3 -m scripts.bench.slim_wheels "$CACHE" "$DEST"
du -sh "$DEST"

#!/usr/bin/env bash
# On a machine with CUDA and Triton (and diffusers, which `import accel` needs): the Triton kernels vs their torch fallbacks.
cd "$(dirname "$0")/.." && exec python3 -m pytest tests/test_kernels.py tests/test_speca_kernels.py tests/test_speca_graphs.py -v "$@"

import os

import pytest

# The repository root (for `accel`, `lab`, `scripts`) and tests/ (for the `tiny*` helpers) are on sys.path through
# pytest's `pythonpath` option in pyproject.toml.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cuda_pipe():
    """The tiny random FLUX (tests/tiny.py) on CUDA, for the CUDA-only tests (CUDA graphs)."""
    import tiny

    return tiny.tiny_flux_pipe(device="cuda")

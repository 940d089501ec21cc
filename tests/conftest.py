import os

# The repository root (for `accel`, `lab`, `scripts`) and tests/ (for the `tiny*` helpers) are on sys.path through
# pytest's `pythonpath` option in pyproject.toml.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

"""FLUX: the adapter (adapter.py) and SpecDiff's attention processor (attention.py)."""

from .adapter import FluxAdapter
from .attention import FluxSpecDiffAttnProcessor

__all__ = ["FluxAdapter", "FluxSpecDiffAttnProcessor"]

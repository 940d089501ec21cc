"""HunyuanVideo: the adapter (adapter.py) and SpecDiff's attention processor (attention.py)."""

from .adapter import HunyuanVideoAdapter
from .attention import HunyuanVideoSpecDiffAttnProcessor

__all__ = ["HunyuanVideoAdapter", "HunyuanVideoSpecDiffAttnProcessor"]

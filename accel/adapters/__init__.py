"""Adapters, one file per model family. A new family: subclass `Adapter` in a new file, add it to ADAPTERS."""

from __future__ import annotations

from torch import nn

from .base import Adapter, BlockSpec, Contribution, FeatureSite, GateSite, TokenLayout
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter

ADAPTERS: list[type[Adapter]] = [FluxAdapter, HunyuanVideoAdapter]


def adapter_for(transformer: nn.Module) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(transformer):
            return cls(transformer)
    supported = ", ".join(c for a in ADAPTERS for c in a.transformer_classes)
    raise ValueError(
        f"unsupported model: {type(transformer).__name__} has no SpecLab adapter; supported transformers: "
        f"{supported}. Add one file under accel/adapters/ to support a new family."
    )


__all__ = ["ADAPTERS", "Adapter", "BlockSpec", "Contribution", "FeatureSite", "GateSite", "TokenLayout", "adapter_for"]

"""Adapters: what the methods need to know about each model family, one folder per family
(`flux/`, `hunyuan_video/`: the adapter and SpecDiff's attention processor). Shared by the families:
`base.py` (the `Adapter` contract, `CallArgs`), `dual_stream.py` (double-/single-stream blocks) and
`kv_attention.py` (SpecDiff's attention score and K/V cache). A new family: one folder, and its adapter class
added to ADAPTERS (docs/architecture-adapters.md)."""

from __future__ import annotations

from torch import nn

from .base import Adapter, BlockSpec, CallArgs, Contribution, FeatureSite, GateSite, TokenLayout
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter

ADAPTERS: list[type[Adapter]] = [FluxAdapter, HunyuanVideoAdapter]
"""Tried in order by `adapter_for`; the first whose `matches` accepts the transformer is used."""


def adapter_for(transformer: nn.Module) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(transformer):
            return cls(transformer)
    supported = ", ".join(c for a in ADAPTERS for c in a.transformer_classes)
    raise ValueError(
        f"unsupported model: {type(transformer).__name__} has no SpecLab adapter; supported transformers: "
        f"{supported}. Add one folder under accel/adapters/ to support a new family."
    )


__all__ = ["ADAPTERS", "Adapter", "BlockSpec", "CallArgs", "Contribution", "FeatureSite", "GateSite", "TokenLayout",
           "adapter_for"]

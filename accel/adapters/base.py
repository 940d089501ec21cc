"""What the methods need to know about a model family. One subclass per family, one file each.

The core (SpeCa, SpecDiff) never names a model class: it asks the adapter which blocks there are, where
their inputs sit in the call, which sub-module outputs are the cacheable features, and how a block's
output is rebuilt from (forecast) features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureSite:
    """A sub-module of a block whose output (or some items of its tuple output) is a cached feature."""

    module: nn.Module
    names: tuple[str, ...]
    """Feature names for the output items; with `index=None` the whole output is `names[0]`."""
    index: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BlockSpec:
    index: int  # position in execution order over all blocks
    name: str  # module path inside the transformer, e.g. "single_transformer_blocks.37"
    kind: str  # "double" | "single"
    module: nn.Module


@dataclass(frozen=True)
class TokenLayout:
    grid: tuple[int, ...]  # image-token grid: (h, w) or (frames, h, w)
    n_text: int

    @property
    def n_image(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


def arg(args: tuple, kwargs: dict, position: int, name: str):
    """A call argument given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if position < len(args):
        return args[position]
    return None


class Adapter:
    family = "base"
    transformer_classes: tuple[str, ...] = ()
    timestep_scale = 1.0
    """The transformer receives `scheduler timestep / timestep_scale`."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    @classmethod
    def matches(cls, transformer: nn.Module) -> bool:
        return type(transformer).__name__ in cls.transformer_classes

    # ---- structure -------------------------------------------------------------------
    def blocks(self) -> list[BlockSpec]:
        raise NotImplementedError

    def token_layout(self, args: tuple, kwargs: dict) -> TokenLayout:
        """Image-token grid and text length of a transformer call."""
        raise NotImplementedError

    # ---- SpeCa: features ---------------------------------------------------------------
    def feature_sites(self, block: BlockSpec) -> list[FeatureSite]:
        raise NotImplementedError

    def apply_features(self, block: BlockSpec, args: tuple, kwargs: dict, feats: dict[str, torch.Tensor]):
        """The block's output with its computed features replaced by `feats` (modulation still real)."""
        raise NotImplementedError

    def verify_feature(self, block: BlockSpec) -> str:
        """Name of the feature compared on verification."""
        raise NotImplementedError

    def image_tokens(self, block: BlockSpec, feature: str, layout: TokenLayout) -> slice:
        """Where the image tokens sit along dim 1 of a feature."""
        raise NotImplementedError

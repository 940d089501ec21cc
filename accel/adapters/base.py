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
class GateSite:
    """The gate of one feature: chunk `chunk` of `n_chunks` of an adaLN modulation linear's output."""

    feature: str
    linear: nn.Linear
    n_chunks: int
    chunk: int


@dataclass(frozen=True)
class Contribution:
    """What a block adds to a residual stream: gate(feature) * feature[:, row_start : row_start + len(stream)]."""

    stream: str
    feature: str
    row_start: int = 0


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

    def block_containers(self) -> list[tuple[nn.Module, str]]:
        """The `nn.ModuleList`s whose blocks the transformer's forward iterates, as (owner, attribute name), in
        execution order; `blocks()` lists their blocks in the same order. SpeCa gives a step its own view of the
        model by putting other lists there for the duration of one call (accel/speca.py)."""
        raise NotImplementedError

    def token_layout(self, args: tuple, kwargs: dict) -> TokenLayout:
        """Image-token grid and text length of a transformer call."""
        raise NotImplementedError

    # ---- SpeCa: features ---------------------------------------------------------------
    def feature_sites(self, block: BlockSpec) -> list[FeatureSite]:
        raise NotImplementedError

    def gate_sites(self, block: BlockSpec) -> list[GateSite]:
        """Where each feature's gate comes from (speculative steps recompute gates, nothing else)."""
        raise NotImplementedError

    def gate_input(self, temb: torch.Tensor) -> torch.Tensor:
        """The modulation linears' input (FLUX: silu(temb)); the same for every block."""
        raise NotImplementedError

    def block_temb(self, args: tuple, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def contributions(self, block: BlockSpec, layout: TokenLayout) -> list[Contribution]:
        """A block's output = its input streams + sum of gate * feature over these."""
        raise NotImplementedError

    def block_streams(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The residual streams a block call receives, by name."""
        raise NotImplementedError

    def block_output(self, block: BlockSpec, streams: dict[str, torch.Tensor]):
        """The block's return value built from streams (argument order, output order)."""
        raise NotImplementedError

    def output_streams(self, block: BlockSpec, output) -> dict[str, torch.Tensor]:
        """The residual streams a block call returned, by name (the inverse of `block_output`)."""
        raise NotImplementedError

    def with_block_streams(self, args: tuple, kwargs: dict, streams: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        """The block call with its streams replaced."""
        raise NotImplementedError

    def verify_feature(self, block: BlockSpec) -> str:
        """Name of the feature compared on verification."""
        raise NotImplementedError

    def image_tokens(self, block: BlockSpec, feature: str, layout: TokenLayout) -> slice:
        """Where the image tokens sit along dim 1 of a feature."""
        raise NotImplementedError

    # ---- SpecDiff: token subsets, K/V-caching attention, re-running a step ---------------------
    def attention_modules(self) -> list[nn.Module]:
        """Every attention module whose processor SpecDiff replaces, in execution order."""
        raise NotImplementedError

    def kv_cache_processor(self, attn: nn.Module, layer: int, control):
        """A processor for `attn` that keeps a K/V cache and scores attention received (accel.attention)."""
        raise NotImplementedError

    def set_attention_processor(self, attn: nn.Module, processor) -> None:
        attn.set_processor(processor)

    def get_attention_processor(self, attn: nn.Module):
        return attn.processor

    def joint_rows(self, layout: TokenLayout, image_index: torch.Tensor) -> torch.Tensor:
        """Positions, in an attention layer's joint token sequence, of all text tokens and of the image tokens
        `image_index`, in the order the subset call feeds them."""
        raise NotImplementedError

    def image_key_start(self, layout: TokenLayout) -> int:
        """Where the image tokens start among an attention layer's keys."""
        raise NotImplementedError

    def call_latents(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The noisy latent tokens of a transformer call, [batch, image tokens, channels]."""
        raise NotImplementedError

    def with_call_inputs(self, args: tuple, kwargs: dict, latents: torch.Tensor | None = None,
                         timestep: torch.Tensor | None = None, image_index: torch.Tensor | None = None):
        """(args, kwargs) of the same call with other latents / timestep, or restricted to the image tokens
        `image_index` (latents and their position ids), so the model computes only those image tokens."""
        raise NotImplementedError

    def run_subset(self, forward, args: tuple, kwargs: dict, image_index: torch.Tensor):
        """Run `forward` (the transformer's own forward) on all text tokens and the image tokens `image_index`
        only: (the call's return value, the model output of those tokens [batch, len(image_index), channels]).
        Default: restrict the call's inputs (`with_call_inputs`); a model that cannot take a token subset as
        input overrides this."""
        sub_args, sub_kwargs = self.with_call_inputs(args, kwargs, image_index=image_index)
        out = forward(*sub_args, **sub_kwargs)
        return out, self.output_sample(out)

    def sample_tokens(self, sample: torch.Tensor) -> torch.Tensor:
        """A model output tensor as per-image-token values [batch, image tokens, channels] (token order of
        the layout grid). Default: the output already is."""
        return sample

    def tokens_sample(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The inverse of `sample_tokens`."""
        return tokens

    def call_timestep(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The timestep argument of a transformer call."""
        raise NotImplementedError

    def model_timestep(self, sigma: float, scheduler, args: tuple, kwargs: dict) -> torch.Tensor:
        """The transformer's timestep argument for noise level `sigma`, shaped and typed like the one of the
        call (args, kwargs). Flow-matching schedulers: scheduler timestep = sigma * num_train_timesteps."""
        t = float(sigma) * float(getattr(scheduler.config, "num_train_timesteps", 1000)) / self.timestep_scale
        return torch.full_like(self.call_timestep(args, kwargs), t)

    def output_sample(self, out) -> torch.Tensor:
        """The model output tensor of a transformer call's return value (tuple or output dataclass)."""
        return out[0] if isinstance(out, (tuple, list)) else out.sample

    def with_output_sample(self, out, sample: torch.Tensor):
        """`out` with its output tensor replaced by `sample`."""
        if isinstance(out, (tuple, list)):
            return type(out)([sample, *out[1:]])
        out.sample = sample
        return out

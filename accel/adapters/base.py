"""What the methods need to know about a model family. One `Adapter` subclass per family, in one folder per
family (`accel/adapters/<family>/`, with its SpecDiff attention processor); docs/architecture-adapters.md says
how to add one.

The core (SpeCa, SpecDiff) never names a model class: it asks the adapter which blocks there are, which
inputs a call carries, which sub-module outputs are the cacheable features, and how a block's output is
rebuilt from (forecast) features. Call arguments are found by name (`CallArgs`), never by a hard-coded position.
"""

from __future__ import annotations

import functools
import inspect
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


class CallArgs:
    """The arguments of one `forward` by name, whether a call gives them by keyword or by position.

    Each parameter's position is read once from `inspect.signature(forward)` (as diffusers'
    `TransformerBlockMetadata` does) and cached per module class (`CallArgs.of`)."""

    def __init__(self, forward):
        params = list(inspect.signature(forward).parameters.values())[1:]  # without self
        self.name = getattr(forward, "__qualname__", repr(forward))
        self.positions = {p.name: i for i, p in enumerate(params)
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
        """Where each parameter sits when the call gives it by position."""
        self.defaults = {p.name: None if p.default is p.empty else p.default
                         for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        self.takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)

    @classmethod
    @functools.cache
    def of(cls, module_class: type) -> CallArgs:
        """The call arguments of `module_class.forward` (one instance per class)."""
        return cls(module_class.forward)

    @classmethod
    def shared(cls, module_classes, names: tuple[str, ...]) -> CallArgs:
        """One binding for calls to any of `module_classes` (e.g. a family's double and single blocks), which
        must take each of `names` at the same position; a ValueError names the class that does not."""
        bindings = [cls.of(c) for c in module_classes]
        first = bindings[0]
        for b in bindings[1:]:
            for name in names:
                if b.positions.get(name) != first.positions.get(name):
                    raise ValueError(f"{b.name} takes {name!r} at position {b.positions.get(name)}, {first.name} at "
                                     f"{first.positions.get(name)}: their calls cannot share one binding")
        return first

    def _position(self, name: str) -> int | None:
        if name not in self.defaults and not self.takes_any_keyword:
            raise ValueError(f"{self.name} has no argument {name!r}")
        return self.positions.get(name)

    def get(self, args: tuple, kwargs: dict, name: str):
        """The value `forward` receives for `name` in the call (args, kwargs): keyword, position or default
        (None for a required argument the call lacks)."""
        if name in kwargs:
            return kwargs[name]
        i = self._position(name)
        if i is not None and i < len(args):
            return args[i]
        return self.defaults.get(name)

    def replace(self, args: tuple, kwargs: dict, **values) -> tuple[tuple, dict]:
        """(args, kwargs) of the same call with the arguments `values` replaced, each where the call gave it
        (keyword or position; one it lacks is added as a keyword), so nothing else about the call changes."""
        args, kwargs = list(args), dict(kwargs)
        for name, value in values.items():
            i = self._position(name)
            if name in kwargs or i is None or i >= len(args):
                kwargs[name] = value
            else:
                args[i] = value
        return tuple(args), kwargs


class Adapter:
    family = "base"
    transformer_classes: tuple[str, ...] = ()
    timestep_scale = 1.0
    """The transformer receives `scheduler timestep / timestep_scale`."""
    supports_context_parallel = False
    """SpeCa and SpecDiff may run under diffusers' context parallelism on this family (accel/distributed.py):
    its CP plan splits text and image tokens in equal contiguous chunks and every block's joint sequence on a
    rank is [its text shard, its image shard], text first."""
    supports_text_cache = False
    """SpecDiff's `text_tokens="cache"` works on this family: its transformer takes a call with no text tokens
    (`with_call_inputs(..., text=False)`), and text reaches the image tokens only through attention, so the text
    rows of the K/V caches stand for the text stream."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.call_args = CallArgs.of(type(transformer))
        """The transformer's own forward arguments by name."""

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

    def rotary_modules(self) -> list[nn.Module]:
        """Sub-modules whose output is the same at every step of one pipeline call: the rotary position
        embeddings, a function of token positions that the pipelines set once per call (FLUX: `pos_embed` of
        the text and image ids; HunyuanVideo: `rope` of the latents' shape). A SpeCa speculative step takes
        their output from the run's last full step instead of recomputing it (tens of small kernels)."""
        return []

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
        """A processor for `attn` that keeps a K/V cache and scores attention received: a subclass of
        `kv_attention.KVCacheAttnProcessor` in the family's folder."""
        raise NotImplementedError

    def set_attention_processor(self, attn: nn.Module, processor) -> None:
        attn.set_processor(processor)

    def get_attention_processor(self, attn: nn.Module):
        return attn.processor

    def joint_rows(self, layout: TokenLayout, image_index: torch.Tensor, text: bool = True) -> torch.Tensor:
        """Positions, in an attention layer's joint token sequence, of all text tokens (none when `text` is
        False) and of the image tokens `image_index`, in the order the subset call feeds them."""
        raise NotImplementedError

    def image_key_start(self, layout: TokenLayout) -> int:
        """Where the image tokens start among an attention layer's keys."""
        raise NotImplementedError

    def call_latents(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The noisy latent tokens of a transformer call, [batch, image tokens, channels]."""
        raise NotImplementedError

    def with_call_inputs(self, args: tuple, kwargs: dict, latents: torch.Tensor | None = None,
                         timestep: torch.Tensor | None = None, image_index: torch.Tensor | None = None,
                         text: bool = True):
        """(args, kwargs) of the same call with other latents / timestep, or restricted to the image tokens
        `image_index` (latents and their position ids), so the model computes only those image tokens; with
        `text` False also without any text token (families with `supports_text_cache`)."""
        raise NotImplementedError

    def run_subset(self, forward, args: tuple, kwargs: dict, image_index: torch.Tensor, text: bool = True):
        """Run `forward` (the transformer's own forward) on all text tokens (none when `text` is False) and the
        image tokens `image_index` only: (the call's return value, the model output of those tokens
        [batch, len(image_index), channels]). Default: restrict the call's inputs (`with_call_inputs`); a model
        that cannot take a token subset as input overrides this."""
        sub_args, sub_kwargs = self.with_call_inputs(args, kwargs, image_index=image_index, text=text)
        out = forward(*sub_args, **sub_kwargs)
        return out, self.output_sample(out)

    def modulation_linears(self) -> list[nn.Module]:
        """The linears whose input is a function of the step's embedding only (adaLN modulation of every
        block and of the output norm; they take silu(temb)). SpecDiff computes their outputs for all
        remaining steps at once when `step_embeddings` can tell the embeddings ahead. Default: none."""
        return []

    def step_embeddings(self, args: tuple, kwargs: dict, scheduler_timesteps: torch.Tensor) -> torch.Tensor | None:
        """temb [steps, batch, dim] of the calls the pipeline will make at `scheduler_timesteps` [steps] (the
        scheduler's timesteps), everything else as in the call (args, kwargs); None when the family cannot
        tell (no hoisting). Must equal what the model computes in those calls, up to the rounding of a
        batched matrix product."""
        return None

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

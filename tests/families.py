"""Model families for the contract suite (tests/test_contract.py): one `Family` object per family.

A family says how to build a tiny random pipeline, how to call it (prompts, negative prompts, latents), and the
few facts about its token layout that the contract's independent measurements need. Everything here is written
from diffusers' own classes, never from `accel` internals, so the contract checks `accel` against them.

A new family: write one `Family(...)` below and add it to `FAMILIES`; every contract test then runs on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.transformers import transformer_flux, transformer_hunyuan_video
from torch import nn

import tiny
import tiny_video


@dataclass
class Family:
    name: str
    """The family name `accel` writes into `trace.meta["family"]`."""
    make_pipe: Callable[[int], object]
    """seed -> a tiny random pipeline with a flow-matching scheduler and no progress bar."""
    steps: int
    """Denoising steps the contract runs (enough for warm-up plus several accelerated steps)."""
    prompt: Callable[[int, int], dict]
    """(seed, batch) -> the pipeline's prompt keyword arguments (embeddings given directly)."""
    negative: Callable[[int, int], dict] | None
    """(seed, batch) -> the negative-prompt keyword arguments for true CFG (`true_cfg_scale`); None where the
    family's pipeline has no true CFG."""
    latents: Callable[[int, int], torch.Tensor]
    """(seed, batch) -> initial latents in the layout the pipeline's `latents=` argument takes."""
    call_kwargs: dict
    """Size arguments of every call (height, width, frames...)."""
    output: Callable[[object], torch.Tensor]
    """The pipeline output object -> its latents."""
    grid: tuple[int, ...]
    """Image-token grid (h, w) or (frames, h, w)."""
    n_text: int
    """Text tokens of a transformer call (padding included)."""
    image_key_start: int
    """Where the image tokens start in the joint attention sequence (FLUX [text, image]: n_text; HunyuanVideo
    [image, text]: 0)."""
    attention_modules: tuple = ()
    """Python modules whose `dispatch_attention_fn` the family's diffusers attention processors call (the
    contract patches it to record and rebuild attention on its own)."""
    out_tokens: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    """A transformer output tensor -> per-image-token values [B, N, C] in token-grid order."""
    timestep_scale: float = 1.0
    """The transformer's `timestep` argument = sigma * 1000 / timestep_scale."""
    rotary: Callable[[nn.Module], nn.Module] = lambda t: t.pos_embed
    """transformer -> its rotary position module (FLUX `pos_embed`, HunyuanVideo `rope`)."""
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # pytest ids
        return self.name

    @property
    def n_image(self) -> int:
        return math.prod(self.grid)

    def call(self, pipe, steps: int, seed: int = 0, batch: int = 1, prompt_seed: int = 1, **kw) -> torch.Tensor:
        """One pipeline call (latents out). `prompt=`/`latents=` in kw override the defaults."""
        args = dict(self.prompt(prompt_seed, batch))
        args.update(self.call_kwargs)
        args.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="latent")
        args.update(kw)
        return self.output(pipe(**args))

    def run(self, pipe, steps: int | None = None, **kw) -> torch.Tensor:
        return self.call(pipe, self.steps if steps is None else steps, **kw)

    # ---- what the contract measures -------------------------------------------------------------------------
    def joint_image_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Positions of image tokens `index` in the joint attention sequence."""
        return index + self.image_key_start

    def joint_text_rows(self) -> torch.Tensor:
        start = 0 if self.image_key_start else self.n_image
        return torch.arange(start, start + self.n_text)

    @staticmethod
    def blocks(transformer) -> list[nn.Module]:
        """The transformer blocks in execution order (both families: double-stream then single-stream)."""
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    @staticmethod
    def call_marker(transformer) -> nn.Module:
        """A module that runs exactly once at the start of every transformer call, also when a method calls the
        transformer's forward directly (SpecDiff's pre-run bypasses `__call__`)."""
        return transformer.x_embedder


# ---- FLUX ---------------------------------------------------------------------------------------------------
def _flux_prompt(seed: int, batch: int) -> dict:
    pe, pooled = tiny.embeds(seed=seed, batch=batch)
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)


def _flux_negative(seed: int, batch: int) -> dict:
    pe, pooled = tiny.embeds(seed=seed, batch=batch)
    return dict(negative_prompt_embeds=pe, negative_pooled_prompt_embeds=pooled)


FLUX_SIZE = 64  # 4 x 4 = 16 image tokens
FLUX = Family(
    name="flux",
    make_pipe=lambda seed: tiny.tiny_flux_pipe(seed=seed),
    steps=12,
    prompt=_flux_prompt,
    negative=_flux_negative,
    # packed latents [B, tokens, 4 channels x 2 x 2]
    latents=lambda seed, batch: torch.randn(batch, (FLUX_SIZE // 16) ** 2, 16,
                                            generator=torch.Generator().manual_seed(seed)),
    call_kwargs=dict(height=FLUX_SIZE, width=FLUX_SIZE),
    output=lambda out: out.images,
    grid=(FLUX_SIZE // 16, FLUX_SIZE // 16),
    n_text=tiny.TXT_LEN,
    image_key_start=tiny.TXT_LEN,
    attention_modules=(transformer_flux,),
    timestep_scale=1000.0,
)


# ---- HunyuanVideo -------------------------------------------------------------------------------------------
def _video_prompt(seed: int, batch: int) -> dict:
    pe, pooled, mask = tiny_video.embeds(seed=seed, batch=batch)
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)


def _video_negative(seed: int, batch: int) -> dict:
    pe, pooled, mask = tiny_video.embeds(seed=seed, batch=batch)
    return dict(negative_prompt_embeds=pe, negative_pooled_prompt_embeds=pooled, negative_prompt_attention_mask=mask)


def _video_tokens(sample: torch.Tensor, pt: int = 1, p: int = 2) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F/pt * H/p * W/p, C*pt*p*p]: the rows of the model's final projection (diffusers
    unpatchifies them as (B, F', H', W', C, pt, p, p) -> (B, C, F'pt, H'p, W'p))."""
    b, c, f, h, w = sample.shape
    x = sample.reshape(b, c, f // pt, pt, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)


VIDEO = Family(
    name="hunyuan_video",
    make_pipe=lambda seed: tiny_video.tiny_video_pipe(seed=seed),
    steps=8,
    prompt=_video_prompt,
    negative=_video_negative,
    # [B, C, latent frames, h, w]: 9 frames -> 3 latent frames, 64 px -> 8 x 8
    latents=lambda seed, batch: torch.randn(batch, 4, tiny_video.GRID[0], tiny_video.GRID[1] * 2,
                                            tiny_video.GRID[2] * 2, generator=torch.Generator().manual_seed(seed)),
    call_kwargs=dict(height=tiny_video.SIZE, width=tiny_video.SIZE, num_frames=tiny_video.FRAMES),
    output=lambda out: out.frames,
    grid=tiny_video.GRID,
    n_text=tiny_video.TXT_LEN,
    image_key_start=0,
    attention_modules=(transformer_hunyuan_video,),
    out_tokens=_video_tokens,
    timestep_scale=1.0,
    rotary=lambda t: t.rope,
)

FAMILIES = [FLUX, VIDEO]

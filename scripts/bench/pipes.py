"""The pipelines the benchmarks (and the tests' mechanics checks) run: one random-weight builder per model
family, with named sizes, and the bundled tiny FLUX with its prompt encoded once.

Random pipelines have no VAE and no text encoders: the builders return the pipeline and the prompt
embeddings to call it with (`output_type="latent"`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_FLUX_DIR = os.path.join(ROOT, "assets", "models", "tiny-flux")
PROMPT = "a large red circle on the left and a small blue square on the right, on a gray background"

# FLUX.1-dev's scheduler: dynamic shifting on the image sequence length.
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                          use_dynamic_shifting=True)


@dataclass(frozen=True)
class FluxSize:
    """A random FLUX: the transformer's config, its scheduler's, and the prompt embeddings it is called with."""

    transformer: dict  # FluxTransformer2DModel arguments (patch_size=1 is added)
    text_len: int  # prompt-embedding tokens
    scheduler: dict = field(default_factory=dict)  # FlowMatchEulerDiscreteScheduler arguments
    guidance_scale: float | None = None  # passed with the embeddings when the transformer embeds guidance


FLUX_SIZES = {
    # FLUX.1-dev's transformer config: 19 double + 38 single blocks, 24 x 128 heads (a GPU benchmark)
    "dev": FluxSize(dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                    text_len=512, scheduler=FLUX_DEV_SCHEDULER, guidance_scale=3.5),
    # the same code path at a size a CPU runs in seconds (a smoke test of the dev-sized benchmark)
    "small": FluxSize(dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
                           num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
                      text_len=512, scheduler=FLUX_DEV_SCHEDULER, guidance_scale=3.5),
    # middle size: compute outweighs Python overhead on a CPU at 512px (1024 image tokens)
    "mid": FluxSize(dict(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
                         num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256,
                         guidance_embeds=False, axes_dims_rope=(8, 28, 28)),
                    text_len=64, scheduler=dict(shift=3.0)),
    # the tests' mechanics pipe (tests/tiny.py): 2 double + 3 single blocks, 2 x 16 heads, 8 text tokens
    "tiny": FluxSize(dict(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                          guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
                     text_len=8),
}


def random_flux(size: str, device="cpu", dtype=torch.float32, seed: int = 0, **transformer):
    """A `FluxPipeline` of `FLUX_SIZES[size]` with random weights (seeded `seed`), made on `device` in `dtype`;
    `transformer` overrides the transformer's config (e.g. `num_layers`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    spec = FLUX_SIZES[size]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            model = FluxTransformer2DModel(patch_size=1, **{**spec.transformer, **transformer}).eval()
    finally:
        torch.set_default_dtype(prev)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_embeds(size: str, device="cpu", dtype=torch.float32, seed: int = 1, batch: int = 1) -> dict:
    """Random prompt embeddings for `random_flux(size)`: `prompt_embeds`, `pooled_prompt_embeds` (and
    `guidance_scale` when the transformer embeds guidance), keyword arguments of the pipeline call."""
    spec = FLUX_SIZES[size]
    g = torch.Generator(device).manual_seed(seed)
    kw = dict(
        prompt_embeds=torch.randn(batch, spec.text_len, spec.transformer["joint_attention_dim"], generator=g,
                                  device=device, dtype=dtype),
        pooled_prompt_embeds=torch.randn(batch, spec.transformer["pooled_projection_dim"], generator=g,
                                         device=device, dtype=dtype),
    )
    if spec.guidance_scale is not None:
        kw["guidance_scale"] = spec.guidance_scale
    return kw


def bundled_flux(path: str, device, dtype, prompt: str = PROMPT):
    """A FluxPipeline folder (the bundled tiny FLUX) and its embeddings of `prompt` (32 T5 tokens)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    pe, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=32)
    return pipe, dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)


HUNYUAN_VIDEO_SIZES = {
    # HunyuanVideo's transformer config: 20 double + 40 single blocks, 24 x 128 heads
    "full": dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40,
                 num_refiner_layers=2, text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
    # the same code path at a size a CPU runs in seconds
    "small": dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, num_single_layers=4,
                  num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(8, 12, 12)),
}


def random_hunyuan_video(size: str, device, dtype, text_len: int, text_valid: int):
    """A `HunyuanVideoPipeline` of `HUNYUAN_VIDEO_SIZES[size]` with random weights and HunyuanVideo's scheduler
    (flow matching, shift 7); returns (pipe, call kwargs: prompt embeddings of `text_len` tokens of which the
    first `text_valid` are unmasked, attention mask, pooled embedding, guidance scale)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    cfg = HUNYUAN_VIDEO_SIZES[size]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, patch_size=2,
                                                         patch_size_t=1, guidance_embeds=True, **cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, text_len)
    mask[:, :text_valid] = 1  # a prompt shorter than the text length: the rest is padding, masked out
    kw = dict(prompt_embeds=torch.randn(1, text_len, cfg["text_embed_dim"], generator=g).to(device, dtype),
              pooled_prompt_embeds=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
              prompt_attention_mask=mask.to(device), guidance_scale=6.0)
    return pipe, kw

"""A tiny random FLUX pipeline for mechanics tests (no text encoders: prompt embeddings are given)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

TXT_DIM = 32
TXT_LEN = 8


def tiny_flux_pipe(seed: int = 0, double: int = 2, single: int = 3) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TXT_DIM, pooled_projection_dim=TXT_DIM,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed: int = 1, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TXT_LEN, TXT_DIM, generator=g), torch.randn(batch, TXT_DIM, generator=g))


def run(pipe, steps: int = 12, seed: int = 0, batch: int = 1, size: int = 64, **kw) -> torch.Tensor:
    pe, pooled = embeds(batch=batch)
    out = pipe(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent", **kw,
    )
    return out.images

"""A tiny random HunyuanVideo pipeline for mechanics tests (no text encoders, no VAE: prompt embeddings,
their attention mask and the pooled embedding are given; `output_type="latent"`)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

TXT_DIM = 16
POOLED_DIM = 8
TXT_LEN = 6
TXT_PAD = 2  # the last TXT_PAD text tokens are padding (masked out of attention), as real prompts have
FRAMES = 9  # -> (9 - 1) // 4 + 1 = 3 latent frames
SIZE = 64  # -> 8 x 8 latents -> 4 x 4 tokens per frame with patch_size 2
GRID = (3, 4, 4)


def tiny_video_pipe(seed: int = 0, double: int = 2, single: int = 2, patch_size: int = 2,
                    patch_size_t: int = 1) -> HunyuanVideoPipeline:
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=double,
        num_single_layers=single, num_refiner_layers=1, patch_size=patch_size, patch_size_t=patch_size_t,
        text_embed_dim=TXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4),
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed: int = 1, batch: int = 1):
    """(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TXT_LEN)
    mask[:, TXT_LEN - TXT_PAD:] = 0
    return torch.randn(batch, TXT_LEN, TXT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g), mask


def run(pipe, steps: int = 12, seed: int = 0, batch: int = 1, size: int = SIZE, frames: int = FRAMES,
        **kw) -> torch.Tensor:
    pe, pooled, mask = embeds(batch=batch)
    out = pipe(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask, height=size, width=size,
        num_frames=frames, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
        output_type="latent", **kw,
    )
    return out.frames

"""A tiny random FLUX pipeline for mechanics tests (no text encoders: prompt embeddings are given).

The builder is the benchmarks' (`scripts.bench.pipes`, size "tiny"), so the tests and `--tiny-random` runs use one
definition."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from scripts.bench.pipes import FLUX_SIZES, flux_embeds, random_flux

TXT_DIM = FLUX_SIZES["tiny"].transformer["joint_attention_dim"]
TXT_LEN = FLUX_SIZES["tiny"].text_len


def tiny_flux_pipe(seed: int = 0, double: int = 2, single: int = 3, device: str = "cpu") -> FluxPipeline:
    return random_flux("tiny", device, seed=seed, num_layers=double, num_single_layers=single)


def embeds(seed: int = 1, batch: int = 1, device: str = "cpu"):
    kw = flux_embeds("tiny", device, seed=seed, batch=batch)
    return kw["prompt_embeds"], kw["pooled_prompt_embeds"]


def run(pipe, steps: int = 12, seed: int = 0, batch: int = 1, size: int = 64, device: str = "cpu",
        **kw) -> torch.Tensor:
    pe, pooled = embeds(batch=batch, device=device)
    out = pipe(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator(device).manual_seed(seed), output_type="latent", **kw,
    )
    return out.images

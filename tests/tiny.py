"""A tiny random FLUX pipeline for mechanics tests (no text encoders: prompt embeddings are given).

The builder is the benchmarks' (`scripts.bench.pipes`, size "tiny"), so the tests and `--tiny-random` runs use one
definition."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from scripts.bench.pipes import FLUX_SIZES, flux_embeds, random_flux

TXT_DIM = FLUX_SIZES["tiny"].transformer["joint_attention_dim"]
TXT_LEN = FLUX_SIZES["tiny"].text_len


def tiny_flux_pipe(seed: int = 0, double: int = 2, single: int = 3) -> FluxPipeline:
    return random_flux("tiny", seed=seed, num_layers=double, num_single_layers=single)


def embeds(seed: int = 1, batch: int = 1):
    kw = flux_embeds("tiny", seed=seed, batch=batch)
    return kw["prompt_embeds"], kw["pooled_prompt_embeds"]


def run(pipe, steps: int = 12, seed: int = 0, batch: int = 1, size: int = 64, **kw) -> torch.Tensor:
    pe, pooled = embeds(batch=batch)
    out = pipe(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent", **kw,
    )
    return out.images

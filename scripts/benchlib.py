"""What the benchmark scripts share: the FLUX.1-dev-sized random pipeline and a CUDA-aware clock."""

from __future__ import annotations

import torch


def random_flux_dev(device, dtype, small=False):
    """FLUX.1-dev's transformer config (19 double + 38 single blocks, 24 x 128 heads) with random weights.
    `small` keeps the shape of the code path at a size a CPU runs in seconds (for a smoke test)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=2 if small else 19, num_single_layers=4 if small else 38,
                attention_head_dim=32 if small else 128, num_attention_heads=2 if small else 24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(8, 12, 12) if small else (16, 56, 56),
            ).eval()
    finally:
        torch.set_default_dtype(prev)
    # FLUX.1-dev's scheduler: dynamic shifting on the image sequence length.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    g = torch.Generator(device).manual_seed(1)
    embeds = dict(
        prompt_embeds=torch.randn(1, 512, 4096, generator=g, device=device, dtype=dtype),
        pooled_prompt_embeds=torch.randn(1, 768, generator=g, device=device, dtype=dtype),
        guidance_scale=3.5,
    )
    return pipe, embeds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()

"""The bundled trained tiny models as benchmark subjects: a pipeline, fixed prompts, and one call per prompt.

    ctx = TinyModel.load("flux", "cpu", n_prompts=16)         # or "video" (tiny HunyuanVideo)
    latents, wall = ctx.run(i)                                 # prompt i, seed i, timed between device syncs
    image = ctx.decode(latents)                                # float pixels in [0, 1], for PSNR with peak 1

Prompts are encoded once (the timed call is the denoising loop, with `output_type="latent"`), the starting noise
of prompt i comes from a CPU generator seeded i (the same noise on any device), and decoding is the pipeline's own
last lines. FLUX: the adherence prompts of `scripts/tiny_flux/check.py` (2 per colour for 16), 128², 28 steps.
HunyuanVideo: the held-out prompts of `scripts/tiny_video/check.py` (seed 1000), 64² x 9 frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from scripts.bench.pipes import ROOT
from scripts.bench.utils import sync

TINY_VIDEO_DIR = os.path.join(ROOT, "assets", "models", "tiny-hunyuanvideo")
FULL_SIZE_BLOCKS = {"flux": 57, "video": 60}
"""Blocks of the full-size model of each family (FLUX.1-dev: 19 + 38, HunyuanVideo: 20 + 40): a speculative
step's one verify block costs 1/57 (1/60) of a step there, against 1/7 (1/5) on the tiny models."""
DEFAULT_STEPS = {"flux": 28, "video": 30}


@dataclass
class TinyModel:
    name: str
    pipe: object
    prompts: list[str]
    call: dict
    device: torch.device
    embeds: list[dict] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        t = self.pipe.transformer
        return len(t.transformer_blocks) + len(t.single_transformer_blocks)

    @classmethod
    def load(cls, name: str, device, n_prompts: int = 16, steps: int | None = None) -> "TinyModel":
        device = torch.device(device)
        steps = steps or DEFAULT_STEPS[name]
        if name == "flux":
            from diffusers import FluxPipeline

            from scripts.bench.pipes import TINY_FLUX_DIR
            from scripts.tiny_flux.check import DEFAULTS, adherence_prompts

            pipe = FluxPipeline.from_pretrained(TINY_FLUX_DIR, torch_dtype=torch.float32).to(device)
            prompts = [it["prompt"] for it in adherence_prompts((n_prompts + 7) // 8)][:n_prompts]
            call = dict(height=DEFAULTS["height"], width=DEFAULTS["width"], num_inference_steps=steps)
        elif name == "video":
            from diffusers import HunyuanVideoPipeline

            from scripts.tiny_video.check import heldout_prompts
            from scripts.tiny_video.train import DEFAULT_CALL

            pipe = HunyuanVideoPipeline.from_pretrained(TINY_VIDEO_DIR, torch_dtype=torch.float32).to(device)
            prompts = heldout_prompts(n_prompts, 1000)
            call = dict(height=DEFAULT_CALL["height"], width=DEFAULT_CALL["width"],
                        num_frames=DEFAULT_CALL["num_frames"], num_inference_steps=steps)
        else:
            raise ValueError(f"unknown tiny model {name!r}: use flux or video")
        pipe.set_progress_bar_config(disable=True)
        self = cls(name, pipe, prompts, call, device)
        self.embeds = [self._encode(p) for p in prompts]
        return self

    def _encode(self, prompt: str) -> dict:
        with torch.no_grad():
            if self.name == "flux":
                pe, pooled, _ = self.pipe.encode_prompt(prompt, prompt_2=None, device=self.device,
                                                        max_sequence_length=32)
                return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
            from scripts.tiny_video.build import PROMPT_TEMPLATE

            pe, pooled, mask = self.pipe.encode_prompt(prompt, prompt_template=PROMPT_TEMPLATE, device=self.device,
                                                       max_sequence_length=32)
            return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)

    def run(self, i: int):
        """Prompt i with seed i: (final latents, wall seconds of the call)."""
        import time

        g = torch.Generator("cpu").manual_seed(i)
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.pipe(**self.embeds[i], **self.call, generator=g, output_type="latent", return_dict=False)[0]
        sync(self.device)
        return out, time.perf_counter() - t0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's own decoding of `run`'s latents: float32 pixels in [0, 1] on the CPU (FLUX [H, W, 3],
        video [F, 3, H, W])."""
        pipe = self.pipe
        with torch.no_grad():
            if self.name == "flux":
                lat = pipe._unpack_latents(latents, self.call["height"], self.call["width"], pipe.vae_scale_factor)
                lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
                image = pipe.vae.decode(lat, return_dict=False)[0]
                return pipe.image_processor.postprocess(image, output_type="pt")[0].permute(1, 2, 0).float().cpu()
            video = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type="pt")[0].float().cpu()

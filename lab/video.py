"""Video helpers of the lab: latent frames -> PIL frames, a strip of frames, and the mp4 writer.

HunyuanVideo latents are unpacked already: (B, C, F, h, w), F = (num_frames - 1) // 4 + 1 latent frames.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from PIL import Image


def latent_frames(previewer, latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """(B, C, F, h, w) latents -> one preview image per latent frame (first sample), resized to `size`."""
    lat = latents[:1]
    return [previewer.to_image(lat[:, :, f], size) for f in range(lat.shape[2])]


def to_pil_frames(video) -> list[Image.Image]:
    """The pipeline's `output_type="np"` video (B, F, H, W, 3) in [0, 1] (or a list of PIL frames) -> PIL frames
    of the first sample."""
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        return list(video)
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], (list, tuple)):
        return list(video[0])
    a = np.asarray(video[0] if getattr(video, "ndim", 0) == 5 else video, dtype=np.float32)
    return [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in a]


def pick(frames: list, n: int = 8) -> list:
    """At most `n` evenly spaced frames (first and last included)."""
    if len(frames) <= n:
        return list(frames)
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


def strip(frames: list[Image.Image], n: int = 8) -> Image.Image:
    """Up to `n` evenly spaced frames side by side (what the image panels and the difference map show)."""
    sel = pick(frames, n)
    w, h = sel[0].size
    out = Image.new("RGB", (w * len(sel), h))
    for i, f in enumerate(sel):
        out.paste(f.convert("RGB").resize((w, h)), (i * w, 0))
    return out


def write_mp4(frames: list[Image.Image], fps: int = 8, path: str | None = None) -> str:
    """Write `frames` as an H.264 mp4 (diffusers' `export_to_video`, through imageio-ffmpeg); returns the path."""
    from diffusers.utils import export_to_video

    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="speclab_video_"), "speclab.mp4")
    arr = [np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0 for f in frames]
    # H.264 wants even sizes; the lab's sizes are multiples of 16 anyway, but a 1-frame or odd input must not fail
    h, w = arr[0].shape[:2]
    if h % 2 or w % 2:
        arr = [a[: h - h % 2, : w - w % 2] for a in arr]
    export_to_video(arr, path, fps=int(fps))
    return path


def decode_video(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """(B, C, F, h, w) latents -> the pipeline's own VAE decode as PIL frames (what `output_type="np"` gives)."""
    vae = pipe.vae
    p = next(vae.parameters())
    with torch.no_grad():
        v = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return to_pil_frames(pipe.video_processor.postprocess_video(v, output_type="np"))

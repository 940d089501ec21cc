"""What a run produces, image or video, behind one small interface.

An `Output` knows how to ask the pipeline for its result (`call_kwargs`), how to draw a live preview from the
latents, and how to turn the pipeline's result (or, after Stop, the clean-latent estimate) into a `Rendered`
result. A `Rendered` result shows as one image (a video: a strip of evenly spaced frames), compares with
another by its pixels, and exports its files. `stream_run` and the app use only this interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from .preview import decode, unpack
from .video import decode_video, latent_frames, strip, to_pil_frames, write_video


PREVIEW_MAX = 512
"""Longest side of a live preview in pixels: it is drawn from the latents (1/8 of the size) and shown ~230 pixels
high, so a 1024² preview would cost its encoding at every update and show nothing more."""


def preview_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of a preview: the run's size, scaled down to at most `PREVIEW_MAX` on its longest side."""
    scale = min(1.0, PREVIEW_MAX / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class Rendered:
    """A finished run's pictures."""

    image: Image.Image
    """What the image panels show: the image, or a strip of up to 8 evenly spaced video frames."""
    frames: list[Image.Image] | None = None
    """Video: every frame (PIL)."""
    fps: int = 8

    def pixels(self) -> np.ndarray:
        """What PSNR/SSIM compare: the image, or every frame side by side."""
        if self.frames:
            return np.asarray(strip(self.frames, len(self.frames)))
        return np.asarray(self.image.convert("RGB"))

    def export(self, directory: str, stem: str) -> list[str]:
        """Files besides the trace: the video file of a video (mp4, or WebM: `lab.video.write_video`); nothing
        for an image (it is shown already). Raises `VideoWriteError` when no video writer is installed."""
        if not self.frames:
            return []
        return [write_video(self.frames, self.fps, os.path.join(directory, stem))]


class Output(Protocol):
    output_type: str

    def call_kwargs(self) -> dict: ...

    def preview(self, latents: torch.Tensor) -> Image.Image: ...

    def finalize(self, result, stop_latents: torch.Tensor | None,
                 final_latents: torch.Tensor | None) -> Rendered: ...


class ImageOutput:
    """FLUX-style image pipelines: packed latents, `output_type` "pil" (or "latent" without a VAE)."""

    def __init__(self, model, width: int, height: int):
        self.model, self.width, self.height = model, width, height
        self.output_type = "pil" if getattr(model.pipe, "vae", None) is not None else "latent"

    def call_kwargs(self) -> dict:
        return {"output_type": self.output_type}

    def _unpack(self, latents):
        return unpack(self.model.pipe, latents, self.height, self.width)

    def preview(self, latents):
        return self.model.previewer.to_image(self._unpack(latents), preview_size(self.width, self.height))

    def _drawn(self, latents):
        """A pipeline without a VAE: the result drawn from its latents at the run's size."""
        return self.model.previewer.to_image(self._unpack(latents), (self.width, self.height))

    def finalize(self, result, stop_latents=None, final_latents=None) -> Rendered:
        """`result`: the pipeline's `.images`. After Stop, `stop_latents` (the clean-image estimate) is drawn."""
        if stop_latents is not None:
            if self.output_type == "latent":
                return Rendered(self._drawn(stop_latents))
            return Rendered(decode(self.model.pipe, stop_latents, self.height, self.width))
        if self.output_type == "latent":
            return Rendered(self._drawn(result))
        image = result[0]
        if final_latents is not None:
            _refit(self.model.previewer, lambda: self._unpack(final_latents), image)
        return Rendered(image)


class VideoOutput:
    """HunyuanVideo-style pipelines: (B, C, F, h, w) latents, `output_type` "np" (or "latent" without a VAE)."""

    def __init__(self, model, width: int, height: int, frames: int, fps: int):
        self.model, self.size, self.frames, self.fps = model, (width, height), frames, fps
        self.output_type = "np" if getattr(model.pipe, "vae", None) is not None else "latent"

    def call_kwargs(self) -> dict:
        return {"output_type": self.output_type, "num_frames": int(self.frames)}

    def preview(self, latents):
        return strip(latent_frames(self.model.previewer, latents, preview_size(*self.size)))

    def finalize(self, result, stop_latents=None, final_latents=None) -> Rendered:
        """`result`: the pipeline's `.frames`. After Stop, the frames of `stop_latents` are drawn."""
        if self.output_type == "latent":
            frames = latent_frames(self.model.previewer, stop_latents if stop_latents is not None else result,
                                   self.size)
        elif stop_latents is not None:
            frames = decode_video(self.model.pipe, stop_latents)
        else:
            frames = to_pil_frames(result)
            if final_latents is not None:  # the first latent frame is the first video frame alone (causal VAE)
                _refit(self.model.previewer, lambda: final_latents[:1, :, 0], frames[0])
        return Rendered(strip(frames), frames, self.fps)


def _refit(previewer, latents, image) -> None:
    """Add a finished run to the preview's fit; a preview is a nicety and never fails a run."""
    if previewer is None:
        return
    try:
        previewer.refit(latents(), image)
    except Exception:
        pass


def output_for(model, spec) -> Output:
    """The output of `model` (a `LoadedModel`) for `spec` (a `RunSpec`)."""
    if model.preset.is_video:
        return VideoOutput(model, spec.width, spec.height, spec.frames, model.preset.fps)
    return ImageOutput(model, spec.width, spec.height)

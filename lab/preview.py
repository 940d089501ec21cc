"""Cheap previews of FLUX latents: a linear latent->RGB map instead of the VAE.

The map is fitted by least squares, once per pipeline, on a small VAE decode of random latents (so it needs
no table of magic numbers and fits any VAE), and refitted on every finished run's real latents and image.
Without a VAE (test pipelines) the first three channels are shown, each normalised.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def unpack(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX packed latents (B, tokens, C*4) -> (B, C, h, w) in the VAE's latent space scale."""
    return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def decode(pipe, latents: torch.Tensor, height: int, width: int) -> Image.Image:
    """Packed FLUX latents -> the pipeline's own VAE decode (what `output_type="pil"` gives)."""
    vae = pipe.vae
    lat = unpack(pipe, latents, height, width)
    lat = lat / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    p = next(vae.parameters())
    with torch.no_grad():
        img = vae.decode(lat.to(p.device, p.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pil")[0]


class Previewer:
    def __init__(self, pipe):
        self.pipe = pipe
        self.weights: torch.Tensor | None = None  # (C + 1, 3): channels + bias -> RGB in [0, 1]
        self._lock = threading.Lock()

    # ---- fitting ----------------------------------------------------------------------------------
    def _fit(self, lat: torch.Tensor, rgb: torch.Tensor) -> None:
        """lat (B, C, h, w), rgb (B, 3, h, w) in [0, 1]."""
        c = lat.shape[1]
        x = lat.permute(0, 2, 3, 1).reshape(-1, c).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()
        sol = torch.linalg.lstsq(x, y).solution
        if torch.isfinite(sol).all():
            with self._lock:
                self.weights = sol.float()

    def _decode(self, lat: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        p = next(vae.parameters())
        z = lat.to(p.device, p.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        video = hasattr(vae.config, "temporal_compression_ratio")  # a video VAE: (B, C, F, h, w), one frame here
        with torch.no_grad():
            img = vae.decode(z[:, :, None] if video else z, return_dict=False)[0]
        if video:
            img = img[:, :, 0]
        return ((img.float().cpu() + 1) / 2).clamp(0, 1)

    def calibrate(self, size: int = 16, seed: int = 0) -> None:
        """Fit the map on the VAE's decode of random latents (a one-off, small decode)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return
        g = torch.Generator().manual_seed(seed)
        c = vae.config.latent_channels
        lat = torch.randn(2, c, size, size, generator=g)
        rgb = self._decode(lat)
        self._fit(lat, F.adaptive_avg_pool2d(rgb, (size, size)))

    def refit(self, latents_unpacked: torch.Tensor, image) -> None:
        """Refit on a finished run: its final latents (B, C, h, w) and its decoded PIL image."""
        lat = latents_unpacked[:1].float().cpu()
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        self._fit(lat, F.adaptive_avg_pool2d(rgb, lat.shape[-2:]))

    # ---- rendering --------------------------------------------------------------------------------
    def to_image(self, latents_unpacked: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
        """First sample of (B, C, h, w) latents -> PIL RGB, resized to `size` = (width, height) if given."""
        lat = latents_unpacked[0].detach().float().cpu()
        c, h, w = lat.shape
        with self._lock:
            wts = self.weights
        if wts is not None and wts.shape[0] == c + 1:
            x = torch.cat([lat.reshape(c, -1).T, torch.ones(h * w, 1)], dim=1)
            rgb = (x @ wts).T.reshape(3, h, w)
        else:
            rgb = lat[:3] if c >= 3 else lat[:1].expand(3, h, w)
            lo = rgb.flatten(1).quantile(0.02, dim=1)[:, None, None]
            hi = rgb.flatten(1).quantile(0.98, dim=1)[:, None, None]
            rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6)
        arr = (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        img = Image.fromarray(arr)
        return img.resize(size, Image.BILINEAR) if size is not None else img

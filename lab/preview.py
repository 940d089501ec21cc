"""Cheap previews of latents (FLUX, HunyuanVideo): a linear latent->RGB map instead of the VAE.

The map is fitted by least squares, once per pipeline, on the VAE's *encoding* of random colour blocks (so it
needs no table of magic numbers and fits any VAE), and every finished run's real latents and image are added to
the fit. Encoding known colours, rather than decoding random latents, matters: random N(0, 1) latents are not
what a VAE's decoder sees (the tiny HunyuanVideo's are ~3x wider once unscaled) and gave a red circle a green
preview. Without a VAE (test pipelines) the first three channels are shown, each normalised.
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
        self._xtx: torch.Tensor | None = None  # normal equations of every sample fitted so far (per-pixel means)
        self._xty: torch.Tensor | None = None

    # ---- fitting ----------------------------------------------------------------------------------
    def _fit(self, lat: torch.Tensor, rgb: torch.Tensor) -> None:
        """Add lat (B, C, h, w) -> rgb (B, 3, h, w) in [0, 1] to the fit, then solve. Sums are per pixel, so one
        run's image counts as much as the whole calibration set, however large either is."""
        c = lat.shape[1]
        x = lat.permute(0, 2, 3, 1).reshape(-1, c).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()
        xtx, xty = x.T @ x / len(x), x.T @ y / len(x)
        with self._lock:
            if self._xtx is not None and self._xtx.shape == xtx.shape:
                xtx, xty = xtx + self._xtx, xty + self._xty
            ridge = 1e-6 * torch.eye(c + 1, dtype=xtx.dtype)
            sol = torch.linalg.solve(xtx + ridge, xty)
            if torch.isfinite(sol).all():
                self._xtx, self._xty, self.weights = xtx, xty, sol.float()

    def calibrate(self, size: int = 16, seed: int = 0, images: int = 8) -> None:
        """Fit the map on the VAE's encoding of random colour blocks (a one-off, small encode)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return
        g = torch.Generator().manual_seed(seed)
        video = hasattr(vae.config, "temporal_compression_ratio")
        f = int(getattr(self.pipe, "vae_scale_factor_spatial" if video else "vae_scale_factor", 8))
        parts = []
        for grid in (size // 4, size // 2, size):  # blocks 4, 2 and 1 latent pixels wide: flat areas and detail
            blocks = torch.rand(images, 3, grid, grid, generator=g)
            # half at the RGB cube's corners: black, white and saturated colours are what uniform draws miss
            corner = torch.rand(images, 1, grid, grid, generator=g) < 0.5
            blocks = torch.where(corner, blocks.round(), blocks)
            parts.append(F.interpolate(blocks, size=(size * f, size * f), mode="nearest"))
        rgb = torch.cat(parts)  # flat colours, sharp edges
        p = next(vae.parameters())
        x = (rgb * 2 - 1).to(p.device, p.dtype)
        with torch.no_grad():
            z = vae.encode(x[:, :, None] if video else x).latent_dist.mean.float().cpu()  # video: 1 latent frame
        z = z[:, :, 0] if video else z
        lat = (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
        self._fit(lat, F.adaptive_avg_pool2d(rgb, lat.shape[-2:]))

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

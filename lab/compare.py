"""A run against the full (reference) run of the same settings: PSNR, SSIM, measured speedup, difference map.

PSNR and SSIM come from torchmetrics (SSIM: Wang et al. 2004, Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03;
images no larger than the window use a uniform window that fits). Identical images have an infinite PSNR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import visualizers as V
from accel.trace import Trace

from .output import Rendered


def _batch(img, device=None) -> torch.Tensor:
    """HxW or HxWxC 8-bit image (array or PIL) -> (1, C, H, W) in 0..255: float64 on the CPU, float32 on `device`
    (a GPU: SSIM of a 1024² image takes seconds on a CPU, of a video's frames minutes)."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if device is not None:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device).permute(2, 0, 1)[None].float()
    return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]


def _same_shape(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what} needs images of the same size, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")


def psnr(a, b, data_range: float = 255.0, device=None) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images; `inf` for identical images."""
    x, y = _batch(a, device), _batch(b, device)
    _same_shape(x, y, "PSNR")
    if torch.equal(x, y):
        return float("inf")
    return float(peak_signal_noise_ratio(x, y, data_range=data_range))


def ssim(a, b, data_range: float = 255.0, win: int = 11, sigma: float = 1.5, device=None) -> float:
    """Mean structural similarity of two 8-bit images (per channel, averaged); on `device` in float32 if given."""
    x, y = _batch(a, device), _batch(b, device)
    _same_shape(x, y, "SSIM")
    side = min(x.shape[2], x.shape[3])
    if side > win:
        return float(structural_similarity_index_measure(x, y, data_range=data_range, kernel_size=win, sigma=sigma))
    win = side - 1 + side % 2  # smaller than the window: a uniform odd window that fits (its padding included)
    return float(structural_similarity_index_measure(x, y, data_range=data_range, gaussian_kernel=False,
                                                     kernel_size=max(1, win // 2 * 2 - 1)))


@dataclass
class Comparison:
    psnr: float
    ssim: float
    full_ms: float
    """Denoiser time of the full run."""
    speedup: float | None
    """Full run's denoiser time / this run's; None when this run took no measurable time."""
    difference: object
    """Plotly heatmap of |this - full| per pixel."""

    def as_summary(self) -> dict:
        return {"psnr": self.psnr, "ssim": self.ssim, "full_ms": self.full_ms, "measured_speedup": self.speedup}


def compare(run: Rendered, trace: Trace, full: Rendered, full_trace: Trace, device=None) -> Comparison:
    """`device`: a GPU to compute PSNR and SSIM on (GPU presets), else the CPU in float64."""
    a, b = run.pixels(), full.pixels()
    full_ms = full_trace.summary()["measured_ms"]
    mine = trace.summary()["measured_ms"]
    return Comparison(psnr(a, b, device=device), ssim(a, b, device=device), full_ms, full_ms / mine if mine else None,
                      V.difference_figure(run.image, full.image))

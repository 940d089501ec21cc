"""Image similarity: PSNR and SSIM on 8-bit RGB images (numpy arrays or PIL images)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _arr(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    return a.astype(np.float64)


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; `inf` for identical images."""
    x, y = _arr(a), _arr(b)
    if x.shape != y.shape:
        raise ValueError(f"PSNR needs images of the same size, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, data_range: float = 255.0, win: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03),
    per channel, averaged. The window shrinks for images smaller than it."""
    x, y = _arr(a), _arr(b)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs images of the same size, got {x.shape} and {y.shape}")
    win = max(1, min(win, x.shape[0], x.shape[1]))
    if win % 2 == 0:
        win -= 1
    c = x.shape[2]
    k = _gaussian(win, sigma).expand(c, 1, win, win).contiguous()
    tx = torch.from_numpy(x).permute(2, 0, 1)[None]
    ty = torch.from_numpy(y).permute(2, 0, 1)[None]

    def f(t):
        return F.conv2d(t, k, groups=c)

    mx, my = f(tx), f(ty)
    sxx = f(tx * tx) - mx * mx
    syy = f(ty * ty) - my * my
    sxy = f(tx * ty) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())

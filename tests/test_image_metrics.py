"""The lab's image metrics (lab/compare.py: PSNR and SSIM through torchmetrics) against hand computations and a
naive loop. (test_app.py checks them once more through the lab's compare panel.)"""

import math

import numpy as np
import pytest

from lab import compare as C


def naive_ssim(a, b, data_range=255.0, win=11, sigma=1.5):
    """SSIM written out, one window position and channel at a time: the images reflect-padded by half a window,
    a window at every pixel, the mean of the SSIM map (Wang et al. 2004, K1 0.01, K2 0.03, variances >= 0). Images
    wider than `win` in both directions: the Gaussian window of `sigma` (11 wide for sigma 1.5, torchmetrics'
    size rule); smaller ones: a uniform window, the largest odd size that fits less one step (torchmetrics pads by
    reflection, which needs the pad smaller than the image)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim == 2:
        x, y = x[:, :, None], y[:, :, None]
    h, w, c = x.shape
    side = min(h, w)
    if side > win:
        k = int(3.5 * sigma + 0.5) * 2 + 1
        g = np.array([math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(k)])
        kernel = np.outer(g / g.sum(), g / g.sum())
    else:
        odd = side if side % 2 else side - 1
        k = max(1, odd - 2)
        kernel = np.full((k, k), 1.0 / (k * k))
    pad = (k - 1) // 2
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    yp = np.pad(y, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                px, py = xp[i:i + k, j:j + k, ch], yp[i:i + k, j:j + k, ch]
                mx, my = (kernel * px).sum(), (kernel * py).sum()
                sxx = max((kernel * px * px).sum() - mx * mx, 0.0)
                syy = max((kernel * py * py).sum() - my * my, 0.0)
                sxy = (kernel * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return float(np.mean(vals))


def images(shape, seed):
    r = np.random.default_rng(seed)
    return r.integers(0, 256, shape).astype(np.uint8), r.integers(0, 256, shape).astype(np.uint8)


# ---- PSNR ---------------------------------------------------------------------------------------------------
def test_psnr_hand_computed():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 1, 2] = 10  # one of 12 values off by 10 (and a - b would wrap in uint8)
    # (torchmetrics takes the log in float32)
    assert C.psnr(a, b) == pytest.approx(10 * math.log10(255.0**2 / (100 / 12)), rel=1e-6)
    assert C.psnr(b, a) == C.psnr(a, b)
    assert C.psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1 / (100 / 12)), rel=1e-6)
    assert C.psnr(a, a) == math.inf and C.psnr(b, b) == math.inf


def test_psnr_grayscale_and_size_check():
    a, b = images((5, 4), 0)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert C.psnr(a, b) == pytest.approx(10 * math.log10(255.0**2 / mse), rel=1e-6)
    assert C.psnr(a[:, :, None], b) == C.psnr(a, b)  # H x W is one channel
    with pytest.raises(ValueError, match=r"^PSNR needs images of the same size, got \(1, 5, 4\) and \(1, 4, 5\)$"):
        C.psnr(a, b.T)


# ---- SSIM ---------------------------------------------------------------------------------------------------
def test_ssim_of_flat_images_is_the_luminance_term():
    # no structure: SSIM = (2xy + C1) / (x^2 + y^2 + C1), whatever the window
    for shape in ((1, 1, 1), (4, 4, 3), (16, 16, 3)):
        x, y = np.full(shape, 100, np.uint8), np.full(shape, 50, np.uint8)
        for data_range in (255.0, 2.0):
            c1 = (0.01 * data_range) ** 2
            assert C.ssim(x, y, data_range=data_range) == pytest.approx(
                (2 * 100 * 50 + c1) / (100**2 + 50**2 + c1), rel=1e-8), (shape, data_range)


@pytest.mark.parametrize("shape", [(3, 3, 1), (4, 4, 3), (6, 9, 2), (7, 5), (11, 11, 1), (12, 13, 3), (16, 12, 2)])
def test_ssim_matches_the_naive_loop(shape):
    # uniform windows 1 (3x3, 4x4), 3 (6 and 5 wide), 9 (11x11: not larger than the window); Gaussian from 12 on
    a, b = images(shape, len(shape) + shape[0])
    assert C.ssim(a, b) == pytest.approx(naive_ssim(a, b), rel=1e-9)
    assert C.ssim(a, b, data_range=100.0) == pytest.approx(naive_ssim(a, b, data_range=100.0), rel=1e-9)


def test_ssim_window_and_sigma_arguments():
    a, b = images((14, 14, 1), 7)
    assert C.ssim(a, b, sigma=1.0) == pytest.approx(naive_ssim(a, b, sigma=1.0), rel=1e-9)  # a 9-wide Gaussian
    assert C.ssim(a, b, win=15) == pytest.approx(naive_ssim(a, b, win=15), rel=1e-9)  # 14 <= 15: uniform 11
    assert C.ssim(a, b, win=15) != C.ssim(a, b)
    assert C.ssim(a, a) == pytest.approx(1.0, abs=1e-12) and C.ssim(a, 255 - a) < 0


def test_ssim_size_check():
    a, b = images((4, 4, 3), 1)
    with pytest.raises(ValueError, match=r"^SSIM needs images of the same size, got \(3, 4, 4\) and \(1, 4, 4\)$"):
        C.ssim(a, b[:, :, :1])

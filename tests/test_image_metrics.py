"""The lab's image metrics (lab/metrics.py): PSNR and SSIM against hand computations and a naive loop."""

import math

import numpy as np
import pytest

from lab import metrics


def naive_ssim(a, b, data_range=255.0, win=11, sigma=1.5):
    """Wang et al. 2004 written out: every window position, every channel, one weighted sum at a time."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim == 2:
        x, y = x[:, :, None], y[:, :, None]
    h, w_, c = x.shape
    win = max(1, min(win, h, w_))
    win -= win % 2 == 0
    g = np.array([math.exp(-((i - (win - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(win)])
    g = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(c):
        for i in range(h - win + 1):
            for j in range(w_ - win + 1):
                px, py = x[i:i + win, j:j + win, ch], y[i:i + win, j:j + win, ch]
                mx, my = (g * px).sum(), (g * py).sum()
                sxx, syy, sxy = (g * px * px).sum() - mx * mx, (g * py * py).sum() - my * my, (g * px * py).sum() - mx * my
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
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255.0**2 / (100 / 12)), rel=1e-12)
    assert metrics.psnr(b, a) == metrics.psnr(a, b)
    assert metrics.psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1 / (100 / 12)), rel=1e-12)
    assert metrics.psnr(a, a) == math.inf and metrics.psnr(b, b) == math.inf


def test_psnr_grayscale_and_size_check():
    a, b = images((5, 4), 0)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255.0**2 / mse), rel=1e-12)
    with pytest.raises(ValueError, match=r"^PSNR needs images of the same size, got \(5, 4, 1\) and \(4, 5, 1\)$"):
        metrics.psnr(a, b.T)


# ---- SSIM ---------------------------------------------------------------------------------------------------
def test_gaussian_window_hand_computed():
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 1.5**2))
    g /= g.sum()
    np.testing.assert_allclose(metrics._gaussian(3, 1.5).numpy(), np.outer(g, g), rtol=1e-14)
    g4 = np.exp(-np.array([2.25, 0.25, 0.25, 2.25]) / (2 * 0.8**2))  # even size: centred between pixels
    g4 /= g4.sum()
    np.testing.assert_allclose(metrics._gaussian(4, 0.8).numpy(), np.outer(g4, g4), rtol=1e-14)


def test_ssim_of_one_pixel_is_the_luminance_term():
    # 1x1: the window is one pixel, no variance, so SSIM = (2xy + C1) / (x^2 + y^2 + C1)
    c1 = (0.01 * 255) ** 2
    x, y = np.full((1, 1, 1), 100, np.uint8), np.full((1, 1, 1), 50, np.uint8)
    assert metrics.ssim(x, y) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1), rel=1e-12)
    c1 = (0.01 * 2.0) ** 2
    assert metrics.ssim(x, y, data_range=2.0) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1), rel=1e-12)


@pytest.mark.parametrize("shape", [(3, 3, 1), (4, 4, 3), (6, 9, 2), (7, 5), (13, 12, 3)])
def test_ssim_matches_the_naive_loop(shape):
    # window 3 (3x3), 3 (4 is even), 5 (6 is even), 5 and 11 (the default, smaller than the image)
    a, b = images(shape, len(shape) + shape[0])
    assert metrics.ssim(a, b) == pytest.approx(naive_ssim(a, b), rel=1e-10)
    assert metrics.ssim(a, b, data_range=100.0, sigma=0.7) == pytest.approx(
        naive_ssim(a, b, data_range=100.0, sigma=0.7), rel=1e-10)


def test_ssim_window_argument_and_extremes():
    a, b = images((9, 9, 1), 7)
    assert metrics.ssim(a, b, win=5) == pytest.approx(naive_ssim(a, b, win=5), rel=1e-10)
    assert metrics.ssim(a, b, win=4) == pytest.approx(naive_ssim(a, b, win=3), rel=1e-10)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(a, 255 - a) < 0


def test_ssim_size_check():
    a, b = images((4, 4, 3), 1)
    with pytest.raises(ValueError, match=r"^SSIM needs images of the same size, got \(4, 4, 3\) and \(4, 4, 1\)$"):
        metrics.ssim(a, b[:, :, :1])

"""What every benchmark measures the same way: one timed pipeline call, the best of several, the error of a run
against the plain one (PSNR, relative L2), and SpeCa's fixed schedules."""

from __future__ import annotations

import time

import numpy as np
import torch


def sync(device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall clock read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_call(pipe, kwargs: dict, device, seed: int = 0, generator_device=None):
    """One `pipe(**kwargs)` call with a fresh generator seeded `seed` (made on `generator_device`, default
    `device`), timed between device synchronisations. Returns (the output's first field: images, frames or
    latents; wall seconds; peak CUDA memory in bytes during the call, 0 on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator(device if generator_device is None else generator_device).manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    out = pipe(**kwargs, generator=generator)
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return out[0], wall, peak


def best_of(repeats: int, call, handle=None):
    """The fastest of `repeats` calls of `call()` (which returns `timed_call`'s triple), as (output, wall, peak,
    trace); `trace` is `handle.trace` read right after that call (the run's `accel` trace), None without a
    handle. The first of equally fast calls counts."""
    return best_and_walls(repeats, call, handle)[0]


def best_and_walls(repeats: int, call, handle=None):
    """`best_of`'s (output, wall, peak, trace), and every call's wall seconds in call order (the spread)."""
    best, walls = None, []
    for _ in range(repeats):
        out, wall, peak = call()
        walls.append(wall)
        trace = handle.trace if handle is not None else None
        if best is None or wall < best[1]:
            best = (out, wall, peak, trace)
    return best, walls


def _float64(x) -> torch.Tensor:
    return x.detach().double().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))


def psnr(x, ref, peak: float) -> float:
    """Peak signal-to-noise ratio in dB of `x` against `ref` (tensors or arrays of one shape: latents, decoded
    images, 8-bit pixels) with `peak` as the data range; `inf` when they are equal. torchmetrics' PSNR, the lab's
    image metric (lab/compare.py), in float64 (imported here, not through `lab`, which pulls in the app's
    plotting: the benchmarks run where only torch, diffusers and torchmetrics are)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if x.shape != ref.shape:
        raise ValueError(f"PSNR needs inputs of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    return float(peak_signal_noise_ratio(_float64(x), _float64(ref), data_range=float(peak)))


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||x - ref|| / ||ref|| (float32)."""
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def fixed_schedule(n_steps: int, interval: int, warmup: int = 3) -> list[bool]:
    """SpeCa's `every:N` schedule: `warmup` full steps, then a full step every `interval` steps, the rest
    speculative (True = full)."""
    return [i < warmup or (i - warmup) % interval == 0 for i in range(n_steps)]

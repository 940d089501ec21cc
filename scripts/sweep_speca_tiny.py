"""SpeCa on the bundled tiny FLUX (CPU): compute saved vs image fidelity.

    HF_HUB_OFFLINE=1 python scripts/sweep_speca_tiny.py                 # adaptive thresholds, one prompt
    HF_HUB_OFFLINE=1 python scripts/sweep_speca_tiny.py --forecasts     # stack vs per_block, 16 prompts

Default: for each (metric, threshold): full / accepted / rejected steps, ideal speedup, measured speedup against
the plain run (best of 2 wall times) and PSNR of the decoded image against the plain run (same seed). 128², 28
steps.
--forecasts: the two forecasts (`SpeCaConfig.forecast`) on the same fixed schedules and orders, and adaptive at
the default threshold, over the adherence prompts of check_tiny_flux.py (16 by default): PSNR of every decoded
image against its plain run (mean and worst), and the bytes each keeps between steps.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import accel  # noqa: E402

PROMPT = "a large red circle on the left and a small blue square on the right, on a gray background"
SETTINGS = [("rel_l1", 7.0), ("rel_l1", 2.0), ("rel_l1", 1.0), ("rel_l2", 0.3), ("rel_l2", 0.1)]


def every(n_steps: int, interval: int, warmup: int = 3) -> list[bool]:
    return [i < warmup or (i - warmup) % interval == 0 for i in range(n_steps)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of images in [0, 1]."""
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


def compare_forecasts(pipe, n_per_color: int, steps: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from check_tiny_flux import adherence_prompts, generate

    prompts = [it["prompt"] for it in adherence_prompts(n_per_color)]
    kw = dict(num_inference_steps=steps)
    t0 = time.perf_counter()
    base = generate(pipe, prompts, **kw)
    print(f"{len(prompts)} prompts, {steps} steps, plain: {time.perf_counter() - t0:.1f} s")
    runs = [(f"every:{n} o{o}", dict(schedule=every(steps, n), order=o)) for n in (4, 6) for o in (1, 2)]
    runs += [("adaptive (defaults)", {}), ("adaptive threshold 2", dict(threshold=2.0)),
             ("adaptive o1", dict(order=1)), ("adaptive o1 threshold 2", dict(order=1, threshold=2.0))]
    print(f"{'run':24s} {'forecast':10s} {'ideal':>6s} {'PSNR mean':>9s} {'worst':>6s} {'cache KiB':>9s} {'s':>5s}")
    for name, cfg in runs:
        for forecast in ("stack", "per_block"):
            with accel.apply(pipe, accel.SpeCaConfig(forecast=forecast, **cfg)) as h:
                t0 = time.perf_counter()
                imgs = generate(pipe, prompts, **kw)
                dt = time.perf_counter() - t0
            values = [psnr(a, b) for a, b in zip(imgs, base)]
            ideal = float(np.mean([t.summary()["ideal_speedup"] for t in h.traces]))
            cache = max(t.meta["cache_bytes"] for t in h.traces) / 1024
            print(f"{name:24s} {forecast:10s} {ideal:6.2f} {np.mean(values):9.2f} {min(values):6.2f} "
                  f"{cache:9.0f} {dt:5.1f}", flush=True)


def main():
    from diffusers import FluxPipeline

    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forecasts", action="store_true", help="stack vs per_block over the adherence prompts")
    ap.add_argument("--n-per-color", type=int, default=2, help="--forecasts: prompts per colour (8 colours)")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    pipe = FluxPipeline.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "assets", "models", "tiny-flux"))
    pipe.set_progress_bar_config(disable=True)
    if args.forecasts:
        return compare_forecasts(pipe, args.n_per_color, args.steps)
    kw = dict(prompt=PROMPT, height=128, width=128, num_inference_steps=args.steps, max_sequence_length=32)

    def go():
        best, img = float("inf"), None
        for _ in range(2):
            t0 = time.perf_counter()
            img = pipe(**kw, generator=torch.Generator().manual_seed(0)).images[0]
            best = min(best, time.perf_counter() - t0)
        return np.asarray(img).astype(np.float64), best

    base, t_base = go()
    print(f"plain: {t_base:.2f} s for {args.steps} steps")
    print(f"{'metric':8s} {'thr':>5s} {'full':>4s} {'acc':>4s} {'rej':>4s} {'ideal':>6s} {'meas':>6s} {'PSNR dB':>8s}")
    for metric, thr in SETTINGS:
        with accel.apply(pipe, accel.SpeCaConfig(threshold=thr, metric=metric)) as h:
            img, t = go()
        s = h.trace.summary()
        psnr = 10 * np.log10(255.0**2 / max(np.mean((img - base) ** 2), 1e-12))
        print(f"{metric:8s} {thr:5.2f} {s['full_steps']:4d} {s['accepted_steps']:4d} {s['rejected_steps']:4d} "
              f"{s['ideal_speedup']:6.2f} {t_base / t:6.2f} {psnr:8.1f}")


if __name__ == "__main__":
    main()

"""SpeCa on the bundled tiny FLUX (CPU): compute saved vs image fidelity.

    HF_HUB_OFFLINE=1 python -m scripts.bench.sweep_speca_tiny                 # adaptive thresholds, one prompt
    HF_HUB_OFFLINE=1 python -m scripts.bench.sweep_speca_tiny --forecasts     # stack vs per_block, 16 prompts

Default: for each (metric, threshold): full / accepted / rejected steps, ideal speedup, measured speedup against
the plain run (best of 2 wall times) and PSNR of the decoded image against the plain run (same seed). 128², 28
steps.
--forecasts: the two forecasts (`SpeCaConfig.forecast`) on the same fixed schedules and orders, and adaptive at
several thresholds (compare them at equal ideal speedup: the same threshold accepts different steps), over the adherence prompts of scripts/tiny_flux/check.py (16 by default, 8 a batch):
ideal speedup, PSNR of every decoded image against its plain run (mean and worst), and the bytes each keeps
between steps (`trace.meta["cache_bytes"]`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import accel
from scripts.bench.pipes import PROMPT, TINY_FLUX_DIR
from scripts.bench.utils import best_of, fixed_schedule, psnr, timed_call

SETTINGS = [("rel_l1", 7.0), ("rel_l1", 2.0), ("rel_l1", 1.0), ("rel_l2", 0.3), ("rel_l2", 0.1)]


def thresholds(pipe, steps: int) -> None:
    kw = dict(prompt=PROMPT, height=128, width=128, num_inference_steps=steps, max_sequence_length=32)

    def go():
        """Best of 2 wall times of the call; its image as a float array."""
        images, best, _, _ = best_of(2, lambda: timed_call(pipe, kw, "cpu", seed=0))
        return np.asarray(images[0]).astype(np.float64), best

    base, t_base = go()
    print(f"plain: {t_base:.2f} s for {steps} steps")
    print(f"{'metric':8s} {'thr':>5s} {'full':>4s} {'acc':>4s} {'rej':>4s} {'ideal':>6s} {'meas':>6s} {'PSNR dB':>8s}")
    for metric, thr in SETTINGS:
        with accel.apply(pipe, accel.SpeCaConfig(threshold=thr, metric=metric)) as h:
            img, t = go()
        s = h.trace.summary()
        print(f"{metric:8s} {thr:5.2f} {s['full_steps']:4d} {s['accepted_steps']:4d} {s['rejected_steps']:4d} "
              f"{s['ideal_speedup']:6.2f} {t_base / t:6.2f} {psnr(img, base, 255.0):8.1f}")


def compare_forecasts(pipe, n_per_color: int, steps: int) -> None:
    from scripts.tiny_flux.check import adherence_prompts, generate

    prompts = [it["prompt"] for it in adherence_prompts(n_per_color)]
    kw = dict(num_inference_steps=steps)
    t0 = time.perf_counter()
    base = generate(pipe, prompts, **kw)
    print(f"{len(prompts)} prompts, {steps} steps, plain: {time.perf_counter() - t0:.1f} s")
    runs = [(f"every:{n} o{o}", dict(schedule=fixed_schedule(steps, n), order=o)) for n in (4, 6) for o in (1, 2)]
    runs += [(f"adaptive o{o} threshold {t:g}", dict(order=o, threshold=t))
             for o, ts in ((2, (7.0, 4.0, 2.0)), (1, (7.0, 2.0, 1.5, 1.0))) for t in ts]
    print(f"{'run':24s} {'forecast':10s} {'ideal':>6s} {'PSNR mean':>9s} {'worst':>6s} {'cache KiB':>9s} {'s':>5s}")
    for name, cfg in runs:
        for forecast in ("stack", "per_block"):
            with accel.apply(pipe, accel.SpeCaConfig(forecast=forecast, **cfg)) as h:
                t0 = time.perf_counter()
                imgs = generate(pipe, prompts, **kw)
                dt = time.perf_counter() - t0
            values = [psnr(a, b, 1.0) for a, b in zip(imgs, base)]
            ideal = float(np.mean([t.summary()["ideal_speedup"] for t in h.traces]))
            cache = max(t.meta["cache_bytes"] for t in h.traces) / 1024
            print(f"{name:24s} {forecast:10s} {ideal:6.2f} {np.mean(values):9.2f} {min(values):6.2f} "
                  f"{cache:9.0f} {dt:5.1f}", flush=True)


def main():
    from diffusers import FluxPipeline

    ap = argparse.ArgumentParser(prog="python -m scripts.bench.sweep_speca_tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forecasts", action="store_true", help="stack vs per_block over the adherence prompts")
    ap.add_argument("--n-per-color", type=int, default=2, help="--forecasts: prompts per colour (8 colours)")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    pipe = FluxPipeline.from_pretrained(TINY_FLUX_DIR)
    pipe.set_progress_bar_config(disable=True)
    if args.forecasts:
        compare_forecasts(pipe, args.n_per_color, args.steps)
    else:
        thresholds(pipe, args.steps)


if __name__ == "__main__":
    main()

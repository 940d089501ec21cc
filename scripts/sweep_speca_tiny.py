"""SpeCa's adaptive thresholds on the bundled tiny FLUX (CPU): compute saved vs image fidelity.

    HF_HUB_OFFLINE=1 python scripts/sweep_speca_tiny.py

For each (metric, threshold): full / accepted / rejected steps, ideal speedup, measured speedup against the plain
run (best of 2 wall times) and PSNR of the decoded image against the plain run (same seed). 128², 28 steps.
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


def main():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "assets", "models", "tiny-flux"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, height=128, width=128, num_inference_steps=28, max_sequence_length=32)

    def go():
        best, img = float("inf"), None
        for _ in range(2):
            t0 = time.perf_counter()
            img = pipe(**kw, generator=torch.Generator().manual_seed(0)).images[0]
            best = min(best, time.perf_counter() - t0)
        return np.asarray(img).astype(np.float64), best

    base, t_base = go()
    print(f"plain: {t_base:.2f} s for 28 steps")
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

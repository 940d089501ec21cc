"""SpeCa's adaptive thresholds on the bundled tiny FLUX (CPU): compute saved vs image fidelity.

    HF_HUB_OFFLINE=1 python -m scripts.bench.sweep_speca_tiny

For each (metric, threshold): full / accepted / rejected steps, ideal speedup, measured speedup against the plain
run (best of 2 wall times) and PSNR of the decoded image against the plain run (same seed). 128², 28 steps.
"""

from __future__ import annotations

import numpy as np

import accel
from scripts.bench.pipes import PROMPT, TINY_FLUX_DIR
from scripts.bench.utils import best_of, psnr, timed_call

SETTINGS = [("rel_l1", 7.0), ("rel_l1", 2.0), ("rel_l1", 1.0), ("rel_l2", 0.3), ("rel_l2", 0.1)]


def main():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(TINY_FLUX_DIR)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, height=128, width=128, num_inference_steps=28, max_sequence_length=32)

    def go():
        """Best of 2 wall times of the call; its image as a float array."""
        images, best, _, _ = best_of(2, lambda: timed_call(pipe, kw, "cpu", seed=0))
        return np.asarray(images[0]).astype(np.float64), best

    base, t_base = go()
    print(f"plain: {t_base:.2f} s for 28 steps")
    print(f"{'metric':8s} {'thr':>5s} {'full':>4s} {'acc':>4s} {'rej':>4s} {'ideal':>6s} {'meas':>6s} {'PSNR dB':>8s}")
    for metric, thr in SETTINGS:
        with accel.apply(pipe, accel.SpeCaConfig(threshold=thr, metric=metric)) as h:
            img, t = go()
        s = h.trace.summary()
        print(f"{metric:8s} {thr:5.2f} {s['full_steps']:4d} {s['accepted_steps']:4d} {s['rejected_steps']:4d} "
              f"{s['ideal_speedup']:6.2f} {t_base / t:6.2f} {psnr(img, base, 255.0):8.1f}")


if __name__ == "__main__":
    main()

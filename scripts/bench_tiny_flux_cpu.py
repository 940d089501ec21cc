"""Time the bundled tiny FLUX on the CPU: one full pipeline call (default 28 steps, 128x128).

Prints the median seconds per image over --runs calls after one warm-up call::

    HF_HUB_OFFLINE=1 python scripts/bench_tiny_flux_cpu.py            # -> "28 steps 128x128: 1.23 s (median of 5)"
"""

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-flux")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--max-seq", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=args.res, width=args.res, num_inference_steps=args.steps, max_sequence_length=args.max_seq)
    prompt = "a large red circle on the left and a small blue square on the right, on a gray background"
    pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)  # warm-up
    times = []
    for i in range(args.runs):
        t = time.perf_counter()
        pipe(prompt, generator=torch.Generator().manual_seed(i), **kw)
        times.append(time.perf_counter() - t)
    print(f"threads {torch.get_num_threads()}  times {' '.join(f'{t:.2f}' for t in times)}")
    print(f"{args.steps} steps {args.res}x{args.res}: {statistics.median(times):.2f} s (median of {args.runs})")


if __name__ == "__main__":
    main()

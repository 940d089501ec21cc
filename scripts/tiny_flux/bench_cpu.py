"""Time the bundled tiny FLUX on the CPU: one full pipeline call (default 28 steps, 128x128).

Prints the median seconds per image over --runs calls after one warm-up call::

    HF_HUB_OFFLINE=1 python -m scripts.tiny_flux.bench_cpu            # -> "28 steps 128x128: 1.23 s (median of 5)"
"""

import argparse
import os
import statistics

import torch

from scripts.bench.pipes import PROMPT
from scripts.bench.utils import timed_call


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_flux.bench_cpu", description=__doc__.split("\n")[0])
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
    kw = dict(prompt=PROMPT, height=args.res, width=args.res, num_inference_steps=args.steps,
              max_sequence_length=args.max_seq)
    timed_call(pipe, kw, "cpu", seed=0)  # warm-up
    times = [timed_call(pipe, kw, "cpu", seed=i)[1] for i in range(args.runs)]
    print(f"threads {torch.get_num_threads()}  times {' '.join(f'{t:.2f}' for t in times)}")
    print(f"{args.steps} steps {args.res}x{args.res}: {statistics.median(times):.2f} s (median of {args.runs})")


if __name__ == "__main__":
    main()

"""CPU wall time of the tiny HunyuanVideo's default call (scripts.tiny_video.train.DEFAULT_CALL: 64 x 64,
9 frames, 10 steps, 16 x 16 tokens per latent frame), loading offline.

    python -m scripts.tiny_video.bench_cpu --model assets/models/tiny-hunyuanvideo [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from scripts.bench.utils import timed_call  # noqa: E402
from scripts.tiny_video.train import DEFAULT_CALL  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_video.bench_cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-hunyuanvideo")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt", default="a large red circle moving left, on a black background")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the default call's 10)")
    args = ap.parse_args()
    from diffusers import HunyuanVideoPipeline

    t = time.perf_counter()
    pipe = HunyuanVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t
    call = {**DEFAULT_CALL, **({} if args.steps is None else dict(num_inference_steps=args.steps))}
    kw = dict(prompt=args.prompt, output_type="pil", **call)
    times = [timed_call(pipe, kw, "cpu", seed=i)[1] for i in range(args.repeat)]
    print(json.dumps(dict(load_s=round(load, 2), call_s=[round(x, 2) for x in times], threads=torch.get_num_threads(),
                          call={k: v for k, v in call.items() if k != "prompt_template"})))


if __name__ == "__main__":
    main()

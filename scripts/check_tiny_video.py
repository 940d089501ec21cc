"""Prompt adherence of the bundled tiny HunyuanVideo on prompts and seeds its training never scored.

Prompts are drawn from the whole caption grammar (every colour, shape, size, direction, background), each
generated once with the default call (train_tiny_video.DEFAULT_CALL) and read back by
``tinyvideo_data.analyze_clip``: direction of motion, colour, shape, background.

    python scripts/check_tiny_video.py [-n 32] [--seed 1000] [--strip /tmp/check.png] [-v]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tinyvideo_data as data  # noqa: E402
from train_tiny_video import evaluate, fmt, summary  # noqa: E402


def heldout_prompts(n: int, seed: int) -> list[str]:
    return data.captions(data.sample_clips(n, seed))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-hunyuanvideo")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1000, help="seeds both the prompt draw and the generators")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the default call's)")
    ap.add_argument("--strip", default=None, help="write the clips as a PNG, one row each")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    call = {} if args.steps is None else dict(num_inference_steps=args.steps)
    t = time.perf_counter()
    res = evaluate(pipe, heldout_prompts(args.n, args.seed), seed=args.seed, strip=args.strip, **call)
    if args.verbose:
        for d in res["details"]:
            marks = "".join("." if d[f"ok_{k}"] else k[0].upper() for k in ("direction", "color", "shape", "bg"))
            print(f"{marks:5s} {d['prompt']:60s} -> {d['direction']}, {d['color']}, {d['shape']}, {d['bg']}")
    print(fmt(res), f"({time.perf_counter() - t:.0f}s)")
    print(json.dumps(summary(res)))
    return res


if __name__ == "__main__":
    main()

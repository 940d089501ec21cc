"""Prompt adherence of the bundled tiny HunyuanVideo on prompts and seeds its training never scored.

Prompts are drawn from the whole caption grammar (every colour, shape, size, direction, background), each
generated once with the default call (scripts.tiny_video.train.DEFAULT_CALL) and read back by
``scripts.tiny_video.data.analyze_clip``: direction of motion, colour, shape, background.

    python -m scripts.tiny_video.check [-n 32] [--seed 1000] [--strip /tmp/check.png] [-v]
    python -m scripts.tiny_video.check --method speca --steps 20      # also: specdiff (cache rate 0.85)

With ``--method`` the pipeline runs under ``accel.apply`` (library defaults) and the trace's summary (ideal and
measured speedup against a plain run of the same prompts) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.tiny_video import data  # noqa: E402
from scripts.tiny_video.train import ATTRS, evaluate, fmt, summary  # noqa: E402


def heldout_prompts(n: int, seed: int) -> list[str]:
    return data.captions(data.sample_clips(n, seed))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_video.check", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="assets/models/tiny-hunyuanvideo")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1000, help="seeds both the prompt draw and the generators")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the default call's)")
    ap.add_argument("--strip", default=None, help="write the clips as a PNG, one row each")
    ap.add_argument("--method", choices=["full", "speca", "specdiff"], default="full")
    ap.add_argument("--batch", type=int, default=8, help="prompts per pipeline call")
    ap.add_argument("--forecast", choices=["stack", "per_block"], default=None, help="SpeCa's forecast (default: the library's)")
    ap.add_argument("--threshold", type=float, default=None, help="SpeCa's threshold base (default: the library's)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    call = {} if args.steps is None else dict(num_inference_steps=args.steps)
    prompts = heldout_prompts(args.n, args.seed)
    t = time.perf_counter()
    plain = evaluate(pipe, prompts, seed=args.seed, batch=args.batch, **call) if args.method != "full" else None
    plain_s, handle = time.perf_counter() - t, None
    if args.method != "full":
        import accel

        speca = {k: v for k, v in (("forecast", args.forecast), ("threshold", args.threshold)) if v is not None}
        handle = accel.apply(pipe, accel.SpeCaConfig(**speca) if args.method == "speca" else accel.SpecDiffConfig())
    t = time.perf_counter()
    try:
        res = evaluate(pipe, prompts, seed=args.seed, strip=args.strip, batch=args.batch, **call)
    finally:
        if handle is not None:
            handle.remove()
    run_s = time.perf_counter() - t
    if args.verbose:
        for d in res["details"]:
            marks = "".join("." if d[f"ok_{k}"] else k[0].upper() for k in ATTRS)
            print(f"{marks:5s} {d['prompt']:60s} -> {d['direction']}, {d['color']}, {d['shape']}, {d['bg']}")
    print(args.method, fmt(res), f"({run_s:.1f}s)")
    if handle is not None:
        tr = [x.summary() for x in handle.traces]
        full = sum(x["full_steps"] for x in tr)
        print(f"plain {fmt(plain)} ({plain_s:.1f}s); {args.method}: ideal speedup "
              f"{sum(x['blocks_plain'] for x in tr) / sum(x['blocks_computed'] for x in tr):.2f}x, wall "
              f"{plain_s / run_s:.2f}x, full steps {full} of {sum(x['steps'] for x in tr)}")
    print(json.dumps(summary(res)))
    return res


if __name__ == "__main__":
    main()

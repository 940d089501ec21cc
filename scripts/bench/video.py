"""Video benchmark: plain HunyuanVideo run vs SpeCa (replayed fixed schedules) vs SpecDiff, one pipeline.

GPU (HunyuanVideo-sized transformer: 20 double + 40 single blocks, 24 heads x 128, random bf16 weights,
544x960, 33 frames -> 9 x 34 x 60 = 18360 video tokens + 256 text tokens, 50 steps; no VAE or text encoders,
prompt embeddings given directly):
    python -m scripts.bench.video
CPU smoke run (a small random HunyuanVideo transformer, 128x128, 9 frames, 10 steps, float32):
    python -m scripts.bench.video --small

Rows: full (the plain pipeline), SpeCa with each fixed schedule of --schedules replayed (`every:N` = 3 full
warm-up steps, then one full step every N steps, the others speculative: forecast + the verify block, the
last single block), optionally an adaptive SpeCa run with HunyuanVideo's defaults (--adaptive: threshold 1.0,
decay 0.1, min 4 / max 12 speculative steps) and its schedule replayed, and SpecDiff at each --cache-rates.
Per row: ideal speedup (trace: block computations of a plain run / those done, SpecDiff's pre-run
included), measured speedup (wall time of the whole pipeline call, best of --repeats, against the plain run),
PSNR of the final latents against the plain run (latent range as peak), relative L2 error, extra peak GPU
memory.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import accel
from scripts.bench.pipes import random_hunyuan_video
from scripts.bench.utils import best_of, fixed_schedule, psnr, rel_error, timed_call


def call(pipe, kw, args, device, steps=None):
    """One timed call at the benchmark's size (generator on the CPU), latents out: (latents, wall s, peak bytes)."""
    kw = dict(**kw, height=args.height, width=args.width, num_frames=args.frames,
              num_inference_steps=steps or args.steps, output_type="latent")
    return timed_call(pipe, kw, device, seed=args.seed, generator_device="cpu")


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.video", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small random transformer, CPU-sized defaults (smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="default 50 (10 with --small)")
    ap.add_argument("--height", type=int, default=None, help="default 544 (128 with --small)")
    ap.add_argument("--width", type=int, default=None, help="default 960 (128 with --small)")
    ap.add_argument("--frames", type=int, default=None, help="default 33 (9 with --small); latent frames (f-1)/4+1")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 256, 16 with --small)")
    ap.add_argument("--text-valid", type=int, default=None, help="unpadded text tokens (default 3/8 of --text-len)")
    ap.add_argument("--schedules", default="every:5,every:8", help="comma list of SpeCa fixed schedules every:N")
    ap.add_argument("--order", type=int, default=1, help="SpeCa Taylor order (HunyuanVideo default 1)")
    ap.add_argument("--forecast", default="stack", choices=("stack", "per_block"), help="SpeCa's forecast")
    ap.add_argument("--adaptive", action="store_true",
                    help="also run SpeCa adaptively (HunyuanVideo defaults) and replay its schedule")
    ap.add_argument("--cache-rates", default="0.85,0.95", help="comma list of SpecDiff cache rates")
    ap.add_argument("--c3-modes", default="history", help="comma list of SpecDiff c3_mode values")
    ap.add_argument("--spec-steps", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=4, help="SpecDiff warm-up steps")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per row, the fastest counts (default 1; 2 with --small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every number here")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    small = args.small
    args.steps = args.steps or (10 if small else 50)
    args.repeats = args.repeats or (2 if small else 1)
    args.height = args.height or (128 if small else 544)
    args.width = args.width or (128 if small else 960)
    args.frames = args.frames or (9 if small else 33)
    args.text_len = args.text_len or (16 if small else 256)
    args.text_valid = args.text_valid or max(1, args.text_len * 3 // 8)
    if not small and not cuda:
        print("note: the HunyuanVideo-sized run without CUDA is impractical; use --small on a CPU", flush=True)
    pipe, kw = random_hunyuan_video("small" if small else "full", device, dtype, args.text_len, args.text_valid)
    t = pipe.transformer
    grid = ((args.frames - 1) // 4 + 1, args.height // 8 // t.config.patch_size, args.width // 8 // t.config.patch_size)
    n_blocks = t.config.num_layers + t.config.num_single_layers
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device={device} ({dev_name}) model={'small' if small else 'hunyuan-video-sized'} random {dtype}, "
          f"{n_blocks} blocks, {args.height}x{args.width}, {args.frames} frames -> token grid {grid} = "
          f"{math.prod(grid)} video + {args.text_len} text tokens, {args.steps} steps", flush=True)

    call(pipe, kw, args, device, steps=2)  # warm-up (kernels, allocator)
    base, t_base, peak_base, _ = best_of(args.repeats, lambda: call(pipe, kw, args, device))
    if not torch.isfinite(base).all():
        print("warning: the plain run's latents are not finite (random weights); PSNR is meaningless", flush=True)
    peak_lat = (base.float().max() - base.float().min()).item()
    rows = []

    def record(name, out, wall, peak, trace=None, ideal=None):
        row = dict(run=name, ideal=ideal, measured=t_base / wall, wall_s=wall, psnr=psnr(out, base, peak_lat),
                   rel_err=rel_error(out, base),
                   extra_peak_mib=(peak - peak_base) / 2**20)
        if trace is not None:
            s = trace.summary()
            row.update(ideal=s["ideal_speedup"], full_steps=s["full_steps"],
                       spec_steps=s["accepted_steps"] + s["rejected_steps"], partial_steps=s["partial_steps"],
                       prerun_calls=s["overhead_calls"], prerun_ms=s["overhead_ms"],
                       token_fraction=s["token_fraction_computed"], token_grid=trace.token_grid)
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("full", base, t_base, peak_base, ideal=1.0)

    schedules = []
    for spec in [s for s in args.schedules.split(",") if s]:
        kind, _, n = spec.partition(":")
        if kind != "every" or not n.isdigit():
            raise SystemExit(f"--schedules: {spec!r} is not every:N")
        schedules.append((f"speca {spec} O{args.order}", fixed_schedule(args.steps, int(n))))
    if args.adaptive:
        cfg = accel.SpeCaConfig(threshold=1.0, decay=0.1, order=args.order, min_spec_steps=4, max_spec_steps=12,
                                forecast=args.forecast)
        with accel.apply(pipe, cfg) as h:
            out, wall, peak = call(pipe, kw, args, device)
            trace = h.trace
        record(f"speca adaptive O{args.order}", out, wall, peak, trace)
        schedules.append((f"speca adaptive replay O{args.order}", trace.schedule()))
    for name, sched in schedules:
        with accel.apply(pipe, accel.SpeCaConfig(schedule=sched, order=args.order, forecast=args.forecast)) as h:
            out, wall, peak, trace = best_of(args.repeats, lambda: call(pipe, kw, args, device), h)
        record(name, out, wall, peak, trace)

    for c3 in [x for x in args.c3_modes.split(",") if x]:
        for rate in [float(x) for x in args.cache_rates.split(",") if x]:
            # timed without per-step device syncs, as the plain run
            cfg = accel.SpecDiffConfig(cache_rate=rate, spec_steps=args.spec_steps, warmup_steps=args.warmup_steps,
                                       c3_mode=c3, sync_timing=False)
            with accel.apply(pipe, cfg) as h:
                call(pipe, kw, args, device, steps=args.warmup_steps + 2)  # allocate the caches once
                out, wall, peak, trace = best_of(args.repeats, lambda: call(pipe, kw, args, device), h)
            record(f"specdiff {rate:.2f}" + (f" {c3}" if c3 != "history" else ""), out, wall, peak, trace)

    print()
    print(f"plain run: {t_base:.3f} s ({1000 * t_base / args.steps:.1f} ms/step), {dev_name}, {args.steps} steps, "
          f"{args.height}x{args.width}x{args.frames}")
    hdr = f"{'run':28s} {'ideal':>6s} {'meas':>6s} {'wall s':>8s} {'PSNR dB':>8s} {'rel err':>8s} {'+MiB':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['run']:28s} {r['ideal']:6.2f} {r['measured']:6.2f} {r['wall_s']:8.3f} {r['psnr']:8.2f} "
              f"{r['rel_err']:8.4f} {r['extra_peak_mib']:7.0f}")
    print("(ideal = plain block computations / those done, SpecDiff's pre-run included; measured = wall-time "
          "ratio; PSNR of the final latents against the plain run)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, args=vars(args), device=dev_name), fh, indent=1)


if __name__ == "__main__":
    main()

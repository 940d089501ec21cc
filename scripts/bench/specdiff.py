"""SpecDiff benchmark: plain run vs SpecDiff at several cache rates (and diffusers' TaylorSeerCache), one pipeline.

GPU (FLUX.1-dev-sized transformer, random bf16 weights, 1024², prompt embeddings given directly, 28 steps as
the paper's FLUX setting):
    python -m scripts.bench.specdiff --random-flux-dev --steps 28 --size 1024 --score-every 1,4 --taylorseer
CPU, bundled tiny FLUX (falls back to the tests' tiny random pipe when assets/models/tiny-flux is missing):
    python -m scripts.bench.specdiff --model assets/models/tiny-flux --steps 28 --size 128
    python -m scripts.bench.specdiff --tiny-random --steps 28 --size 256
    python -m scripts.bench.specdiff --mid-random --steps 28 --size 512      # compute-bound on a CPU

Per run: ideal speedup (trace summary: block computations of a plain run / those done, pre-run included),
measured speedup (wall time of the whole pipeline call, best of --repeats, against the plain run), PSNR against
the plain run (decoded image in [0, 1] when the pipeline has a VAE, else the final latents with their range as
peak) and the relative L2 error of the final latents. Also: median partial / full step time, pre-run time,
extra peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import accel
from scripts.bench.pipes import PROMPT, TINY_FLUX_DIR, bundled_flux, flux_embeds, random_flux
from scripts.bench.utils import best_of, psnr, rel_error, timed_call


def call(pipe, kw, args, device, steps=None):
    """One timed call at the benchmark's size, latents out: (latents, wall s, peak bytes)."""
    kw = dict(**kw, height=args.size, width=args.size, num_inference_steps=steps or args.steps, output_type="latent")
    return timed_call(pipe, kw, device, seed=args.seed)


@torch.no_grad()
def decode(pipe, latents, size):
    """The pipeline's own decoding of packed latents into images in [0, 1] (None without a VAE)."""
    if getattr(pipe, "vae", None) is None:
        return None
    lat = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
    lat = (lat / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.specdiff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--random-flux-dev", action="store_true", help="FLUX.1-dev-sized random bf16 transformer (CUDA)")
    src.add_argument("--tiny-random", action="store_true", help="the tests' tiny random pipe (CPU)")
    src.add_argument("--mid-random", action="store_true", help="a middle-size random FLUX (CPU, use --size 512)")
    src.add_argument("--model", default=TINY_FLUX_DIR, help="a FluxPipeline folder")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=None, help="image size (default 1024 with --random-flux-dev, else 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-rates", default="0.5,0.85,0.95")
    ap.add_argument("--score-every", default="1", help="comma list: one SpecDiff row per value and cache rate")
    ap.add_argument("--spec-steps", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--refresh-every", type=int, default=0)
    ap.add_argument("--taylorseer", action="store_true",
                    help="also diffusers' TaylorSeerCacheConfig via pipe.transformer.enable_cache (default + lite)")
    ap.add_argument("--taylorseer-interval", type=int, default=5)
    ap.add_argument("--taylorseer-order", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per run; the fastest counts")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", default=None, help="write every number here")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.random_flux_dev:
        if not cuda:
            print("note: --random-flux-dev without CUDA runs on the CPU in float32 (very slow)", flush=True)
        pipe, kw = random_flux("dev", device, dtype), flux_embeds("dev", device, dtype)
        name = "random-flux-dev"
        args.size = args.size or 1024
    elif args.mid_random:
        pipe, kw = random_flux("mid", device, dtype), flux_embeds("mid", device, dtype)
        name = "mid-random"
        args.size = args.size or 512
    elif args.tiny_random or not os.path.isdir(args.model):
        if not args.tiny_random:
            print(f"note: {args.model} not found: using the tests' tiny random pipe", flush=True)
        pipe, kw = random_flux("tiny", device, dtype), flux_embeds("tiny", device, dtype)
        name = "tiny-random"
        args.size = args.size or 128
    else:
        pipe, kw = bundled_flux(args.model, device, dtype, args.prompt)
        name = args.model
        args.size = args.size or 128
    pipe.set_progress_bar_config(disable=True)
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device={device} ({dev_name}) model={name} steps={args.steps} size={args.size} dtype={dtype}", flush=True)

    # warm-up (kernels, allocator), then the plain reference
    call(pipe, kw, args, device, steps=2)
    base, t_base, peak_base, _ = best_of(args.repeats, lambda: call(pipe, kw, args, device))
    base_img = decode(pipe, base, args.size)
    peak_lat = (base.float().max() - base.float().min()).item()
    rows = []

    def record(run, out, wall, peak, trace=None, ideal=None, **extra):
        img = decode(pipe, out, args.size)
        q = psnr(img, base_img, 1.0) if img is not None else psnr(out, base, peak_lat)
        row = dict(run=run, ideal=ideal, measured=t_base / wall, wall_s=wall,
                   psnr=q, psnr_of="image" if img is not None else "latents",
                   rel_err=rel_error(out, base),
                   extra_peak_mib=(peak - peak_base) / 2**20, **extra)
        if trace is not None:
            s = trace.summary()
            row["ideal"] = s["ideal_speedup"]
            part = [r.time_ms for r in trace.steps if r.decision == "partial"]
            full = [r.time_ms for r in trace.steps if r.decision == "full"]
            row.update(partial_steps=s["partial_steps"], full_steps=s["full_steps"], prerun_calls=s["overhead_calls"],
                       token_fraction=s["token_fraction_computed"],
                       partial_ms=statistics.median(part) if part else None,
                       full_ms=statistics.median(full) if full else None, prerun_ms=s["overhead_ms"],
                       traced_ms=s["measured_ms"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("full", base, t_base, peak_base, ideal=1.0)

    for every in [int(x) for x in args.score_every.split(",")]:
        for rate in [float(x) for x in args.cache_rates.split(",")]:
            cfg = accel.SpecDiffConfig(cache_rate=rate, spec_steps=args.spec_steps, warmup_steps=args.warmup_steps,
                                       refresh_every=args.refresh_every, score_every=every)
            with accel.apply(pipe, cfg) as h:
                call(pipe, kw, args, device, steps=args.warmup_steps + 2)  # allocate caches once
                out, wall, peak, trace = best_of(args.repeats, lambda: call(pipe, kw, args, device), h)
            record(f"specdiff {rate:.2f} score/{every}", out, wall, peak, trace)

    if args.taylorseer:
        from diffusers import TaylorSeerCacheConfig

        for lite in (False, True):
            ts = dict(cache_interval=args.taylorseer_interval, max_order=args.taylorseer_order,
                      use_lite_mode=lite)
            ideal = None
            try:  # the same cache, traced by accel (counts real Linear work): gives the ideal speedup
                with accel.apply(pipe, accel.TaylorSeerConfig(cache_interval=args.taylorseer_interval,
                                                              max_order=args.taylorseer_order,
                                                              use_lite_mode=lite)) as h:
                    call(pipe, kw, args, device)
                    ideal = h.trace.summary()["ideal_speedup"]
            except (AttributeError, TypeError, ValueError) as e:
                print(f"note: no traced TaylorSeer ({e}); ideal left out", flush=True)
            pipe.transformer.enable_cache(TaylorSeerCacheConfig(**ts))
            try:
                out, wall, peak, _ = best_of(args.repeats, lambda: call(pipe, kw, args, device))
            finally:
                pipe.transformer.disable_cache()
            record(f"TaylorSeer N{args.taylorseer_interval}O{args.taylorseer_order}{' lite' if lite else ''}",
                   out, wall, peak, ideal=ideal)

    print()
    print(f"plain run: {t_base:.3f} s ({1000 * t_base / args.steps:.1f} ms/step), {name}, {dev_name}, "
          f"{args.steps} steps, {args.size}px")
    hdr = (f"{'run':26s} {'ideal':>6s} {'meas':>6s} {'wall s':>7s} {'PSNR dB':>8s} {'rel err':>8s} "
           f"{'part ms':>8s} {'full ms':>8s} {'pre ms':>8s} {'+MiB':>7s}")
    print(hdr)
    print("-" * len(hdr))

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-".rjust(len(format(0.0, fmt)))

    for r in rows:
        print(f"{r['run']:26s} {f(r['ideal'], '6.2f')} {r['measured']:6.2f} {r['wall_s']:7.3f} "
              f"{f(r['psnr'], '8.2f')} {r['rel_err']:8.4f} {f(r.get('partial_ms'), '8.1f')} "
              f"{f(r.get('full_ms'), '8.1f')} {f(r.get('prerun_ms'), '8.1f')} {r['extra_peak_mib']:7.0f}")
    print(f"(PSNR of the {rows[0]['psnr_of']} against the plain run; ideal includes the speculative pre-run)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, args=vars(args), device=dev_name, model=name), fh, indent=1)


if __name__ == "__main__":
    main()

"""SpecDiff benchmark: plain run vs SpecDiff at several cache rates and C3 modes, and the peers (diffusers'
TaylorSeerCache, SpeCa with a fixed schedule), one pipeline, eager and/or under regional compilation.

GPU (FLUX.1-dev-sized transformer, random bf16 weights, 1024², prompt embeddings given directly, 28 steps as
the paper's FLUX setting):
    python -m scripts.bench.specdiff --random-flux-dev --cache-rates 0.85,0.95 --c3-modes history,taylor \\
        --taylorseer lite --speca every:8 --modes eager,compiled --repeats 3
    python -m scripts.bench.specdiff --random-flux-dev --cache-rates 0.85,0.95 --text-tokens compute,cache \
        --taylorseer lite --repeats 3                     # partial steps with the text tokens computed / cached
CPU, bundled tiny FLUX (falls back to the tests' tiny random pipe when assets/models/tiny-flux is missing):
    python -m scripts.bench.specdiff --model assets/models/tiny-flux --steps 28 --size 128
    python -m scripts.bench.specdiff --tiny-random --steps 28 --size 256
    python -m scripts.bench.specdiff --mid-random --steps 28 --size 512      # compute-bound on a CPU

Per run: ideal speedup (trace summary: block computations of a plain run / those done, pre-run included),
measured speedup (wall time of the whole pipeline call, best of --repeats, against the plain run of the same
mode; the spread of the repeats is printed too), PSNR against the plain eager run (decoded image in [0, 1]
when the pipeline has a VAE, else the final latents with their range as peak) and the relative L2 error of the
final latents. SpecDiff and SpeCa are timed with `sync_timing=False` (no per-step device sync, as the plain
run); one more SpecDiff call with `sync_timing=True` gives the median partial / full step and pre-run times.
"Compiled" = `transformer.compile_repeated_blocks(dynamic=True)` (diffusers' regional compilation; dynamic
shapes, so that full and partial steps share one graph per block class); that mode runs the plain pipeline,
SpecDiff with the first value of each SpecDiff list (every cache rate and --text-tokens value), and
TaylorSeerCache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import accel
from scripts.bench.pipes import PROMPT, TINY_FLUX_DIR, bundled_flux, flux_embeds, random_flux
from scripts.bench.utils import best_and_walls, fixed_schedule, psnr, rel_error, timed_call


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


def profile_run(pipe, kw, args, device, path):
    """One SpecDiff-attached call under torch.profiler: the top kernels and ops by device and host time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        call(pipe, kw, args, device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as fh:
        fh.write(prof.key_averages().table(sort_by=sort, row_limit=40))
        fh.write("\n\n")
        fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"profile written to {path}", flush=True)


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
    ap.add_argument("--modes", default="eager", help="comma list of eager, compiled (every row in each mode)")
    ap.add_argument("--cache-rates", default="0.5,0.85,0.95")
    ap.add_argument("--c3-modes", default="history", help="comma list of SpecDiff c3_mode values")
    ap.add_argument("--text-tokens", default="compute",
                    help="comma list of SpecDiff text_tokens values (compute, cache), every value in each mode")
    ap.add_argument("--score-every", default="4", help="comma list: one SpecDiff row per value and cache rate")
    ap.add_argument("--score-query-stride", default="2", help="comma list of SpecDiff score_query_stride values")
    ap.add_argument("--spec-steps", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--refresh-every", type=int, default=0)
    ap.add_argument("--no-graphs", action="store_true", help="SpecDiff with cuda_graphs=False")
    ap.add_argument("--graphs-check", action="store_true",
                    help="also time SpecDiff at the first cache rate with cuda_graphs=False and compare the outputs")
    ap.add_argument("--taylorseer", nargs="?", const="both", default=None, choices=["both", "lite", "default"],
                    help="also diffusers' TaylorSeerCacheConfig via pipe.transformer.enable_cache")
    ap.add_argument("--taylorseer-interval", type=int, default=5)
    ap.add_argument("--taylorseer-order", type=int, default=1)
    ap.add_argument("--speca", default="", help="comma list of SpeCa fixed schedules every:N (order 1), e.g. every:8")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per run; the fastest counts")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of one SpecDiff call here")
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
    print(f"device={device} ({dev_name}) torch {torch.__version__} model={name} steps={args.steps} size={args.size} "
          f"dtype={dtype}", flush=True)

    rows, ref = [], {}
    lists = lambda s, f: [f(x) for x in s.split(",") if x]  # noqa: E731

    def record(mode, run, out, wall, walls, peak, t_base, peak_base, trace=None, ideal=None, step_trace=None, **extra):
        img = decode(pipe, out, args.size)
        q = psnr(img, ref["img"], 1.0) if img is not None else psnr(out, ref["lat"], ref["peak"])
        row = dict(mode=mode, run=run, ideal=ideal, measured=t_base / wall, wall_s=wall, walls_s=walls,
                   measured_spread=[t_base / max(walls), t_base / min(walls)],
                   psnr=q, psnr_of="image" if img is not None else "latents", rel_err=rel_error(out, ref["lat"]),
                   extra_peak_mib=(peak - peak_base) / 2**20, **extra)
        if trace is not None:
            s = trace.summary()
            row["ideal"] = s["ideal_speedup"]
            row.update(partial_steps=s["partial_steps"], full_steps=s["full_steps"], prerun_calls=s["overhead_calls"],
                       token_fraction=s["token_fraction_computed"])
        if step_trace is not None:
            s = step_trace.summary()
            part = [r.time_ms for r in step_trace.steps if r.decision == "partial"]
            full = [r.time_ms for r in step_trace.steps if r.decision == "full"]
            row.update(partial_ms=statistics.median(part) if part else None,
                       full_ms=statistics.median(full) if full else None, prerun_ms=s["overhead_ms"],
                       traced_ms=s["measured_ms"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    def specdiff_row(mode, t_base, peak_base, label, **cfg_kw):
        cfg = accel.SpecDiffConfig(spec_steps=args.spec_steps, warmup_steps=args.warmup_steps,
                                   refresh_every=args.refresh_every, sync_timing=False, **cfg_kw)
        with accel.apply(pipe, cfg) as h:
            call(pipe, kw, args, device, steps=args.warmup_steps + 2)  # caches, kernels, compilation
            (out, wall, peak, trace), walls = best_and_walls(args.repeats, lambda: call(pipe, kw, args, device), h)
        with accel.apply(pipe, cfg.__class__(**{**cfg.to_dict(), "sync_timing": True})) as h:
            call(pipe, kw, args, device)  # the step times (synchronised): one more call
            step_trace = h.trace
        record(mode, label, out, wall, walls, peak, t_base, peak_base, trace, step_trace=step_trace,
               config={k: v for k, v in cfg.to_dict().items() if k in cfg_kw})
        return out

    for mode in lists(args.modes, str):
        if mode == "compiled":
            pipe.transformer.compile_repeated_blocks(dynamic=True)
        elif mode != "eager":
            raise SystemExit(f"--modes: unknown mode {mode!r}")
        print(f"--- {mode}", flush=True)
        call(pipe, kw, args, device, steps=2)  # warm-up (kernels, allocator, compilation)
        (base, t_base, peak_base, _), walls = best_and_walls(args.repeats, lambda: call(pipe, kw, args, device))
        if not ref:  # the eager plain run is every row's reference
            ref.update(lat=base, img=decode(pipe, base, args.size),
                       peak=(base.float().max() - base.float().min()).item())
        record(mode, "full", base, t_base, walls, peak_base, t_base, peak_base, ideal=1.0)

        first = True
        one = (lambda x: x[:1]) if mode == "compiled" else (lambda x: x)  # compiled: the first of each list
        for every in one(lists(args.score_every, int)):
            for stride in one(lists(args.score_query_stride, int)):
                for c3, text, rate in [(c3, text, rate) for c3 in one(lists(args.c3_modes, str))
                                       for text in lists(args.text_tokens, str)
                                       for rate in lists(args.cache_rates, float)]:
                    label = f"specdiff {rate:.2f} {c3} score/{every} q/{stride}"
                    label += "" if text == "compute" else f" text/{text}"
                    out = specdiff_row(mode, t_base, peak_base, label, cache_rate=rate, score_every=every,
                                       score_query_stride=stride, c3_mode=c3, text_tokens=text,
                                       cuda_graphs=not args.no_graphs)
                    if first and args.graphs_check and cuda and not args.no_graphs:
                        eager_out = specdiff_row(mode, t_base, peak_base, label + " no graphs", cache_rate=rate,
                                                 score_every=every, score_query_stride=stride, c3_mode=c3,
                                                 text_tokens=text, cuda_graphs=False)
                        d = (out.float() - eager_out.float()).abs().max().item()
                        rows[-1]["graphs_vs_eager_max_abs"] = d
                        print(f"graphs vs no graphs: max |diff| of the final latents {d:.3g} "
                              f"({'bit-identical' if d == 0 else 'differ'})", flush=True)
                    if first and args.profile and mode == "eager":
                        cfg = accel.SpecDiffConfig(cache_rate=rate, score_every=every, score_query_stride=stride,
                                                   c3_mode=c3, text_tokens=text, cuda_graphs=not args.no_graphs,
                                                   sync_timing=False)
                        with accel.apply(pipe, cfg):
                            call(pipe, kw, args, device)
                            profile_run(pipe, kw, args, device, args.profile)
                    first = False

        for spec in one(lists(args.speca, str)) if mode == "eager" else []:
            kind, _, n = spec.partition(":")
            cfg = accel.SpeCaConfig(schedule=fixed_schedule(args.steps, int(n)), order=1, sync_timing=False)
            with accel.apply(pipe, cfg) as h:
                call(pipe, kw, args, device)
                (out, wall, peak, trace), walls = best_and_walls(args.repeats, lambda: call(pipe, kw, args, device), h)
            record(mode, f"speca {spec} O1", out, wall, walls, peak, t_base, peak_base, trace)

        if args.taylorseer:
            from diffusers import TaylorSeerCacheConfig

            for lite in {"both": (False, True), "lite": (True,), "default": (False,)}[args.taylorseer]:
                ideal = None
                try:  # the same cache, traced by accel (counts real Linear work): gives the ideal speedup
                    with accel.apply(pipe, accel.TaylorSeerConfig(cache_interval=args.taylorseer_interval,
                                                                  max_order=args.taylorseer_order,
                                                                  use_lite_mode=lite)) as h:
                        call(pipe, kw, args, device)
                        ideal = h.trace.summary()["ideal_speedup"]
                except (AttributeError, TypeError, ValueError) as e:
                    print(f"note: no traced TaylorSeer ({e}); ideal left out", flush=True)
                pipe.transformer.enable_cache(TaylorSeerCacheConfig(
                    cache_interval=args.taylorseer_interval, max_order=args.taylorseer_order, use_lite_mode=lite))
                try:
                    call(pipe, kw, args, device)
                    (out, wall, peak, _), walls = best_and_walls(args.repeats, lambda: call(pipe, kw, args, device))
                finally:
                    pipe.transformer.disable_cache()
                record(mode, f"TaylorSeer N{args.taylorseer_interval}O{args.taylorseer_order}{' lite' if lite else ''}",
                       out, wall, walls, peak, t_base, peak_base, ideal=ideal)

    print()
    print(f"{name}, {dev_name}, {args.steps} steps, {args.size}px; plain runs: " + ", ".join(
        f"{r['mode']} {r['wall_s']:.3f} s ({1000 * r['wall_s'] / args.steps:.1f} ms/step)"
        for r in rows if r["run"] == "full"))
    hdr = (f"{'mode':8s} {'run':38s} {'ideal':>6s} {'meas':>6s} {'spread':>11s} {'m/i':>5s} {'PSNR dB':>8s} "
           f"{'rel err':>8s} {'part ms':>8s} {'full ms':>8s} {'pre ms':>8s} {'+MiB':>7s}")
    print(hdr)
    print("-" * len(hdr))

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-".rjust(len(format(0.0, fmt)))

    for r in rows:
        lo, hi = r["measured_spread"]
        ratio = r["measured"] / r["ideal"] if r["ideal"] else None
        print(f"{r['mode']:8s} {r['run']:38s} {f(r['ideal'], '6.2f')} {r['measured']:6.2f} {lo:5.2f}-{hi:<5.2f} "
              f"{f(ratio, '5.2f')} {f(r['psnr'], '8.2f')} {r['rel_err']:8.4f} {f(r.get('partial_ms'), '8.1f')} "
              f"{f(r.get('full_ms'), '8.1f')} {f(r.get('prerun_ms'), '8.1f')} {r['extra_peak_mib']:7.0f}")
    print(f"(PSNR of the {rows[0]['psnr_of']} against the plain eager run; measured against the plain run of the same "
          f"mode; ideal includes the speculative pre-run; spread = slowest-fastest of {args.repeats} repeats)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, args=vars(args), device=dev_name, model=name, torch=torch.__version__), fh,
                      indent=1)


if __name__ == "__main__":
    main()

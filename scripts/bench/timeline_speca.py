"""Is a speculative step bound by the device or by the host? Per-step device time (CUDA events recorded at every
step's end, no host sync in the run) beside per-step host time, for the plain run and SpeCa every:8, on the
FLUX.1-dev-sized random bf16 transformer at 1024² (12 steps by default).

    python -m scripts.bench.timeline_speca [--compile] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

import accel
from scripts.bench.pipes import flux_embeds, random_flux
from scripts.bench.utils import fixed_schedule


def timeline(pipe, kw, device):
    """(wall s, [(host ms, device ms)] per step) of one call: an event and a clock read at each step's end."""
    events, clocks = [], []

    def cb(p, i, t, kwargs):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append(ev)
        clocks.append(time.perf_counter())
        return kwargs

    start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    pipe(**kw, generator=torch.Generator(device).manual_seed(0), callback_on_step_end=cb)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    host = [(c - p) * 1e3 for p, c in zip([t0] + clocks[:-1], clocks)]
    dev = [a.elapsed_time(b) for a, b in zip([start] + events[:-1], events)]
    return wall, list(zip(host, dev))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cprofile", action="store_true", help="and the host's Python profile of one SpeCa run")
    args = ap.parse_args()
    device = torch.device("cuda")
    pipe, embeds = random_flux("dev", device, torch.bfloat16), flux_embeds("dev", device, torch.bfloat16)
    if args.compile:
        pipe.transformer.compile_repeated_blocks()
    kw = dict(**embeds, height=1024, width=1024, num_inference_steps=args.steps, output_type="latent")
    sched = fixed_schedule(args.steps, 8)
    kind = "compiled" if args.compile else "eager"
    for _ in range(2):
        wall, rows = timeline(pipe, kw, device)
    print(f"[{kind}] plain: {wall:.3f} s; step device ms: mean {sum(d for _, d in rows[3:]) / len(rows[3:]):.1f}")
    cfgs = {"stack, no graphs": accel.SpeCaConfig(schedule=sched, sync_timing=False, cuda_graphs=False),
            "stack, CUDA graphs": accel.SpeCaConfig(schedule=sched, sync_timing=False)}
    for name, cfg in cfgs.items():
        with accel.apply(pipe, cfg):
            for _ in range(2):
                wall, rows = timeline(pipe, kw, device)
            if args.cprofile and cfg.cuda_graphs:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                timeline(pipe, kw, device)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        print(f"[{kind}] speca {name} every:8: {wall:.3f} s")
        for i, ((h, d), full) in enumerate(zip(rows, sched)):
            print(f"  step {i:2d} {'full' if full else 'spec'} host {h:7.2f} ms  device {d:7.2f} ms")
        spec = [r for r, f in zip(rows, sched) if not f][1:]
        print(f"[{kind}] speca {name} spec steps: host mean {sum(h for h, _ in spec) / len(spec):.2f} ms, "
              f"device mean {sum(d for _, d in spec) / len(spec):.2f} ms")


if __name__ == "__main__":
    main()

"""Where a speculative step's time goes: torch.profiler over SpeCa steps on the FLUX.1-dev-sized random model.

    python -m scripts.bench.profile_speca             # CUDA, eager; prints top ops by device and host time
    python -m scripts.bench.profile_speca --compile   # after pipe.transformer.compile_repeated_blocks()
"""

from __future__ import annotations

import time

import torch

import accel
from accel import kernels
from scripts.bench.pipes import flux_embeds, random_flux


def kernel_bandwidth(device):
    """The accumulate kernel over a FLUX.1-dev-sized speculative step's image stream (order 2)."""
    g = torch.Generator(device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)  # noqa: E731
    entries = [([rnd(1, 4096, 3072) for _ in range(3)], i, 0) for i in range(38)]
    entries += [([rnd(1, 4608, 3072) for _ in range(3)], 38 + i, 512) for i in range(38)]
    gates = rnd(76, 1, 3072)
    x = rnd(1, 4096, 3072)
    for fn, name in ((kernels.accumulate, "fused"), (kernels.torch_accumulate, "torch")):
        for _ in range(2):
            fn(x, entries, gates, [1.0, 2.0, 3.0])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn(x, entries, gates, [1.0, 2.0, 3.0])
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 10
        nbytes = (76 * 3 + 2) * x.numel() * 2
        print(f"{name} accumulate, 76 blocks x 3 terms: {dt * 1e3:.2f} ms, {nbytes / dt / 1e12:.2f} TB/s")


def block_ms(pipe, embeds, device, reps=20):
    """One single-stream block's time on FLUX.1-dev-sized inputs (4096 + 512 tokens): the unit of the target."""
    blk = pipe.transformer.single_transformer_blocks[-1]
    g = torch.Generator(device).manual_seed(0)
    h = torch.randn(1, 4096, 3072, generator=g, device=device, dtype=torch.bfloat16)
    c = torch.randn(1, 512, 3072, generator=g, device=device, dtype=torch.bfloat16)
    temb = torch.randn(1, 3072, generator=g, device=device, dtype=torch.bfloat16)
    rope = pipe.transformer.pos_embed(torch.zeros(4608, 3, device=device))
    for _ in range(3):
        blk(hidden_states=h, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        blk(hidden_states=h, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    kernel_bandwidth(device)
    pipe, embeds = random_flux("dev", device, torch.bfloat16), flux_embeds("dev", device, torch.bfloat16)
    if args.compile:
        pipe.transformer.compile_repeated_blocks()
    print(f"one single block: {block_ms(pipe, embeds, device):.2f} ms" + (" (compiled)" if args.compile else ""))
    steps = 12
    sched = [True, True, True] + [False] * 4 + [True] + [False] * 4
    kw = dict(**embeds, height=1024, width=1024, num_inference_steps=steps, output_type="latent")
    with accel.apply(pipe, accel.SpeCaConfig(schedule=sched, sync_timing=True)) as h:
        pipe(**kw, generator=torch.Generator(device).manual_seed(0))  # warm-up, Triton compile
        pipe(**kw, generator=torch.Generator(device).manual_seed(0))
        for r in h.trace.steps:
            print(r.step, r.decision, f"{r.time_ms:.1f} ms", r.blocks_computed)
        state = {}

        def prof_cb(p, i, t, kwargs):
            if i == 8 and "prof" not in state:
                state["prof"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                state["prof"].__enter__()
            if i == 10 and "prof" in state and "done" not in state:
                torch.cuda.synchronize()
                state["prof"].__exit__(None, None, None)
                state["done"] = True
            return kwargs

        pipe(**kw, generator=torch.Generator(device).manual_seed(0), callback_on_step_end=prof_cb)
        for r in h.trace.steps:
            print(r.step, r.decision, f"{r.time_ms:.1f} ms")
    ka = state["prof"].key_averages()
    dev = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3
    print(f"profiled 2 speculative steps: device time {dev / 2:.2f} ms per step")
    print(ka.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()

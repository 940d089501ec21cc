"""SpeCa benchmark: full vs SpeCa (replayed fixed schedules) and diffusers' TaylorSeerCache, on one pipeline.

GPU (the issue's setting: FLUX.1-dev-sized transformer, random bf16 weights, 1024², 50 steps):
    python -m scripts.bench.speca --model random-flux-dev --steps 50 --size 1024
CPU, on the bundled tiny FLUX:
    python -m scripts.bench.speca --model assets/models/tiny-flux --steps 28 --size 128

Prints, per run: computed (full) steps, ideal speedup (block computations), measured speedup (wall time of the
pipeline call against the plain run) and their ratio, extra peak memory vs the cached tensors' size, the
relative error of the final latents, and the verification cost against a full step.
A schedule "every:N" means: warm-up of 3 full steps, then a full step every N steps, the rest speculative.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import accel
from accel.metrics import per_sample_error
from scripts.bench.pipes import bundled_flux, flux_embeds, random_flux
from scripts.bench.utils import best_of, fixed_schedule, rel_error, sync, timed_call


def run(pipe, embeds, args, device, steps=None):
    """One timed call at the benchmark's size, latents out: (latents, wall s, peak bytes)."""
    kw = dict(**embeds, height=args.size, width=args.size, num_inference_steps=steps or args.steps,
              output_type="latent")
    return timed_call(pipe, kw, device, seed=args.seed)


def verify_cost_ms(pipe, device, args, reps=20):
    """Time of the verify block (last single block) on a step's inputs plus the error metric."""
    t = pipe.transformer
    block = t.single_transformer_blocks[-1]
    dim = t.inner_dim
    n_img = (args.size // 16) ** 2
    dtype = next(t.parameters()).dtype
    hidden = torch.randn(1, n_img, dim, device=device, dtype=dtype)
    enc = torch.randn(1, 512 if args.model.startswith("random") else 32, dim, device=device, dtype=dtype)
    temb = torch.randn(1, dim, device=device, dtype=dtype)
    ids = torch.zeros(enc.shape[1] + n_img, 3, device=device)
    rope = t.pos_embed(ids)
    times = []
    with torch.no_grad():
        for i in range(reps + 3):
            sync(device)
            t0 = time.perf_counter()
            e, h = block(hidden_states=hidden, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
            per_sample_error(h, hidden, "rel_l1", 1e-6).tolist()
            sync(device)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def kernel_check(device):
    """The fused kernels against float64 torch references, on fresh random data."""
    from accel import kernels

    if kernels.triton is None or device.type != "cuda":
        return "fused kernels not used here (no CUDA/Triton): torch path"
    worst_acc = worst_upd = 0.0
    bf = torch.bfloat16
    for n_terms in (1, 3, 5):
        g = torch.Generator(device).manual_seed(n_terms)
        rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=bf)  # noqa: E731
        joint = [[rnd(2, 4608, 3072) for _ in range(n_terms)] for _ in range(3)]
        img = [[rnd(2, 4096, 3072) for _ in range(n_terms)] for _ in range(2)]
        gates = rnd(7, 2, 3072)
        entries = [(t, i, 512) for i, t in enumerate(joint)] + [(t, 3 + i, 0) for i, t in enumerate(img)]
        x = rnd(2, 4096, 3072)
        coefs = [1.0, 2.5, -3.25, 0.5, 7.0][:n_terms]
        dbl = [([t.double() for t in ts], gi, r) for ts, gi, r in entries]
        ref = kernels.torch_accumulate(x.double(), dbl, gates.double(), coefs)
        out = kernels.accumulate(x, entries, gates, coefs)
        worst_acc = max(worst_acc, ((out.double() - ref).norm() / ref.norm()).item())
        inv = [0.5, -0.25, 1 / 3, 2.0][: n_terms - 1]
        f, old = rnd(2, 4608, 3072), joint[0]
        ref_u = kernels.torch_taylor_update(f.double(), [t.double() for t in old], inv)
        out_u = kernels.taylor_update(f, old, inv)
        for a, b in zip(out_u[1:], ref_u[1:]):
            worst_upd = max(worst_upd, ((a.double() - b).norm() / b.norm()).item())
    return f"fused kernels vs float64: accumulate worst rel err {worst_acc:.2e}, taylor_update {worst_upd:.2e}"


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.speca", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-flux-dev")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", default="2", help="comma list of Taylor orders, one row each per schedule")
    ap.add_argument("--schedules", default="every:4,every:6,every:8", help="comma list of every:N")
    ap.add_argument("--taylorseer", action="store_true", help="also run diffusers' TaylorSeerCache (default and lite)")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model in ("random-flux-dev", "random-small"):
        size = "small" if args.model == "random-small" else "dev"
        pipe, embeds = random_flux(size, device, dtype), flux_embeds(size, device, dtype)
    else:
        pipe, embeds = bundled_flux(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) model={args.model} "
          f"steps={args.steps} size={args.size}", flush=True)

    # warm-up (kernels, allocator), then the plain run twice: the faster is the reference
    run(pipe, embeds, args, device, steps=3)
    base, t_base, peak_base, _ = best_of(2, lambda: run(pipe, embeds, args, device))
    with accel.apply(pipe, accel.SpeCaConfig(schedule=[True] * args.steps)) as h:
        _, t_traced, _ = run(pipe, embeds, args, device)
        full_step_ms = statistics.median(r.time_ms for r in h.trace.steps)
    rows = [dict(run="full", computed=args.steps, ideal=1.0, measured=1.0, wall_s=t_base, extra_peak_mib=0.0,
                 cache_mib=0.0, rel_err=0.0)]
    print(f"full: {t_base:.3f} s ({full_step_ms:.1f} ms/step; hooks attached, all full: {t_traced:.3f} s)", flush=True)

    def record(name, out, wall, peak, trace=None, computed=None):
        s = trace.summary() if trace is not None else {}
        ideal = s.get("ideal_speedup") or (args.steps / computed if computed else float("nan"))
        meas = t_base / wall
        rel = rel_error(out, base)
        row = dict(run=name, computed=computed if computed is not None else s.get("full_steps"), ideal=ideal,
                   measured=meas, wall_s=wall, extra_peak_mib=(peak - peak_base) / 2**20,
                   cache_mib=(trace.meta.get("cache_bytes", 0) / 2**20) if trace is not None else float("nan"),
                   rel_err=rel)
        if trace is not None:
            spec = [r.time_ms for r in trace.steps if r.decision != "full"]
            full = [r.time_ms for r in trace.steps if r.decision == "full"]
            row["spec_step_ms"] = statistics.median(spec) if spec else None
            row["full_step_ms"] = statistics.median(full) if full else None
        rows.append(row)
        print(json.dumps(row), flush=True)

    for order in [int(o) for o in args.orders.split(",")]:
        for spec in args.schedules.split(","):
            interval = int(spec.split(":")[1])
            sched = fixed_schedule(args.steps, interval)
            with accel.apply(pipe, accel.SpeCaConfig(schedule=sched, order=order)) as h:
                # twice, the faster counts: the first call of a new order compiles its Triton kernels
                record(f"speca {spec} o{order}", *best_of(2, lambda: run(pipe, embeds, args, device), h))

    if args.taylorseer:
        from diffusers import TaylorSeerCacheConfig

        for lite in (False, True):
            pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=5, max_order=1, use_lite_mode=lite))
            try:
                out, wall, peak = run(pipe, embeds, args, device)
            finally:
                pipe.transformer.disable_cache()
            n_full = sum(fixed_schedule(args.steps, 5))
            record(f"diffusers TaylorSeer interval 5{' lite' if lite else ''}", out, wall, peak, computed=n_full)

    print(kernel_check(device))
    v_ms = verify_cost_ms(pipe, device, args)
    print(f"verification (verify block + metric): {v_ms:.2f} ms = {100 * v_ms / full_step_ms:.2f}% of a full step")
    print()
    print(f"{'run':36s} {'full':>4s} {'ideal':>6s} {'meas':>6s} {'ratio':>6s} {'wall s':>7s} {'spec ms':>8s} "
          f"{'+peak MiB':>9s} {'cache MiB':>9s} {'rel err':>8s}")
    for r in rows:
        ratio = r["measured"] / r["ideal"] if r["ideal"] else float("nan")
        print(f"{r['run']:36s} {r['computed']:>4} {r['ideal']:6.2f} {r['measured']:6.2f} {ratio:6.3f} "
              f"{r['wall_s']:7.3f} {r.get('spec_step_ms') or 0:8.2f} {r['extra_peak_mib']:9.0f} "
              f"{r['cache_mib']:9.0f} {r['rel_err']:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, verify_ms=v_ms, full_step_ms=full_step_ms, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()

"""SpeCa benchmark: plain vs SpeCa (replayed fixed schedules) vs the peers at the same step mask, one pipeline.

GPU (the issue's setting: FLUX.1-dev-sized transformer, random bf16 weights, 1024², 50 steps), eager then
regionally compiled (`pipe.transformer.compile_repeated_blocks()`), in two processes:
    python -m scripts.bench.speca
    python -m scripts.bench.speca --compile
(scripts/bench/gpu_speca.sh runs both on a lent GPU, with the wheels it needs.)
CPU, on the bundled tiny FLUX (smoke run; a peer that is not installed costs its row only):
    python -m scripts.bench.speca --model assets/models/tiny-flux --steps 28 --size 128 --repeats 1

Rows (`--rows`, after the plain run, in order): SpeCa runs written forecast/schedule/order (default: the stack and
per-block forecasts at every:8, order 1, and the stack forecast at every:12 = 7 full steps of 50), and the peers:
`cachedit` (cache-dit's DBCache F1B0 + TaylorSeer order 1 at the step mask of the first SpeCa row, static policy:
its first block computed every step, the rest forecast; a benchmark-only extra, never used by accel) and `lite`
(diffusers' TaylorSeerCache lite mode, --lite-interval 8).
A schedule "every:N" = 3 warm-up full steps, then a full step every N steps, the rest speculative (verified).

Per row: wall time of the pipeline call (median of --repeats timed calls, and their spread), speedup against the
plain run of the same kind (eager / compiled), ideal speedup (block computations) and measured / ideal, the
speculative step's cost (from the wall time: (wall - full steps x plain step) / speculative steps, in ms and in
blocks, a block being a plain step / blocks), the first call's time (compiled: includes compiling), graphs
compiled by the first call and by the later ones (must be 0), extra peak GPU memory over the plain run, SpeCa's
cached bytes, and the final latents' PSNR (latent range as peak) and relative error against the plain run.
SpeCa runs with `sync_timing=False` (no host sync per step; errors are read at the end of the run). Compiled,
one process holds every row's graphs, so dynamo's recompile limit is raised to 64 (graphs per row are printed).
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
from scripts.bench.utils import fixed_schedule, psnr, rel_error, sync, timed_call


def run(pipe, embeds, args, device, steps=None):
    """One timed call at the benchmark's size, latents out: (latents, wall s, peak bytes)."""
    kw = dict(**embeds, height=args.size, width=args.size, num_inference_steps=steps or args.steps,
              output_type="latent")
    return timed_call(pipe, kw, device, seed=args.seed)


def parse_schedule(spec: str, n_steps: int) -> list[bool]:
    kind, _, value = spec.partition(":")
    if kind != "every" or not value.isdigit() or int(value) < 1:
        raise SystemExit(f"schedule {spec!r}: use every:N")
    return fixed_schedule(n_steps, int(value))


def graphs() -> int:
    """Graphs dynamo compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def verify_cost_ms(pipe, device, args, reps=20):
    """Time of the verify block (last single block, eager) on a step's inputs plus the error metric."""
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
    worst_acc = worst_upd = worst_err = 0.0
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
        real = rnd(2, 4608, 3072)
        for metric in ("rel_l1", "rel_l2", "cosine"):
            want, want_map = per_sample_error_map(kernels.torch_forecast([t.double() for t in joint[0]], coefs),
                                                  real.double(), metric)
            got, got_map = kernels.forecast_error(joint[0], coefs, real, metric, 1e-6, slice(512, None))
            worst_err = max(worst_err, ((got.double() - want).abs() / want.abs()).max().item(),
                            ((got_map.double() - want_map).norm() / want_map.norm()).item())
    return (f"fused kernels vs float64: accumulate worst rel err {worst_acc:.2e}, taylor_update {worst_upd:.2e}, "
            f"forecast_error {worst_err:.2e}")


def per_sample_error_map(pred, real, metric):
    from accel.metrics import verification_errors

    err, tok = verification_errors(pred, real, metric, 1e-6, slice(512, None))
    return err.double(), tok.double()


# ---- the peers (benchmark-only: never imported by accel) -----------------------------------------------
class CacheDit:
    """cache-dit's DBCache F1B0 + TaylorSeer calibrator at a fixed step mask (static policy: the masked-out
    steps compute the first block and forecast the rest, with no residual-difference check)."""

    def __init__(self, schedule, order=1):
        self.schedule, self.order = schedule, order

    def __enter__(self):
        import cache_dit

        self.pipe = self.target
        cache_dit.enable_cache(
            self.pipe,
            cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=3, max_cached_steps=-1,
                max_continuous_cached_steps=-1, residual_diff_threshold=1e9, num_inference_steps=len(self.schedule),
                steps_computation_mask=[int(f) for f in self.schedule], steps_computation_policy="static"),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.order))
        return self

    def __exit__(self, *exc):
        import cache_dit

        cache_dit.disable_cache(self.pipe)


class DiffusersLite:
    """diffusers' TaylorSeerCache in lite mode: whole blocks skipped between full steps, only the final
    projection forecast (3 warm-up steps, then a full step every `interval`)."""

    def __init__(self, interval, order=1):
        self.interval, self.order = interval, order

    def __enter__(self):
        from diffusers import TaylorSeerCacheConfig

        self.pipe = self.target
        self.pipe.transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=3, max_order=self.order, use_lite_mode=True))
        return self

    def __exit__(self, *exc):
        self.pipe.transformer.disable_cache()


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.speca", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-flux-dev", help="random-flux-dev, random-small or a pipeline folder")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="stack/every:8/1,per_block/every:8/1,stack/every:12/1,cachedit,lite",
                    help="comma list of SpeCa rows forecast/schedule/order and peers (cachedit, lite)")
    ap.add_argument("--lite-interval", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="pipe.transformer.compile_repeated_blocks() first")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (after one untimed first call)")
    ap.add_argument("--no-checks", action="store_true", help="skip the kernel check and the verify-block timing")
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
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    kind = "compiled (compile_repeated_blocks)" if args.compile else "eager"
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) torch "
          f"{torch.__version__} model={args.model} steps={args.steps} size={args.size} {kind}", flush=True)
    if args.compile:
        # Every block's compiled graphs are cached on one code object (nn.Module._call_impl), shared by all the
        # rows of this process: room for each method's own variants, so that no row runs eagerly because an
        # earlier row used up dynamo's default of 8. The rows' graph counts are printed.
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        pipe.transformer.compile_repeated_blocks()
    else:
        run(pipe, embeds, args, device, steps=3)  # warm-up (kernels, allocator)

    rows = []
    ref = {}

    def measure(name, ctx=None, schedule=None, blocks_per_spec=1.0):
        """One untimed first call (timed apart: compiled, it compiles), then --repeats timed calls."""
        g0 = graphs()
        handle = None
        if ctx is not None:
            ctx.target = pipe
            handle = ctx.__enter__()
        try:
            _, first_s, _ = run(pipe, embeds, args, device)
            g1 = graphs()
            runs = [run(pipe, embeds, args, device) for _ in range(args.repeats)]
            g2 = graphs()
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        walls = [w for _, w, _ in runs]
        wall = statistics.median(walls)
        out = runs[0][0]
        peak = max(p for _, _, p in runs)
        row = dict(run=name, wall_s=wall, wall_min_s=min(walls), wall_max_s=max(walls), first_s=first_s,
                   graphs_first=g1 - g0, graphs_later=g2 - g1, peak_mib=peak / 2**20)
        if not ref:
            ref.update(out=out, wall=wall, peak=peak, range=(out.float().max() - out.float().min()).item())
        row["measured"] = ref["wall"] / wall
        row["extra_peak_mib"] = (peak - ref["peak"]) / 2**20
        row["psnr"] = psnr(out, ref["out"], ref["range"])
        row["rel_err"] = rel_error(out, ref["out"])
        if schedule is not None:
            n_full = sum(schedule)
            n_spec = len(schedule) - n_full
            step_ms = ref["wall"] * 1000 / args.steps
            row["full_steps"] = n_full
            row["ideal"] = len(schedule) * n_blocks / (n_full * n_blocks + n_spec * blocks_per_spec)
            row["spec_step_ms"] = (wall * 1000 - n_full * step_ms) / n_spec if n_spec else None
            row["spec_step_blocks"] = row["spec_step_ms"] / (step_ms / n_blocks) if n_spec else None
        else:
            row.update(full_steps=args.steps, ideal=1.0)
        row["ratio"] = row["measured"] / row["ideal"]
        trace = getattr(handle, "trace", None)
        if trace is not None:
            s = trace.summary()
            assert s["full_steps"] == row["full_steps"], (s, row)
            row["cache_mib"] = trace.meta.get("cache_bytes", 0) / 2**20
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    class SpeCa:
        def __init__(self, cfg):
            self.cfg = cfg

        def __enter__(self):
            self.handle = accel.apply(self.target, self.cfg)
            return self.handle

        def __exit__(self, *exc):
            self.handle.remove()

    measure("plain")
    items = [r for r in args.rows.split(",") if r]
    first_mask = next(((spec.split("/")[1], parse_schedule(spec.split("/")[1], args.steps))
                       for spec in items if "/" in spec), ("every:8", fixed_schedule(args.steps, 8)))
    for item in items:
        if "/" in item:
            forecast, sched_spec, order = item.split("/")
            sched = parse_schedule(sched_spec, args.steps)
            cfg = accel.SpeCaConfig(schedule=sched, order=int(order), forecast=forecast, sync_timing=False)
            measure(f"speca {forecast} {sched_spec} o{order}", SpeCa(cfg), sched)
        elif item in ("cachedit", "lite"):
            try:  # a peer that fails (not installed, API changed) costs its row, not the benchmark
                if item == "cachedit":
                    sched_spec, sched = first_mask
                    measure(f"cache-dit F1B0+TaylorSeer o1 {sched_spec}", CacheDit(sched), sched)
                else:
                    n = args.lite_interval
                    sched = [i < 3 or (i - 4) % n == 0 for i in range(args.steps)]  # diffusers' rule, warm-up 3
                    measure(f"diffusers TaylorSeer lite interval {n}", DiffusersLite(n), sched, blocks_per_spec=0.0)
            except Exception as e:  # noqa: BLE001
                print(f"{item} failed: {type(e).__name__}: {e}", flush=True)
        else:
            raise SystemExit(f"unknown row {item!r}: forecast/every:N/order, cachedit or lite")

    checks = {}
    if not args.no_checks and not args.compile:
        checks["kernels"] = kernel_check(device)
        checks["verify_ms"] = verify_cost_ms(pipe, device, args)
        print(checks["kernels"])
        print(f"verify block (eager, + metric): {checks['verify_ms']:.2f} ms; plain step / blocks: "
              f"{ref['wall'] * 1000 / args.steps / n_blocks:.2f} ms")
    print()
    print(f"{kind}, {args.repeats} timed calls per row (median; spread min-max)")
    print(f"{'run':40s} {'full':>4s} {'ideal':>6s} {'meas':>6s} {'ratio':>6s} {'wall s':>7s} {'spread s':>13s} "
          f"{'spec ms':>7s} {'blocks':>6s} {'first s':>7s} {'graphs':>6s} {'+peak MiB':>9s} {'cache MiB':>9s} "
          f"{'PSNR':>6s} {'rel err':>8s}")
    for r in rows:
        spec_ms = r.get("spec_step_ms")
        print(f"{r['run']:40s} {r['full_steps']:>4} {r['ideal']:6.2f} {r['measured']:6.2f} {r['ratio']:6.3f} "
              f"{r['wall_s']:7.3f} {r['wall_min_s']:6.3f}-{r['wall_max_s']:6.3f} "
              f"{spec_ms if spec_ms is not None else float('nan'):7.2f} "
              f"{r.get('spec_step_blocks') or float('nan'):6.2f} {r['first_s']:7.1f} "
              f"{r['graphs_first']:>3}/{r['graphs_later']:<2} {r['extra_peak_mib']:9.0f} "
              f"{r.get('cache_mib', float('nan')):9.1f} {r['psnr']:6.1f} {r['rel_err']:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, checks=checks, args=vars(args), kind=kind,
                           device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           torch=torch.__version__), f, indent=1)


if __name__ == "__main__":
    main()

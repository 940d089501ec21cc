"""SpeCa and SpecDiff under diffusers' context parallelism (docs/distributed.md): one GPU against two.

Two passes over the same rows (`--rows`), both writing under `--out`:

    python -m scripts.bench.multi_gpu --model flux-dev --size 2048 --out OUT            # one process: reference
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m scripts.bench.multi_gpu \\
        --model flux-dev --size 2048 --out OUT                                             # 2 ranks, Ulysses

The one-process pass runs every row on one device and saves its latents and decisions (`ref-<row>.pt`). The
distributed pass builds the same random model on every rank (rank 0's weights broadcast), enables
`ContextParallelConfig(ulysses_degree=world)` and runs the rows again; rank 0 compares each output with the
one-device run of the same row (relative L2, max |diff|), checks that the decisions equal the one-device run's
and that every rank's trace holds the same decisions (`accel.distributed.traces_agree`), and prints one table
with both passes (`summary.json`). `--device cpu` runs the same on gloo (a smoke test at tiny sizes).

Rows: plain; speca (adaptive, the library defaults: decisions follow the verification error); speca_every8
(fixed schedule every:8, the fast setting of docs/speca.md); specdiff (cache rate 0.85). Each row: one
untimed 2-step call first (kernels, cuDNN and NCCL set-up), then `--repeats` timed calls, the best kept.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.distributed as dist

import accel
from accel.distributed import context_parallel, traces_agree

from .pipes import flux_embeds, random_flux
from .utils import fixed_schedule, rel_error, sync

MODELS = {"flux-dev": "dev", "flux-small": "small", "flux-tiny": "tiny"}


def row_config(name: str, steps: int):
    if name == "plain":
        return None
    if name == "speca":
        return accel.SpeCaConfig()
    if name.startswith("speca_every"):
        return accel.SpeCaConfig(schedule=fixed_schedule(steps, int(name[len("speca_every"):])))
    if name == "specdiff":
        return accel.SpecDiffConfig(cache_rate=0.85)
    raise ValueError(f"unknown row {name!r}: use plain, speca, speca_everyN, specdiff")


def decisions(trace) -> list:
    return [(r.step, r.decision, r.reason, r.tokens_computed) for r in trace.steps] if trace is not None else []


def level_maps(trace) -> torch.Tensor | None:
    """SpecDiff's level map of every step [steps, tokens] (which tokens were C1, C2, C3), else None."""
    maps = [torch.as_tensor(r.maps["level"]).flatten() for r in trace.steps if "level" in r.maps] if trace else []
    return torch.stack(maps) if maps else None


def run_row(pipe, kw: dict, config, args, device) -> dict:
    handle = accel.apply(pipe, config) if config is not None else None
    try:
        def call(steps):
            generator = torch.Generator("cpu").manual_seed(args.seed)  # the same noise on every rank and device
            sync(device)
            t0 = time.perf_counter()
            out = pipe(**kw, height=args.size, width=args.size, num_inference_steps=steps, generator=generator,
                       output_type="latent").images
            sync(device)
            return out, time.perf_counter() - t0

        call(2)  # untimed
        walls, out = [], None
        for _ in range(args.repeats):
            out, wall = call(args.steps)
            walls.append(wall)
        trace = handle.trace if handle is not None else None
        cp = context_parallel(pipe.transformer)
        agree = traces_agree(trace, cp) if trace is not None else True
        return dict(latents=out.float().cpu(), walls=walls, wall=min(walls), decisions=decisions(trace),
                    levels=level_maps(trace), agree=agree, full_steps=sum(d[1] == "full" for d in decisions(trace)) if trace else args.steps)
    finally:
        if handle is not None:
            handle.remove()


def build(args, device, dtype):
    size = MODELS[args.model]
    pipe = random_flux(size, device=device, dtype=dtype, seed=0)
    kw = flux_embeds(size, device=device, dtype=dtype, seed=1)
    if dist.is_initialized():  # every rank: rank 0's weights and embeddings, whatever each device's RNG did
        for t in list(pipe.transformer.parameters()) + list(pipe.transformer.buffers()):
            dist.broadcast(t.data, src=0)
        for v in kw.values():
            if isinstance(v, torch.Tensor):
                dist.broadcast(v, src=0)
    return pipe, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux-dev", choices=sorted(MODELS))
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="plain,speca,speca_every8,specdiff")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, dtype = torch.device("cuda", local), torch.bfloat16
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, world)))
        device, dtype = torch.device("cpu"), torch.float32
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    pipe, kw = build(args, device, dtype)
    if world > 1:
        from diffusers import ContextParallelConfig

        # diffusers 0.42.1 takes `rank % torch.accelerator.device_count()`, 0 on a CPU-only torch
        cpu = args.device == "cpu"
        with mock.patch("torch.accelerator.device_count", return_value=1) if cpu else nullcontext():
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    rows = [r for r in args.rows.split(",") if r]
    results = {}
    for name in rows:
        try:
            res = run_row(pipe, kw, row_config(name, args.steps), args, device)
        except Exception as e:  # a row that fails is reported, the others still run
            res = dict(error=f"{type(e).__name__}: {e}")
        results[name] = res
        if rank == 0:
            print(f"[{world} x {args.device}] {name}: " + (res.get("error") or f"{res['wall']:.2f} s"), flush=True)
    if world == 1:
        for name, res in results.items():
            torch.save(res, os.path.join(args.out, f"ref-{name}.pt"))
        return
    if rank == 0:
        summarise(args, world, results, rows)
    dist.barrier()
    dist.destroy_process_group()


def summarise(args, world: int, results: dict, rows: list[str]) -> None:
    table, plain1 = [], None
    ref_plain = os.path.join(args.out, "ref-plain.pt")
    if os.path.exists(ref_plain):
        plain1 = torch.load(ref_plain)
    for name in rows:
        res, path = results[name], os.path.join(args.out, f"ref-{name}.pt")
        ref = torch.load(path) if os.path.exists(path) else None
        row = dict(row=name, wall_1gpu=None if ref is None or "error" in ref else ref["wall"],
                   wall_cp=res.get("wall"), error=res.get("error"))
        if "error" not in res:
            row.update(walls_cp=res["walls"], full_steps=res["full_steps"], ranks_agree=res["agree"])
            if ref is not None and "error" not in ref:
                row.update(rel_l2_vs_1gpu=rel_error(res["latents"], ref["latents"]),
                           max_abs_vs_1gpu=(res["latents"] - ref["latents"]).abs().max().item(),
                           decisions_equal_1gpu=res["decisions"] == ref["decisions"],
                           full_steps_1gpu=ref["full_steps"])
                if res["levels"] is not None and ref["levels"] is not None:
                    row["levels_equal_share"] = (res["levels"] == ref["levels"]).float().mean().item()
            if plain1 is not None and "error" not in plain1:
                row["rel_l2_vs_plain_1gpu"] = rel_error(res["latents"], plain1["latents"])
                row["speedup_vs_plain_1gpu"] = plain1["wall"] / res["wall"]
        table.append(row)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(model=args.model, size=args.size, steps=args.steps, repeats=args.repeats, world=world,
                       device=args.device, rows=table), f, indent=1)
    print(f"\n{args.model} {args.size}px {args.steps} steps, random weights, {world} ranks (Ulysses) vs 1 device; "
          f"best of {args.repeats}")
    print(f"{'row':<14}{'1 dev s':>9}{'CP s':>9}{'x plain1':>10}{'full':>6}{'relL2 vs 1dev':>15}{'same dec':>10}"
          f"{'ranks agree':>13}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in table:
        if r.get("error"):
            print(f"{r['row']:<14}{fmt(r['wall_1gpu'], '9.2f')}  {r['error']}")
            continue
        print(f"{r['row']:<14}{fmt(r['wall_1gpu'], '9.2f')}{fmt(r['wall_cp'], '9.2f')}"
              f"{fmt(r.get('speedup_vs_plain_1gpu'), '10.2f')}{r['full_steps']:>6}"
              f"{fmt(r.get('rel_l2_vs_1gpu'), '15.2e')}{str(r.get('decisions_equal_1gpu', '-')):>10}"
              f"{str(r['ranks_agree']):>13}"
              + (f"  levels equal {r['levels_equal_share']:.4f}" if "levels_equal_share" in r else ""))


if __name__ == "__main__":
    main()

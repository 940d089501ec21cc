"""Per-update cost of the lab's figures while a run streams: what one `RunUpdate` costs the lab at step i.

    python -m scripts.bench.figures                      # 64x64 token grid (FLUX at 1024x1024), 50 steps
    python -m scripts.bench.figures --grid 64 64 --steps 50 --method speca --repeat 5

A synthetic run appends one step at a time, as `accel`'s runtime does (SpecDiff: an importance and a level map
per partial step; SpeCa: an error map per speculative step). After each step the lab's update is timed:
snapshot of the trace (as `lab.runner.stream_run` takes one), `trace.summary()`, and the three figures the lab
redraws (`error_figure`, `timeline_figure`, `token_maps_figure`); then, separately, their `to_json()` (what
Gradio's `gr.Plot` sends to the browser). "record" is the cost of handing one step's maps to the trace.
Each step's time is the best of `--repeat` whole runs. The clock is this thread's CPU time by default (the
work itself: on a shared machine wall time also counts the waits for a core); `--clock wall` for wall time.

Self-contained on purpose (no `scripts.*` imports, no `sys.path` edits): it reads only `accel.trace` and
`visualizers`, and works with the trace API before and after maps became arrays (it feature-detects
`StepRecord.set_map`, `Trace.append` and `Trace.snapshot`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import visualizers as V
from accel.trace import ACCEPTED, FULL, PARTIAL, REJECTED, StepRecord, Trace


def _record_map(rec: StepRecord, name: str, tensor: torch.Tensor) -> None:
    if hasattr(rec, "set_map"):
        rec.set_map(name, tensor)
    else:  # the trace API before maps became arrays: nested lists
        rec.maps[name] = tensor.tolist()


def _append(trace: Trace, rec: StepRecord) -> None:
    if hasattr(trace, "append"):
        trace.append(rec)
    else:
        trace.steps.append(rec)


def _snapshot(trace: Trace) -> Trace:
    if hasattr(trace, "snapshot"):
        return trace.snapshot()
    return dataclasses.replace(trace, steps=list(trace.steps), overhead=list(trace.overhead))


def _step_record(method: str, i: int, n: int, grid: tuple[int, int], g: torch.Generator) -> tuple[StepRecord, dict]:
    """Step `i` of a synthetic run of `method` and the maps (torch tensors, as the methods hold them)."""
    n_tok = grid[0] * grid[1]
    blocks = 57  # FLUX.1-dev: 19 double + 38 single blocks
    maps: dict = {}
    if method == "specdiff":
        full = i < 3 or i % 5 == 0
        share = 0.25
        rec = StepRecord(step=i, num_steps=n, timestep=1000.0 * (1 - i / n), sigma=1 - i / n,
                         decision=FULL if full else PARTIAL, reason="warmup" if full else "",
                         time_ms=900.0 if full else 300.0, blocks_computed=blocks if full else blocks * share,
                         blocks_total=blocks, tokens_computed=n_tok if full else int(n_tok * share),
                         tokens_total=n_tok)
        level = torch.ones(grid, dtype=torch.int8) if full else (torch.randint(1, 4, grid, generator=g)
                                                                    .to(torch.int8))
        maps["level"] = level
        if not full:
            maps["importance"] = torch.rand(grid, generator=g)
    else:
        full = i < 3 or i % 7 == 0
        rejected = not full and i % 4 == 0
        err = None if full else float(torch.rand((), generator=g))
        rec = StepRecord(step=i, num_steps=n, timestep=1000.0 * (1 - i / n), sigma=1 - i / n,
                         decision=FULL if full else (REJECTED if rejected else ACCEPTED),
                         reason="warmup" if full else "verified", error=err, errors=None if err is None else [err],
                         threshold=0.3 * 0.5 ** (i / n), time_ms=900.0 if full else 120.0,
                         blocks_computed=blocks if full else 1.0, blocks_total=blocks)
        if not full:
            maps["error"] = torch.rand(grid, generator=g)
    return rec, maps


def run_once(method: str, n: int, grid: tuple[int, int], seed: int = 0,
             clock=time.thread_time) -> dict[str, list[float]]:
    """One streamed run; per step, milliseconds of: record, update (snapshot + summary + 3 figures), to_json."""
    g = torch.Generator().manual_seed(seed)
    trace = Trace(method=method, config={}, model="Synthetic", num_steps=n, token_grid=list(grid))
    out: dict[str, list[float]] = {"record": [], "update": [], "to_json": []}
    for i in range(n):
        rec, maps = _step_record(method, i, n, grid, g)
        t0 = clock()
        for name, tensor in maps.items():
            _record_map(rec, name, tensor)
        t1 = clock()
        _append(trace, rec)
        t2 = clock()
        snap = _snapshot(trace)
        snap.summary()
        figs = (V.error_figure(snap), V.timeline_figure(snap), V.token_maps_figure(snap))
        t3 = clock()
        for f in figs:
            f.to_json()
        t4 = clock()
        out["record"].append((t1 - t0) * 1e3)
        out["update"].append((t3 - t2) * 1e3)
        out["to_json"].append((t4 - t3) * 1e3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--grid", type=int, nargs=2, default=(64, 64), metavar=("H", "W"),
                    help="token grid (64 64 = FLUX at 1024x1024)")
    ap.add_argument("--method", choices=("specdiff", "speca", "both"), default="both")
    ap.add_argument("--repeat", type=int, default=3, help="whole runs; each step's time is the best of them")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (default); wall: elapsed time")
    args = ap.parse_args(argv)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    grid = tuple(args.grid)
    V.token_maps_figure(Trace(method="warm", config={}))  # imports and plotly's first-figure setup, untimed
    methods = ("specdiff", "speca") if args.method == "both" else (args.method,)
    print(f"token grid {grid[0]}x{grid[1]}, {args.steps} steps, best of {args.repeat} runs; "
          f"ms per update ({args.clock} time)")
    print(f"{'method':<9} {'what':<8} {'step 1':>8} {'step 10':>8} {'step 25':>8} {'last':>8} {'mean':>8} {'max':>8}")
    for method in methods:
        runs = [run_once(method, args.steps, grid, seed=r, clock=clock) for r in range(args.repeat)]
        for what in ("record", "update", "to_json"):
            best = [min(r[what][i] for r in runs) for i in range(args.steps)]
            at = [best[min(k, args.steps) - 1] for k in (1, 10, 25, args.steps)]
            print(f"{method:<9} {what:<8} " + " ".join(f"{v:8.2f}" for v in at)
                  + f" {statistics.fmean(best):8.2f} {max(best):8.2f}")


if __name__ == "__main__":
    main()

"""Target-speedup mode: find the value of a config's speed knob whose ideal speedup matches a target.

Every method config names its speed knob (`SPEED_KNOB`, e.g. SpeCa's `threshold`, SpecDiff's `cache_rate`,
TaylorSeer's `cache_interval`): a larger value skips more work. `calibrate` runs the pipeline on the given
prompt(s) at values chosen by bisection over the knob's range and stops when the ideal speedup (block
computations of a plain run / this run's, counted, not timed) is within `tolerance` of the target.

    cal = accel.calibrate(pipe, accel.SpeCaConfig(), 2.0, prompt="a red circle", num_inference_steps=28)
    cal.config.threshold, cal.speedup, cal.traces

The ideal speedup of a run is a ratio of whole block counts, so not every target is reachable exactly: the
result is the tried value closest to the target. It is monotone in the knob on average, not for every prompt;
bisection assumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .api import apply
from .config import Knob, knobs
from .trace import Trace


def speed_knob(config) -> Knob:
    """The `Knob` of a config's speed knob (class attribute `SPEED_KNOB`)."""
    name = getattr(config, "SPEED_KNOB", None)
    if name is None:
        raise ValueError(f"{type(config).__name__ if not isinstance(config, type) else config.__name__} has no "
                         "speed knob (SPEED_KNOB): nothing to calibrate")
    return next(k for k in knobs(config) if k.name == name)


@dataclass
class Calibration:
    config: object
    """The config with the chosen speed-knob value."""
    speedup: float
    """Its ideal speedup over every call (sum of plain block computations / sum of those done)."""
    traces: list[Trace]
    """The traces of the chosen value's calls, one per prompt."""
    tried: list[tuple[float, float]] = field(default_factory=list)
    """(knob value, ideal speedup) in the order tried."""


def ideal_speedup(pipe, config, calls: list[dict]) -> tuple[float, list[Trace]]:
    """Run `pipe` once per call kwargs under `config`; the pooled ideal speedup and the traces."""
    handle = apply(pipe, config)
    try:
        for kw in calls:
            pipe(**kw)
        traces = list(handle.traces)
    finally:
        handle.remove()
    plain = sum(t.summary()["blocks_plain"] for t in traces)
    done = sum(t.summary()["blocks_computed"] for t in traces)
    return (plain / done if done else float("inf")), traces


def _calls(prompts, seed: int, call_kwargs: dict) -> list[dict]:
    """One call's kwargs per prompt, each with a fresh generator of `seed` (every candidate sees the same noise)."""
    if "generator" in call_kwargs:
        g = call_kwargs.pop("generator")
        seed = g.initial_seed() if isinstance(g, torch.Generator) else seed
    base = [dict(call_kwargs)] if prompts is None else [dict(call_kwargs, prompt=p) for p in prompts]
    for kw in base:
        kw["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    return base


def calibrate(pipe, config, target_speedup: float, *, prompts: list[str] | None = None, low=None, high=None,
              tolerance: float = 0.05, max_iter: int = 10, seed: int = 0, **call_kwargs) -> Calibration:
    """The config (a copy of `config` with its speed knob set) whose ideal speedup on `prompts` (or the one call
    `call_kwargs` describes) is closest to `target_speedup`, found by bisection over [`low`, `high`] (default:
    the knob's UI range). Stops once within `tolerance` (relative) of the target or after `max_iter` runs
    between the ends. Integer knobs are bisected over integers."""
    if not isinstance(target_speedup, (int, float)) or not target_speedup >= 1:
        raise ValueError(f"target_speedup={target_speedup!r} is out of range: target_speedup must be >= 1")
    k = speed_knob(config)
    lo, hi = (k.ui_range or (k.minimum, k.maximum))
    lo, hi = (lo if low is None else low), (hi if high is None else high)
    if lo is None or hi is None or not lo < hi:
        raise ValueError(f"calibrate needs a range low < high for {k.name}, got {lo}..{hi}")
    integer = k.kind == "int"
    if integer:
        lo, hi = int(lo), int(hi)
    calls = _calls(prompts, seed, dict(call_kwargs))
    results: dict[float, tuple[float, list[Trace]]] = {}
    tried: list[tuple[float, float]] = []

    def at(v):
        if v not in results:
            results[v] = ideal_speedup(pipe, replace(config, **{k.name: v}), calls)
            tried.append((v, results[v][0]))
        return results[v][0]

    def close(s):
        return abs(s - target_speedup) <= tolerance * target_speedup

    if at(lo) < target_speedup and not close(at(lo)) and at(hi) > target_speedup and not close(at(hi)):
        for _ in range(max_iter):
            if integer and hi - lo <= 1:
                break
            mid = (lo + hi) // 2 if integer else (lo + hi) / 2
            s = at(mid)
            if close(s):
                break
            if s < target_speedup:
                lo = mid
            else:
                hi = mid
    best = min(results, key=lambda v: (abs(results[v][0] - target_speedup), v))
    return Calibration(replace(config, **{k.name: best}), results[best][0], results[best][1], tried)

"""SpeCa's verification against fixed schedules and the peers: PSNR vs compute on the bundled trained tiny models.

    HF_HUB_OFFLINE=1 python -m scripts.bench.pareto_speca --quick                    # CPU smoke: 4 prompts, few points
    HF_HUB_OFFLINE=1 python -m scripts.bench.pareto_speca --device cuda --workers 6 \\
        --json $OUT/pareto.json                                                       # the full run (GPU, one call)
    python -m scripts.bench.pareto_speca --plot docs/speca-pareto.png --from-json docs/speca-pareto.json
    python -m scripts.bench.pareto_speca --from-json a.json,b.json   # several runs merged (e.g. a companion run)

For each model (the bundled tiny FLUX, 16 prompts, 28 steps, 128²; the bundled tiny HunyuanVideo, 16 prompts,
30 steps, 64² x 9 frames) and each setting, over the prompts (prompt i with seed i, one prompt per call, so that
SpeCa's adaptive decisions are per sample; `--batch` puts several prompts in one call):
- ideal speedup: blocks a plain run computes / blocks this run computed, verification included (SpeCa's verify
  block, cache-dit's first block of each block list), from the trace (accel methods) or counted block calls
  (cache-dit);
- `ideal_full_size`: the same schedule costed for the full-size model of the family (a block 1/57 of a FLUX.1-dev
  step, 1/60 of a HunyuanVideo step, instead of 1/7 and 1/5 here);
- measured speedup: wall time of the plain denoising loops / this setting's (host-bound on a GPU at this size);
- PSNR of every decoded image (video: every frame) against the plain run of the same prompt and seed; mean, worst.

Curves (each a set of points; `--curves` picks some by name prefix):
- `fixed o1` / `fixed o2` / `fixed output o1`: SpeCa (library forecast; `output`: forecast="output") replaying every:N (3 warm-up full steps, then a full step every N),
  N = 2..8, 10, 12; verification runs (and is counted) but decides nothing;
- `adaptive <remedy> o<k>`: SpeCa's verification deciding, over a threshold sweep. Thresholds are calibrated per
  model and remedy: quantiles of the judged errors (divided by the decay factor) of an every:9 replay of the same
  config over the first 4 prompts. Remedies are config fields on top of the library defaults (`REMEDIES`);
- `lite o1` / `lite o2`: diffusers' TaylorSeerCache in lite mode (via `accel.TaylorSeerConfig`, float32 factors);
- `cache-dit o1` / `o2`: cache-dit DBCache F1B0 + TaylorSeer at the every:N masks (static policy), if cache-dit is
  installed (a benchmark-only extra; skipped otherwise).
At the end, each curve's upper envelope is interpolated at ideal 1.8x, 2.2x, 2.6x and 3.0x (PSNR mean, and worst
along the same envelope); outside a curve's range: "-".
`--workers N` runs settings in N processes (each loads the models and its own plain run; measured speedups are then
taken under contention, their ratio within a worker still compares like with like).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

TARGETS = (1.8, 2.2, 2.6, 3.0)
INTERVALS = (2, 3, 4, 5, 6, 7, 8, 10, 12)
QUICK_INTERVALS = (3, 5, 8)
QUANTILES = (0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95)
QUICK_QUANTILES = (0.1, 0.5, 0.9)
CALIBRATION_INTERVAL = 9
CALIBRATION_PROMPTS = 4

REMEDIES = {
    # name: SpeCaConfig fields on top of the library defaults (the verification's signal and schedule)
    "rel_l1": dict(metric="rel_l1"),
    "rel_l2": dict(metric="rel_l2"),
    "rel_l1 sigma": dict(metric="rel_l1", distance="sigma"),
    "rel_l2 first block": dict(metric="rel_l2", verify_block=0),
    "rel_l2 decay 1": dict(metric="rel_l2", decay=1.0),
    "rel_l1 output": dict(metric="rel_l1", forecast="output"),
    "rel_l2 output": dict(metric="rel_l2", forecast="output"),
}
DEFAULT_CURVES = ("fixed o1", "fixed o2", "fixed output o1", "adaptive rel_l1 o1", "adaptive rel_l1 output o1",
                  "adaptive rel_l2 output o1", "adaptive rel_l1 o2", "adaptive rel_l2 o1",
                  "adaptive rel_l2 o2", "adaptive rel_l1 sigma o2", "adaptive rel_l2 first block o1",
                  "adaptive rel_l2 decay 1 o1", "lite o1", "lite o2", "cache-dit o1", "cache-dit o2")
QUICK_CURVES = ("fixed o1", "adaptive rel_l1 o1", "adaptive rel_l2 o1", "lite o1", "cache-dit o1")


@dataclass
class Setting:
    model: str
    curve: str
    label: str
    method: str  # "speca", "lite", "cachedit", "calibrate"
    params: dict = field(default_factory=dict)
    batch: int = 1
    prompts: int | None = None  # None: all


def every(n_steps: int, interval: int, warmup: int = 3) -> list[bool]:
    from scripts.bench.utils import fixed_schedule

    return fixed_schedule(n_steps, interval, warmup)


def fixed_settings(model: str, curves, steps: int, intervals) -> list[Setting]:
    out = []
    for curve in curves:
        kind, _, order = curve.rpartition(" o")
        if kind.startswith("fixed"):  # "fixed o1", or "fixed <forecast> o1"
            fc = dict(forecast=kind.split()[1]) if " " in kind else {}
            out += [Setting(model, curve, f"every:{n}", "speca", dict(schedule=every(steps, n), order=int(order), **fc))
                    for n in intervals]
        elif kind == "lite":
            out += [Setting(model, curve, f"interval {n}", "lite", dict(cache_interval=n, max_order=int(order)))
                    for n in intervals]
        elif kind == "cache-dit":
            out += [Setting(model, curve, f"every:{n}", "cachedit", dict(schedule=every(steps, n), order=int(order)))
                    for n in intervals]
    return out


def adaptive_fields(curve: str) -> dict | None:
    """SpeCaConfig fields of an adaptive curve "adaptive <remedy> o<k>" (None if not adaptive)."""
    if not curve.startswith("adaptive "):
        return None
    body, _, order = curve[len("adaptive "):].rpartition(" o")
    batch = 1
    if body.endswith(" batch 8"):
        body, batch = body[: -len(" batch 8")], 8
    if body not in REMEDIES:
        raise SystemExit(f"unknown remedy {body!r} in curve {curve!r}: known {sorted(REMEDIES)}")
    return dict(REMEDIES[body], order=int(order), _batch=batch)


# ---- one setting, in a worker -------------------------------------------------------------------------
_MODELS: dict = {}
_OPTIONS: dict = {}


def _init(options: dict) -> None:
    _OPTIONS.update(options)
    torch.set_num_threads(options.get("threads") or torch.get_num_threads())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _model(name: str):
    """(TinyModel, plain decoded outputs, plain walls), loaded once per process."""
    if name not in _MODELS:
        from scripts.bench.tiny_models import TinyModel

        m = TinyModel.load(name, _OPTIONS["device"], _OPTIONS["prompts"], _OPTIONS["steps"].get(name))
        m.run(0)  # warm-up (allocator, kernels)
        outs, walls = [], []
        for i in range(len(m.prompts)):
            lat, wall = m.run(i)
            outs.append(m.decode(lat))
            walls.append(wall)
        _MODELS[name] = (m, outs, walls)
    return _MODELS[name]


class _CacheDit:
    def __init__(self, pipe, schedule, order):
        import cache_dit

        self.pipe = pipe
        cache_dit.enable_cache(
            pipe, cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=3, max_cached_steps=-1,
                max_continuous_cached_steps=-1, residual_diff_threshold=1e9, num_inference_steps=len(schedule),
                steps_computation_mask=[int(f) for f in schedule], steps_computation_policy="static"),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order))

        # blocks it computes, counted per transformer call: on the tiny HunyuanVideo, F1B0 computes the first block
        # of each of the two block lists (2 of 5 on a cached step), on the tiny FLUX one of 7
        t = pipe.transformer
        self.blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
        self.steps: list[int] = []  # blocks computed by each transformer call, over every prompt
        self._hooks = [t.register_forward_pre_hook(lambda *_: self.steps.append(0))]
        self._hooks += [b.register_forward_pre_hook(self._count) for b in self.blocks]

    def _count(self, *_):
        self.steps[-1] += 1

    def remove(self):
        import cache_dit

        for h in self._hooks:
            h.remove()
        cache_dit.disable_cache(self.pipe)


def _step_costs(trace, n_blocks: int, full_size_blocks: int) -> tuple[float, float]:
    """(steps of a plain run, cost of this run in full-size steps): a step that computed b blocks costs
    floor(b / n) full steps plus its remaining blocks at the full-size model's block cost."""
    cost = 0.0
    for r in trace.steps:
        full, rest = divmod(round(r.blocks_computed, 6), n_blocks)
        cost += full + rest / full_size_blocks
    return len(trace.steps), cost


def run_setting(s: Setting) -> dict:
    """Run one setting over the model's prompts; its numbers (PSNR list, ideal speedups, walls, per-step errors
    for a calibration)."""
    import accel
    from scripts.bench.tiny_models import FULL_SIZE_BLOCKS
    from scripts.bench.utils import psnr

    m, plain, plain_walls = _model(s.model)
    n = len(m.prompts) if s.prompts is None else min(s.prompts, len(m.prompts))
    steps = m.call["num_inference_steps"]
    big = FULL_SIZE_BLOCKS[s.model]
    handle, cachedit = None, None
    params = dict(s.params)
    if s.method in ("speca", "calibrate"):
        handle = accel.apply(m.pipe, accel.SpeCaConfig(**params, record_maps=False, sync_timing=False))
    elif s.method == "lite":
        handle = accel.apply(m.pipe, accel.TaylorSeerConfig(**params, use_lite_mode=True,
                                                            taylor_factors_dtype="float32", sync_timing=False))
    elif s.method == "cachedit":
        cachedit = _CacheDit(m.pipe, params["schedule"], params["order"])
    outs, walls = [], []
    try:
        i = 0
        while i < n:
            idx = list(range(i, min(n, i + s.batch)))
            if len(idx) == 1:
                lat, wall = m.run(idx[0])
                lats = [lat]
            else:
                lats, wall = _run_batch(m, idx)
            walls.append(wall)
            outs += [m.decode(x) for x in lats]
            i += len(idx)
    finally:
        if handle is not None:
            handle.remove()
        if cachedit is not None:
            cachedit.remove()
    res = dict(asdict(s), psnr=[psnr(o, p, 1.0) for o, p in zip(outs, plain[:n])], wall=sum(walls),
               plain_wall=sum(plain_walls[:n]))
    res["params"].pop("schedule", None)
    if handle is not None:
        traces = handle.traces
        plain_blocks = sum(t.summary()["blocks_plain"] for t in traces)
        done = sum(t.summary()["blocks_computed"] for t in traces)
        costs = [_step_costs(t, m.n_blocks, big) for t in traces]
        res["ideal"] = plain_blocks / done
        res["ideal_full_size"] = sum(c[0] for c in costs) / sum(c[1] for c in costs)
        res["full_steps"] = float(np.mean([t.summary()["full_steps"] for t in traces]))
        res["rejected_steps"] = float(np.mean([t.summary()["rejected_steps"] for t in traces]))
        if s.method == "calibrate":
            cfg = accel.SpeCaConfig(**params)
            res["errors"] = [r.error / (cfg.threshold_at(r.step, r.num_steps) / cfg.threshold)
                             for t in traces for r in t.steps if r.error is not None
                             and _spec_run_length(t, r.step) > cfg.min_spec_steps]
    else:
        if cachedit is not None:  # from the counted block calls; each cached step costs its blocks at full size
            counts = cachedit.steps
            if len(counts) != n * steps:
                raise RuntimeError(f"cache-dit: {len(counts)} transformer calls for {n} prompts x {steps} steps")
            nb = len(cachedit.blocks)
            res["ideal"] = len(counts) * nb / sum(counts)
            res["ideal_full_size"] = len(counts) / sum(1.0 if c >= nb else c / big for c in counts)
            res["full_steps"] = sum(c >= nb for c in counts) / n
            res["blocks_per_cached_step"] = sorted({c for c in counts if c < nb})
            if res["full_steps"] != sum(params["schedule"]):
                raise RuntimeError(f"cache-dit ran {res['full_steps']} full steps, the mask has {sum(params['schedule'])}")
    res["measured"] = res["plain_wall"] / res["wall"]
    return res


def _spec_run_length(trace, step: int) -> int:
    """Speculative steps since the last full step, up to and including `step`."""
    k = 0
    for r in trace.steps[: step + 1][::-1]:
        if r.decision == "full":
            break
        k += 1
    return k


def _run_batch(m, idx):
    """Several prompts in one call (SpeCa's decisions are then shared by the batch): (latents list, wall)."""
    from scripts.bench.utils import sync

    embeds = {k: torch.cat([m.embeds[i][k] for i in idx]) for k in m.embeds[0]}
    gens = [torch.Generator("cpu").manual_seed(i) for i in idx]
    sync(m.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = m.pipe(**embeds, **m.call, generator=gens, output_type="latent", return_dict=False)[0]
    sync(m.device)
    return [out[j:j + 1] for j in range(len(idx))], time.perf_counter() - t0


# ---- curves -------------------------------------------------------------------------------------------
def envelope(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The upper-right envelope of (ideal, psnr mean, psnr worst) points: those that no other point beats in
    both speed and mean PSNR, ascending in speed."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    out, best = [], -math.inf
    for p in reversed(pts):
        if p[1] > best:
            out.append(p)
            best = p[1]
    return out[::-1]


def at_speedup(points, x: float) -> tuple[float, float] | None:
    """(PSNR mean, worst) of a curve's envelope, linearly interpolated at ideal speedup x; None outside it."""
    env = envelope(points)
    if not env or x < env[0][0] - 1e-9 or x > env[-1][0] + 1e-9:
        return None
    for a, b in zip(env, env[1:] + [env[-1]]):
        if a[0] - 1e-9 <= x <= b[0] + 1e-9:
            if b[0] - a[0] < 1e-9:
                return a[1], a[2]
            w = (x - a[0]) / (b[0] - a[0])
            return a[1] + w * (b[1] - a[1]), a[2] + w * (b[2] - a[2])
    return None


def curve_points(results: list[dict], model: str, key: str = "ideal") -> dict[str, list]:
    out: dict[str, list] = {}
    for r in results:
        if r["model"] == model and r["method"] != "calibrate" and r.get(key):
            v = np.asarray(r["psnr"], dtype=float)
            v = np.minimum(v, 100.0)  # identical images: inf dB, capped for the means
            out.setdefault(r["curve"], []).append((r[key], float(v.mean()), float(v.min())))
    return out


def table(results: list[dict], key: str = "ideal") -> str:
    lines = []
    for model in sorted({r["model"] for r in results}):
        curves = curve_points(results, model, key)
        head = f"{model} ({key}), PSNR mean / worst (dB) at equal compute"
        lines.append(head)
        lines.append(f"{'curve':34s} " + " ".join(f"{f'{x:.1f}x':>13s}" for x in TARGETS))
        for name, pts in curves.items():
            cells = []
            for x in TARGETS:
                v = at_speedup(pts, x)
                cells.append(f"{v[0]:6.2f}/{v[1]:6.2f}" if v else f"{'-':>13s}")
            lines.append(f"{name:34s} " + " ".join(cells))
        lines.append("")
    return "\n".join(lines)


# ---- plot (PIL only) ------------------------------------------------------------------------------------
COLORS = {"fixed o1": (31, 119, 180), "fixed o2": (120, 170, 220), "lite o1": (44, 160, 44),
          "lite o2": (150, 210, 140), "cache-dit o1": (148, 103, 189), "cache-dit o2": (200, 170, 225)}
ADAPTIVE_COLORS = [(214, 39, 40), (255, 127, 14), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
                   (90, 90, 90), (250, 180, 120)]


def plot(results: list[dict], path: str, key: str = "ideal") -> None:
    from PIL import Image, ImageDraw

    models = sorted({r["model"] for r in results})
    names = []
    for r in results:
        if r["method"] != "calibrate" and r["curve"] not in names:
            names.append(r["curve"])
    color = {}
    k = 0
    for n in names:
        if n in COLORS:
            color[n] = COLORS[n]
        else:
            color[n] = ADAPTIVE_COLORS[k % len(ADAPTIVE_COLORS)]
            k += 1
    W, H, L, R, T, B = 430, 330, 48, 12, 26, 40
    legend_h = 14 * ((len(names) + 2) // 3) + 8
    img = Image.new("RGB", (W * len(models), H + legend_h), "white")
    d = ImageDraw.Draw(img)
    for mi, model in enumerate(models):
        curves = curve_points(results, model, key)
        pts = [p for c in curves.values() for p in c]
        x0, x1 = 1.4, 3.4
        ys = [p[1] for p in pts if x0 <= p[0] <= x1] or [30, 60]
        y0, y1 = math.floor(min(ys) / 5) * 5, math.ceil(max(ys) / 5) * 5
        ox = mi * W

        def px(x, y):
            return (ox + L + (x - x0) / (x1 - x0) * (W - L - R), T + (y1 - y) / max(1e-9, y1 - y0) * (H - T - B))

        d.rectangle([px(x0, y1), px(x1, y0)], outline=(0, 0, 0))
        for x in np.arange(1.5, x1 + 1e-9, 0.5):
            a = px(x, y0)
            d.line([a, (a[0], a[1] + 4)], fill=(0, 0, 0))
            d.text((a[0] - 8, a[1] + 6), f"{x:.1f}", fill=(0, 0, 0))
        for y in range(int(y0), int(y1) + 1, 5):
            a = px(x0, y)
            d.line([(a[0] - 4, a[1]), a], fill=(0, 0, 0))
            d.text((a[0] - 24, a[1] - 6), f"{y}", fill=(0, 0, 0))
        for x in TARGETS:
            d.line([px(x, y0), px(x, y1)], fill=(225, 225, 225))
        d.text((ox + L, 6), f"tiny {'FLUX' if model == 'flux' else 'HunyuanVideo'}: PSNR mean (dB) vs "
               f"{'ideal speedup' if key == 'ideal' else 'ideal at full size'}", fill=(0, 0, 0))
        for name, cpts in curves.items():
            c = color[name]
            cpts = sorted(q for q in cpts if x0 <= q[0] <= x1)
            xy = [px(q[0], max(y0, min(y1, q[1]))) for q in cpts]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2 if name.startswith(("fixed", "adaptive")) else 1)
            for p in xy:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
    for i, n in enumerate(names):
        x, y = 8 + (i % 3) * (W * len(models) // 3), H + 4 + 14 * (i // 3)
        d.line([(x, y + 6), (x + 16, y + 6)], fill=color[n], width=3)
        d.text((x + 20, y), n, fill=(0, 0, 0))
    img = img.convert("P", palette=Image.ADAPTIVE, colors=64)
    img.save(path, optimize=True)


# ---- driver -------------------------------------------------------------------------------------------
def _map(fn, tasks, workers: int, options: dict):
    if workers <= 1:
        _init(options)
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(options,)) as ex:
        futures = [ex.submit(fn, t) for t in tasks]
        for f in as_completed(futures):
            yield f.result()


def _log(r: dict) -> None:
    v = np.minimum(np.asarray(r["psnr"]), 100.0)
    print(f"{r['model']:5s} {r['curve']:30s} {r['label']:16s} ideal {r.get('ideal', float('nan')):5.2f} "
          f"full-size {r.get('ideal_full_size', float('nan')):5.2f} meas {r['measured']:5.2f} "
          f"PSNR {v.mean():6.2f} / {v.min():6.2f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.pareto_speca", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="flux,video")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--flux-steps", type=int, default=28)
    ap.add_argument("--video-steps", type=int, default=30)
    ap.add_argument("--curves", default=None, help="comma list of curve names (default: all; --quick: a few)")
    ap.add_argument("--intervals", default=None, help="comma list of N for every:N (default 2..8,10,12)")
    ap.add_argument("--quantiles", default=None, help="comma list of threshold quantiles for adaptive curves")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 4 prompts, few curves and points")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write the PNG plot here")
    ap.add_argument("--from-json", default=None,
                    help="only tabulate / plot earlier --json files (comma list: merged, a later file's setting "
                         "replacing an earlier one's)")
    args = ap.parse_args(argv)

    if args.from_json:
        results = load_results(args.from_json.split(","))
    else:
        results = sweep(args)
    print()
    print(table(results, "ideal"))
    print(table(results, "ideal_full_size"))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot} ({os.path.getsize(args.plot) // 1024} KiB)")


def load_results(paths) -> list[dict]:
    """The results of several --json files, merged: a setting (model, curve, label) in a later file replaces the
    earlier one's; the order of first appearance is kept (curves in the table and plot)."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                merged[(r["model"], r["curve"], r["label"])] = r
    return list(merged.values())


def sweep(args) -> list[dict]:
    try:
        import cache_dit  # noqa: F401

        have_cachedit = True
    except Exception:  # noqa: BLE001
        have_cachedit = False
    prompts = 4 if args.quick and args.prompts == 16 else args.prompts
    curves = args.curves.split(",") if args.curves else list(QUICK_CURVES if args.quick else DEFAULT_CURVES)
    if not have_cachedit:
        skipped = [c for c in curves if c.startswith("cache-dit")]
        curves = [c for c in curves if not c.startswith("cache-dit")]
        if skipped:
            print(f"cache-dit is not installed: skipping {skipped}")
    intervals = (tuple(int(x) for x in args.intervals.split(",")) if args.intervals
                 else QUICK_INTERVALS if args.quick else INTERVALS)
    quantiles = (tuple(float(x) for x in args.quantiles.split(",")) if args.quantiles
                 else QUICK_QUANTILES if args.quick else QUANTILES)
    models = args.models.split(",")
    steps = dict(flux=args.flux_steps, video=args.video_steps)
    options = dict(device=args.device, prompts=prompts, steps=steps, threads=args.threads)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {dev}, torch {torch.__version__}, models {models}, {prompts} prompts, steps {steps}, "
          f"curves {curves}, workers {args.workers}", flush=True)
    t0 = time.perf_counter()

    # calibrations of the adaptive curves first (their thresholds), then every setting
    calib = []
    for model in models:
        for curve in curves:
            f = adaptive_fields(curve)
            if f is not None:
                f.pop("_batch")
                calib.append(Setting(model, curve, "calibration", "calibrate",
                                     dict(f, schedule=every(steps[model], CALIBRATION_INTERVAL)),
                                     prompts=CALIBRATION_PROMPTS))
    thresholds = {}
    for r in _map(run_setting, calib, args.workers, options):
        errs = np.asarray(r["errors"])
        thresholds[(r["model"], r["curve"])] = sorted({float(f"{np.quantile(errs, q):.4g}") for q in quantiles})
    tasks = []
    for model in models:
        tasks += fixed_settings(model, curves, steps[model], intervals)
        for curve in curves:
            f = adaptive_fields(curve)
            if f is not None:
                batch = f.pop("_batch")
                tasks += [Setting(model, curve, f"threshold {t:g}", "speca", dict(f, threshold=t), batch=batch)
                          for t in thresholds[(model, curve)]]
    print(f"{len(calib)} calibrations, {len(tasks)} settings ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = []
    for r in _map(run_setting, tasks, args.workers, options):
        _log(r)
        results.append(r)
        if args.json:  # written as it goes: a run cut short keeps what it finished
            _write(args, results, thresholds, dev, time.perf_counter() - t0)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return results


def _write(args, results, thresholds, dev, seconds):
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), device=dev, torch=torch.__version__, seconds=round(seconds, 1),
                       thresholds={f"{m}/{c}": t for (m, c), t in thresholds.items()}, results=results), f)


if __name__ == "__main__":
    main()

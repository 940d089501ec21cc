"""SpecDiff against its peers on the bundled (trained) tiny models: speed and fidelity over many prompts, and
where SpecDiff's error comes from.

    python -m scripts.bench.specdiff_fidelity --family flux -n 16            # assets/models/tiny-flux, 128², 28 steps
    python -m scripts.bench.specdiff_fidelity --family video -n 16           # assets/models/tiny-hunyuanvideo, 20 steps
    python -m scripts.bench.specdiff_fidelity --family flux -n 4 --why       # per-level error analysis only
    python -m scripts.bench.specdiff_fidelity --family flux -n 8 --refresh   # periodic full refreshes
    python -m scripts.bench.specdiff_fidelity --family flux -n 16 --text-tokens compute,cache  # text on partial steps

Prompts are drawn from the tiny models' caption grammar (held-out scenes, `--seed`), encoded once; each method
runs every prompt with the same generator seed as the plain run. Methods are interleaved prompt by prompt, so
that the load of a shared CPU drifts over all of them alike. Per method: ideal speedup (the traces' block
count, SpecDiff's pre-run included; diffusers' TaylorSeerCache counted by its traced twin), measured speedup
(sum of wall times of the pipeline calls, latents out, against the plain run's) and the PSNR of the decoded
images / videos in [0, 1] against the plain run (mean and worst over prompts).

`--why` runs SpecDiff and diffusers' TaylorSeerCache lite with a hook that records every transformer call's
inputs and output, then recomputes each call without any cache on the SAME inputs (teacher forcing): the
relative L2 error of the output the method returned, per step, and for SpecDiff per token level (C1 computed
with cached K/V of the others, C2 last value, C3 estimate) with each level's share of the squared error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import accel  # noqa: E402
from scripts.bench.utils import psnr  # noqa: E402

FLUX_DIR = "assets/models/tiny-flux"
VIDEO_DIR = "assets/models/tiny-hunyuanvideo"


class Family:
    """Loads one tiny pipeline, encodes prompts, runs a call (latents out) and decodes it."""

    def __init__(self, name: str, steps: int | None):
        self.name = name
        if name == "flux":
            from diffusers import FluxPipeline

            from scripts.tiny_flux import data

            self.pipe = FluxPipeline.from_pretrained(FLUX_DIR)
            self.call = dict(height=128, width=128, num_inference_steps=steps or 28)
            self.prompts = lambda n, seed: data.captions(data.sample_scenes(n, seed))
        else:
            from diffusers import HunyuanVideoPipeline

            from scripts.tiny_video import data
            from scripts.tiny_video.train import DEFAULT_CALL

            self.pipe = HunyuanVideoPipeline.from_pretrained(VIDEO_DIR)
            self.template = DEFAULT_CALL["prompt_template"]
            self.call = dict(height=DEFAULT_CALL["height"], width=DEFAULT_CALL["width"],
                             num_frames=DEFAULT_CALL["num_frames"], num_inference_steps=steps or 20)
            self.max_seq = DEFAULT_CALL["max_sequence_length"]
            self.prompts = lambda n, seed: data.captions(data.sample_clips(n, seed))
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def encode(self, prompt: str) -> dict:
        p = self.pipe
        if self.name == "flux":
            pe, pooled, _ = p.encode_prompt(prompt, prompt_2=None, max_sequence_length=32)
            return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
        pe, pooled, mask = p.encode_prompt(prompt, prompt_template=self.template, max_sequence_length=self.max_seq)
        return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)

    @torch.no_grad()
    def run(self, emb: dict, seed: int):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = self.pipe(**emb, **self.call, generator=g, output_type="latent")
        wall = time.perf_counter() - t0
        return (out.images if self.name == "flux" else out.frames), wall

    @torch.no_grad()
    def decode(self, latents) -> torch.Tensor:
        p = self.pipe
        if self.name == "flux":
            size = self.call["height"]
            lat = p._unpack_latents(latents, size, size, p.vae_scale_factor)
            lat = lat / p.vae.config.scaling_factor + p.vae.config.shift_factor
        else:
            lat = latents / p.vae.config.scaling_factor
        img = p.vae.decode(lat.to(p.vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


def methods(family: str, strides: bool, refresh: bool = False, text_tokens: tuple[str, ...] = ()
            ) -> list[tuple[str, object]]:
    """(label, config or ("taylorseer", lite, interval)) in run order."""
    if text_tokens:  # SpecDiff's text tokens on partial steps computed or cached, C3 history (the default)
        return [(f"specdiff {rate:.2f} text {tt}", accel.SpecDiffConfig(cache_rate=rate, text_tokens=tt))
                for rate in (0.85, 0.95) for tt in text_tokens]
    if refresh:  # periodic full refreshes (RAS), each C3 mode, against TaylorSeer lite at a similar ideal speedup
        out = [(f"specdiff {rate:.2f} {c3} refresh/4", accel.SpecDiffConfig(cache_rate=rate, c3_mode=c3, refresh_every=4))
               for rate in (0.85, 0.95) for c3 in ("history", "taylor")]
        return out + [("TaylorSeer N3O1 lite", ("taylorseer", True, 3)), ("TaylorSeer N5O1 lite", ("taylorseer", True, 5))]
    out = []
    for rate in (0.85, 0.95):
        for c3 in ("history", "taylor"):
            out.append((f"specdiff {rate:.2f} {c3}", accel.SpecDiffConfig(cache_rate=rate, c3_mode=c3)))
    if strides and family == "flux":
        for st in (2, 4):
            out.append((f"specdiff 0.85 history q/{st}", accel.SpecDiffConfig(cache_rate=0.85, score_query_stride=st)))
        out.append(("specdiff 0.85 history score/1", accel.SpecDiffConfig(cache_rate=0.85, score_every=1)))
    out.append(("speca (defaults)", accel.SpeCaConfig()))
    out.append(("TaylorSeer N5O1 lite", ("taylorseer", True, 5)))
    return out


def run_method(fam: Family, cfg, emb, seed):
    """(latents, wall, trace or None)."""
    if isinstance(cfg, tuple):
        from diffusers import TaylorSeerCacheConfig

        fam.pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=cfg[2], max_order=1,
                                                                use_lite_mode=cfg[1]))
        try:
            lat, wall = fam.run(emb, seed)
        finally:
            fam.pipe.transformer.disable_cache()
        return lat, wall, None
    with accel.apply(fam.pipe, cfg) as h:
        lat, wall = fam.run(emb, seed)
        return lat, wall, h.trace


def compare(args, fam: Family) -> dict:
    prompts = fam.prompts(args.n, args.seed)
    meths = methods(fam.name, args.strides, args.refresh, tuple(t for t in args.text_tokens.split(",") if t))
    stats = {label: dict(walls=[], psnr=[], ideal=None) for label, _ in [("full", None)] + meths}
    for i, prompt in enumerate(prompts):
        emb = fam.encode(prompt)
        seed = args.seed + i
        if i == 0:
            fam.run(emb, seed)  # warm-up
        base, wall = fam.run(emb, seed)
        ref = fam.decode(base)
        stats["full"]["walls"].append(wall)
        for label, cfg in meths:
            lat, wall, trace = run_method(fam, cfg, emb, seed)
            st = stats[label]
            st["walls"].append(wall)
            st["psnr"].append(psnr(fam.decode(lat), ref, 1.0))
            if trace is not None:
                st["ideal"] = trace.summary()["ideal_speedup"]
        print(f"prompt {i + 1}/{len(prompts)}: {prompt}", flush=True)
    # diffusers' TaylorSeerCache: the ideal from its traced twin (counts real Linear work)
    for label, cfg in meths:
        if isinstance(cfg, tuple):
            with accel.apply(fam.pipe, accel.TaylorSeerConfig(cache_interval=cfg[2], max_order=1,
                                                              use_lite_mode=cfg[1])) as h:
                fam.run(fam.encode(prompts[0]), args.seed)
                stats[label]["ideal"] = h.trace.summary()["ideal_speedup"]
    t_plain = sum(stats["full"]["walls"])
    rows = []
    for label, st in stats.items():
        rows.append(dict(run=label, ideal=1.0 if label == "full" else st["ideal"],
                         measured=t_plain / sum(st["walls"]),
                         psnr_mean=statistics.fmean(st["psnr"]) if st["psnr"] else float("inf"),
                         psnr_min=min(st["psnr"]) if st["psnr"] else float("inf"), psnr=st["psnr"]))
    print(f"\n{fam.name}: {len(prompts)} prompts, {fam.call}; plain {t_plain:.2f} s in all; PSNR of decoded "
          f"{'images' if fam.name == 'flux' else 'videos'} vs plain")
    print(f"{'run':32s} {'ideal':>6s} {'meas':>6s} {'PSNR mean':>10s} {'PSNR min':>9s}")
    for r in rows:
        ideal = f"{r['ideal']:6.2f}" if r["ideal"] else "     -"
        print(f"{r['run']:32s} {ideal} {r['measured']:6.2f} {r['psnr_mean']:10.2f} {r['psnr_min']:9.2f}")
    return dict(rows=rows, prompts=prompts, call={k: v for k, v in fam.call.items()})


# ---- why: teacher-forced error per step and per token level ------------------------------------------------
class Recorder:
    """Every transformer call's (args, kwargs, output), through torch forward hooks (around any method hook)."""

    def __init__(self, module):
        self.calls = []
        self.h = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs, out):
        o = out[0] if isinstance(out, (tuple, list)) else out.sample
        clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        self.calls.append(([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}, o.clone()))

    def close(self):
        self.h.remove()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def why(args, fam: Family) -> dict:
    prompts = fam.prompts(args.why_n, args.seed + 500)
    adapter = accel.adapters.adapter_for(fam.pipe.transformer)
    t = fam.pipe.transformer
    res = {}
    cfgs = [(f"specdiff {r:.2f} {c3}", accel.SpecDiffConfig(cache_rate=r, c3_mode=c3))
            for r in (0.85, 0.95) for c3 in ("history", "taylor")] + [("TaylorSeer N5O1 lite", ("taylorseer", True, 5))]
    for label, cfg in cfgs:
        per_step, per_level = [], {1: [], 2: [], 3: []}
        shares = {1: [], 2: [], 3: []}
        change = []
        for i, prompt in enumerate(prompts):
            emb = fam.encode(prompt)
            rec = Recorder(t)
            try:
                _, _, trace = run_method(fam, cfg, emb, args.seed + i)
            finally:
                rec.close()
            prev = None
            for s, (a, k, out) in enumerate(rec.calls):
                true = t(*a, **k)
                true = true[0] if isinstance(true, (tuple, list)) else true.sample
                o, tr = adapter.sample_tokens(out).float(), adapter.sample_tokens(true).float()
                if prev is not None:
                    change.append(rel(tr, prev))
                prev = tr
                full = trace is not None and trace.steps[s].decision == "full"
                if trace is None and s > 0 and torch.equal(o, tr):
                    full = True
                if full:
                    continue
                per_step.append((s, rel(o, tr)))
                if trace is not None:
                    lv = torch.tensor(trace.steps[s].maps["level"]).flatten()
                    tot = ((o - tr) ** 2).sum().item()
                    for L in (1, 2, 3):
                        m = lv == L
                        if m.any():
                            per_level[L].append(rel(o[:, m], tr[:, m]))
                            shares[L].append(((o[:, m] - tr[:, m]) ** 2).sum().item() / max(tot, 1e-30))
        r = dict(step_rel_err_mean=statistics.fmean(e for _, e in per_step) if per_step else None,
                 step_rel_err=per_step, velocity_change_per_step=statistics.fmean(change) if change else None)
        for L, name in ((1, "c1"), (2, "c2"), (3, "c3")):
            if per_level[L]:
                r[f"{name}_rel_err"] = statistics.fmean(per_level[L])
                r[f"{name}_share_of_sq_err"] = statistics.fmean(shares[L])
        res[label] = r
        print(f"{label:28s} " + " ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.specdiff_fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["flux", "video"], default="flux")
    ap.add_argument("-n", type=int, default=16, help="prompts")
    ap.add_argument("--steps", type=int, default=None, help="default 28 (flux) / 20 (video)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--strides", action="store_true", help="also SpecDiff 0.85 with score_query_stride 2, 4 and every layer")
    ap.add_argument("--refresh", action="store_true",
                    help="instead: SpecDiff with a full refresh every 5th step (each C3 mode) vs TaylorSeer lite N3 / N5")
    ap.add_argument("--text-tokens", default="", metavar="compute,cache",
                    help="instead: SpecDiff 0.85 / 0.95 with these text_tokens values (FLUX only for 'cache')")
    ap.add_argument("--why", action="store_true", help="the teacher-forced error analysis (instead of the comparison)")
    ap.add_argument("--why-n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fam = Family(args.family, args.steps)
    res = dict(args=vars(args))
    if args.why:
        res["why"] = why(args, fam)
    else:
        res["compare"] = compare(args, fam)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()

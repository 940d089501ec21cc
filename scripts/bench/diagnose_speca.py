"""Why SpeCa's verification does or does not pay off: teacher-forced measurements on the bundled trained tiny models.

    HF_HUB_OFFLINE=1 python -m scripts.bench.diagnose_speca --model flux --prompts 4 --interval 6
    HF_HUB_OFFLINE=1 python -m scripts.bench.diagnose_speca --model video --prompts 4 --oracle

Teacher forcing: the run follows the plain trajectory. Full steps follow a fixed schedule every:N (they feed the
forecasts); on every other step the speculative step is computed (SpeCa with the given config, verification
included) AND the full step, and the full step's output is what the run keeps. So every speculative step is
measured from the same history and input, and nothing compounds. Per speculative step:
- the verification signals: SpeCa's verify-block error in every metric (rel_l1, rel_l1 with eps 1e-10, rel_rms,
  rel_l2, cosine), and the error of a forecast of the first block's residual (its exact input: what a first-block
  verifier would see);
- the true error: the relative error of the step's model output (the velocity) against the full step's, for the
  SpeCa forecast, and for forecasts of the model output itself (Taylor over the full steps' outputs, as diffusers'
  TaylorSeer lite does) of several orders, in step and in sigma distance, Newton and recursive ("reference") form;
  and its effect on the latent, |dsigma| * ||dv|| / ||final latent||.
Reported: the mean true error by distance k from the last full step (which forecast is better, and where order 2
loses), and the Spearman rank correlation of each verification signal with the true error, over all speculative
steps, within each k (does the signal tell more than "k steps since the last full step"), and within each step
across prompts (can it allocate compute between samples).

`--oracle`: adaptive SpeCa whose verification knows the true error (it runs the full step too, unaccounted) and
accepts a step when the latent effect is below a threshold (no grace steps): an upper bound on what any
verification signal can buy with the accept / recompute rule, as a PSNR vs ideal-speedup curve beside the fixed
schedules of the same forecast.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import accel
import accel.speca as speca_mod
from accel.metrics import verification_errors
from accel.taylor import TaylorForecaster
from scripts.bench.pareto_speca import every
from scripts.bench.tiny_models import TinyModel
from scripts.bench.utils import psnr

METRICS = (("rel_l1", 1e-6), ("rel_l1_eps1e-10", 1e-10), ("rel_rms", 1e-6), ("rel_l2", 1e-6), ("cosine", 1e-6))
OUTPUT_FORECASTS = {  # name: (order, distance, form)
    "out o0": (0, "step", "newton"), "out o1": (1, "step", "newton"), "out o2": (2, "step", "newton"),
    "out o2 ref": (2, "step", "reference"), "out o1 sigma": (1, "sigma", "newton"),
    "out o2 sigma": (2, "sigma", "newton"),
}


def _metrics(pred: torch.Tensor, real: torch.Tensor) -> dict:
    out = {}
    for name, eps in METRICS:
        metric = name.split("_eps")[0]
        out[name] = float(verification_errors(pred, real, metric, eps, whole_batch=True)[0][0])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class TeacherForced:
    """Attach SpeCa (schedule every:N) to a tiny model and run prompts teacher-forced; rows per speculative step."""

    def __init__(self, m: TinyModel, fields: dict, interval: int):
        self.m, self.interval = m, interval
        steps = m.call["num_inference_steps"]
        self.schedule = every(steps, interval)
        self.handle = accel.apply(m.pipe, accel.SpeCaConfig(**fields, schedule=self.schedule, record_maps=False,
                                                            sync_timing=True))
        from diffusers.hooks import HookRegistry

        self.hook = HookRegistry.check_if_exists_or_initialize(m.pipe.transformer).get_hook(speca_mod.HOOK_NAME)
        self.adapter = self.hook.adapter
        self.cap: dict = {}
        block0 = self.hook.blocks[0]
        self._h0 = block0.module.register_forward_hook(self._block0, with_kwargs=True)
        self._orig_run_step = self.hook.run_step
        self.hook.run_step = self._run_step
        self._orig_error = speca_mod.forecast_error
        speca_mod.forecast_error = self._forecast_error
        self.rows: list[dict] = []

    def close(self):
        speca_mod.forecast_error = self._orig_error
        self.hook.run_step = self._orig_run_step
        self._h0.remove()
        self.handle.remove()

    def _block0(self, module, args, kwargs, out):
        a = self.adapter
        ins, outs = a.block_streams(args, kwargs), a.output_streams(self.hook.blocks[0], out)
        self.cap["res0"] = torch.cat([(outs[s] - ins[s]).flatten(1) for s in sorted(ins)], dim=1).detach().clone()

    def _forecast_error(self, terms, coefs, real, metric, eps, image_rows=None, whole_batch=False):
        pred = sum(c * t.float() for c, t in zip(coefs, terms))
        self.cap["verify"] = _metrics(pred, real)
        return self._orig_error(terms, coefs, real, metric, eps, image_rows, whole_batch)

    def _run_step(self, module, args, kwargs, info, state, rec):
        full = self.schedule[info.step]
        self.cap.pop("verify", None)
        out = self._orig_run_step(module, args, kwargs, info, state, rec)
        sig = self.sigmas
        dt = abs(sig[info.step + 1] - sig[info.step])
        pos = {"step": float(info.step), "sigma": float(sig[info.step])}
        if full:
            v = self.adapter.output_sample(out).detach().clone()
            for name, f in self.out_fc.items():
                f.update(pos[OUTPUT_FORECASTS[name][1]], {"v": v})
            self.res0_fc.update(pos["step"], {"r": self.cap["res0"]})
            self.last_full = info.step
            return out
        v_spec = self.adapter.output_sample(out).detach().clone()
        out_full = self.hook.fn_ref.original_forward(*args, **kwargs)
        v = self.adapter.output_sample(out_full)
        row = dict(prompt=self.prompt, step=info.step, k=info.step - self.last_full, sigma=float(sig[info.step]),
                   dt=dt, v_norm=float(v.float().norm()), err={"speca": _rel(v_spec, v)},
                   dv={"speca": float((v_spec.float() - v.float()).norm())})
        for name, f in self.out_fc.items():
            p = f.predict(pos[OUTPUT_FORECASTS[name][1]])["v"]
            row["err"][name] = _rel(p, v)
            row["dv"][name] = float((p.float() - v.float()).norm())
        row["verify"] = self.cap.get("verify", {})
        r0 = self.cap["res0"]
        row["verify_first"] = _metrics(self.res0_fc.predict(pos["step"])["r"], r0)
        self.rows.append(row)
        return out_full

    def run(self, i: int) -> torch.Tensor:
        self.prompt = i
        self.out_fc = {n: TaylorForecaster(o, form) for n, (o, _, form) in OUTPUT_FORECASTS.items()}
        self.res0_fc = TaylorForecaster(1)
        m = self.m
        first = len(self.rows)
        lat, _ = self._run_with_sigmas(i)
        final_norm = float(lat.float().norm())
        for r in self.rows[first:]:
            r["latent_effect"] = {k: r["dt"] * d / final_norm for k, d in r["dv"].items()}
        return lat

    def _run_with_sigmas(self, i):
        return self.m.run(i)

    @property
    def sigmas(self) -> list[float]:
        """The running call's sigmas (the step driver's host copy)."""
        return self.hook._sigmas_cpu


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ra, rb)[0, 1])


def grouped_spearman(rows, signal, truth, key) -> float:
    """Mean Spearman correlation within groups of rows sharing `key` (weighted by group size)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    vals, weights = [], []
    for g in groups.values():
        c = spearman([signal(r) for r in g], [truth(r) for r in g])
        if not np.isnan(c):
            vals.append(c)
            weights.append(len(g))
    return float(np.average(vals, weights=weights)) if vals else float("nan")


def report(rows: list[dict], title: str) -> dict:
    print(f"\n== {title}: {len(rows)} speculative steps ==")
    ks = sorted({r["k"] for r in rows})
    names = list(rows[0]["err"])
    print("mean relative error of the step's output (velocity) by distance k from the last full step")
    print(f"{'forecast':14s} " + " ".join(f"{f'k={k}':>8s}" for k in ks) + f" {'all':>8s} {'latent':>9s}")
    by_k = {}
    for n in names:
        vals = [np.mean([r["err"][n] for r in rows if r["k"] == k]) for k in ks]
        lat = np.mean([r["latent_effect"][n] for r in rows])
        by_k[n] = dict(zip(map(str, ks), vals), all=float(np.mean([r["err"][n] for r in rows])), latent=float(lat))
        print(f"{n:14s} " + " ".join(f"{v:8.4f}" for v in vals) + f" {by_k[n]['all']:8.4f} {lat:9.2e}")
    print("Spearman correlation of the verification signal with the true error (SpeCa step's output error, its "
          "latent effect, the output forecast's error): all steps, within k, within step (across prompts)")
    corr = {}
    signals = [(f"last block {n}", (lambda r, n=n: r["verify"].get(n, np.nan))) for n, _ in METRICS]
    signals += [(f"first block {n}", (lambda r, n=n: r["verify_first"][n])) for n in ("rel_l1", "rel_l2")]
    signals += [("k (steps since full)", lambda r: r["k"]), ("k * dsigma", lambda r: r["k"] * r["dt"])]
    truths = [lambda r: r["err"]["speca"], lambda r: r["latent_effect"]["speca"], lambda r: r["err"]["out o1"]]
    for name, sig in signals:
        vals = []
        for truth in truths:
            vals += [spearman([sig(r) for r in rows], [truth(r) for r in rows]),
                     grouped_spearman(rows, sig, truth, "k"), grouped_spearman(rows, sig, truth, "step")]
        corr[name] = vals
        print(f"{name:28s} output: {vals[0]:6.3f} {vals[1]:6.3f} {vals[2]:6.3f} | latent: {vals[3]:6.3f} "
              f"{vals[4]:6.3f} {vals[5]:6.3f} | out o1: {vals[6]:6.3f} {vals[7]:6.3f} {vals[8]:6.3f}")
    return dict(title=title, n=len(rows), error_by_k=by_k, correlations=corr)


# ---- oracle -------------------------------------------------------------------------------------------
class Oracle(TeacherForced):
    """Adaptive SpeCa whose verification error is the true latent effect of the step (computed from a full
    step that is not accounted): the best any verification signal could do with the accept / recompute rule."""

    def __init__(self, m: TinyModel, fields: dict, threshold: float):
        self.m = m
        self.handle = accel.apply(m.pipe, accel.SpeCaConfig(**fields, threshold=threshold, decay=1.0,
                                                            min_spec_steps=0, record_maps=False, sync_timing=True))
        from diffusers.hooks import HookRegistry

        self.hook = HookRegistry.check_if_exists_or_initialize(m.pipe.transformer).get_hook(speca_mod.HOOK_NAME)
        self.adapter = self.hook.adapter
        self._orig_run_step = self.hook.run_step
        self.hook.run_step = self._oracle_step
        self._orig_error = speca_mod.forecast_error
        speca_mod.forecast_error = self._inject
        self._h0 = type("_", (), {"remove": lambda s: None})()
        self.true_error = None

    def _inject(self, terms, coefs, real, metric, eps, image_rows=None, whole_batch=False):
        err, emap = self._orig_error(terms, coefs, real, metric, eps, image_rows, whole_batch)
        if self.true_error is not None:
            err = torch.full_like(err, self.true_error)
        return err, emap

    def _oracle_step(self, module, args, kwargs, info, state, rec):
        hook = self.hook
        hook_cfg = hook.config
        full, _ = hook._plan(info, state)
        self.true_error = None
        if not full:
            state.x = float(info.step) if hook_cfg.distance == "step" or info.sigma is None else info.sigma
            saved = (state.blocks_computed, state.verify_now, state.verify_errors, state.verify_map)
            v = self.adapter.output_sample(hook.fn_ref.original_forward(*args, **kwargs))
            state.verify_now = True
            with hook._view(hook.spec_view):
                v_spec = self.adapter.output_sample(hook.fn_ref.original_forward(*args, **kwargs))
            state.blocks_computed, state.verify_now, state.verify_errors, state.verify_map = saved
            sig = self.sigmas
            dt = abs(sig[info.step + 1] - sig[info.step])
            self.true_error = dt * float((v_spec.float() - v.float()).norm() / v.float().norm())
        return self._orig_run_step(module, args, kwargs, info, state, rec)


def oracle_curve(m: TinyModel, fields: dict, thresholds, plain: list) -> list[dict]:
    out = []
    for t in thresholds:
        o = Oracle(m, fields, t)
        imgs, ideal = [], []
        try:
            for i in range(len(plain)):
                lat, _ = o._run_with_sigmas(i)
                imgs.append(m.decode(lat))
                ideal.append(o.handle.trace.summary())
        finally:
            o.close()
        p = [psnr(a, b, 1.0) for a, b in zip(imgs, plain)]
        row = dict(curve="oracle", threshold=t, psnr_mean=float(np.mean(p)), psnr_worst=float(np.min(p)),
                   ideal=sum(s["blocks_plain"] for s in ideal) / sum(s["blocks_computed"] for s in ideal))
        print(f"oracle threshold {t:.2e}: ideal {row['ideal']:.2f}, PSNR {row['psnr_mean']:.2f} / "
              f"{row['psnr_worst']:.2f}", flush=True)
        out.append(row)
    return out


def fixed_curve(m: TinyModel, fields: dict, intervals, plain: list) -> list[dict]:
    out = []
    steps = m.call["num_inference_steps"]
    for n in intervals:
        with accel.apply(m.pipe, accel.SpeCaConfig(**fields, schedule=every(steps, n), record_maps=False)) as h:
            imgs = [m.decode(m.run(i)[0]) for i in range(len(plain))]
        s = [t.summary() for t in h.traces]
        p = [psnr(a, b, 1.0) for a, b in zip(imgs, plain)]
        row = dict(curve="fixed", interval=n, psnr_mean=float(np.mean(p)), psnr_worst=float(np.min(p)),
                   ideal=sum(x["blocks_plain"] for x in s) / sum(x["blocks_computed"] for x in s))
        print(f"fixed every:{n}: ideal {row['ideal']:.2f}, PSNR {row['psnr_mean']:.2f} / {row['psnr_worst']:.2f}",
              flush=True)
        out.append(row)
    return out


CONFIGS = {  # name: SpeCaConfig fields of the forecast under test
    "stack o1": dict(order=1), "stack o2": dict(order=2), "stack o2 sigma": dict(order=2, distance="sigma"),
    "stack o2 ref": dict(order=2, taylor_form="reference"), "stack o1 first": dict(order=1, verify_block=0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.diagnose_speca", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux", choices=["flux", "video"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--interval", type=int, default=6, help="teacher forcing: full steps every:N")
    ap.add_argument("--configs", default="stack o1,stack o2", help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--oracle", action="store_true", help="oracle verification curve vs fixed (config: the first)")
    ap.add_argument("--oracle-thresholds", default="1e-3,2e-3,4e-3,8e-3,1.6e-2")
    ap.add_argument("--intervals", default="3,4,5,6,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    m = TinyModel.load(args.model, args.device, args.prompts, args.steps)
    result = dict(args=vars(args), reports=[])
    for name in args.configs.split(","):
        tf = TeacherForced(m, CONFIGS[name], args.interval)
        try:
            for i in range(len(m.prompts)):
                tf.run(i)
        finally:
            tf.close()
        result["reports"].append(report(tf.rows, f"{args.model} {name}, teacher-forced every:{args.interval}"))
    if args.oracle:
        plain = [m.decode(m.run(i)[0]) for i in range(len(m.prompts))]
        fields = CONFIGS[args.configs.split(",")[0]]
        result["fixed"] = fixed_curve(m, fields, [int(x) for x in args.intervals.split(",")], plain)
        result["oracle"] = oracle_curve(m, fields, [float(x) for x in args.oracle_thresholds.split(",")], plain)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()

"""SpecLab — the Gradio lab: pick a model and a method, tune it, press Generate, watch it work step by step.

    python app.py                      # http://127.0.0.1:7860, bundled tiny FLUX on the CPU
    python app.py --port 7861 --host 0.0.0.0 --max-work 100
    python app.py --model /path/to/FLUX.1-dev      # adds a preset for a local diffusers pipeline folder
    SPECLAB_MODEL=/path/a:/path/b python app.py     # the same from the environment (Spaces)

Thin by design: controls -> the method's `accel` config (lab.methods, controls built from the configs' knobs)
-> one streamed pipeline call (lab.runner.stream_run) -> `accel.Trace` -> `visualizers` figures; the
comparison with the full run is lab.compare. Runs on one model wait in its line (lab.line).

API (`gradio_client`): the Generate event is `/generate`, its parameters named as the controls: the run's
(`model`, `prompt`, `seed`, `steps`, `width`, `height`, `guidance`, `frames`, `method`, `compare`) and every
method's knobs as `<method>_<field>` (e.g. `speca_threshold`, `specdiff_cache_rate`); see `Lab.api_doc()`.

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/")
    out = c.predict(prompt="a large red circle on the left ...", method="SpeCa", speca_threshold=5.0,
                    api_name="/generate")
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import inspect
import io
import json
import logging
import math
import os
import re
import sys
import time
import uuid
import weakref

import gradio as gr
import numpy as np
from gradio.components.plot import PlotData
from PIL import Image as PILImage

import accel
import visualizers as V
from accel.trace import Trace
from lab import compare as C
from lab import gpu as G
from lab import methods as LM
from lab import models as M
from lab import runner as R
from lab.errors import InputError, LabError
from lab.limits import Limits
from lab.session import RunFiles, Session, give_back_memory, release_large_blocks_at_once
from lab.traces import TraceError, read_trace
from lab.video import VideoWriteError

log = logging.getLogger("speclab")
EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "examples")

def zero_gpu_duration(model, spec, method=None, config=None, compare=False, *_, **__) -> int:
    """Seconds of GPU a run asks ZeroGPU for (`spaces.GPU(duration=...)` calls it with the run's arguments): an
    upper estimate from the run's tokens, steps, compare mode, calibration and a first compilation
    (`lab.gpu.zero_gpu_duration`)."""
    shape = G.run_shape(model.pipe.transformer.config, spec.width, spec.height, model.size_multiple, spec.frames,
                        text_tokens=model.preset.max_sequence_length)
    warmup = bool(getattr(spec, "compile", False)) and not (model.compiler is not None and model.compiler.compiled)
    return G.zero_gpu_duration(shape, spec.steps, compare=bool(compare), compile_warmup=warmup,
                               calibrate=bool(getattr(spec, "target_speedup", 0)))


try:  # Hugging Face Spaces (ZeroGPU): run each generation on a GPU slice as long as the run needs
    import spaces

    def GPU(fn):
        return spaces.GPU(duration=zero_gpu_duration)(fn)
except ImportError:  # anywhere else: a no-op

    def GPU(fn):
        return fn


EXAMPLES = [
    "a large red circle on the left and a small blue square on the right, on a gray background",
    "a small yellow triangle at the top, on a black background",
    "a large green square in the center, on a white background",
    "a small purple circle at the bottom and a large orange triangle at the top, on a gray background",
]
VIDEO_EXAMPLES = [  # captions of the bundled tiny HunyuanVideo's training clips (scripts/tiny_video/data.py)
    "a large red circle moving left, on a gray background",
    "a small yellow triangle moving up, on a black background",
    "a large green square moving right, on a white background",
    "a small blue circle moving down, on a gray background",
]
RUN_CONTROLS = ("model", "prompt", "seed", "steps", "width", "height", "guidance", "frames", "method", "compare",
                "target_speedup", "compile")
SIZE_CONTROLS = ("steps", "width", "height", "guidance", "frames")
"""Left out of an API call (None), these take the chosen model's own defaults."""
OUTPUTS = ("preview", "image", "summary", "error_plot", "timeline_plot", "maps_plot", "step", "full_image",
           "diff_plot", "files", "video", "frame", "trace")
"""What every update of `/generate` carries, in this order (the trace goes to the session's state, not the API)."""
PICTURE_FORMATS = {"preview": "jpeg", "image": "webp", "full_image": "webp"}
"""The picture outputs' file formats (`PictureFiles`): JPEG for the preview, drawn at every streamed update (WebP,
Gradio's default, costs ~10x more); WebP for the images."""

CSS = """
#speclab-controls .form { gap: 6px; }
#speclab-preview img, #speclab-image img { image-rendering: auto; }
/* the images start below their labels (Gradio floats a label over the image's top left corner) */
.speclab-picture .image-container { padding-top: 36px; box-sizing: border-box; }
#speclab-header p { margin: 0; }
.speclab-caption, .speclab-caption p { font-size: 0.85em; opacity: 0.85; }
.speclab-how p { font-size: 0.9em; }
#speclab-summary p { overflow-wrap: anywhere; }
/* a phone: the results column (prompt, Generate, image, plots) first, the knobs after; the images' buttons
   (download, fullscreen) would cover their labels: the run's files are under "Export / load a trace" */
@media (max-width: 768px) {
  .speclab-picture .icon-button-wrapper { display: none !important; }
  #speclab-main { flex-direction: column; }
  #speclab-results { order: -1; }
  #speclab-header h1 { font-size: 1.4em; }
  #speclab-header p { font-size: 0.85em; }
  #speclab-preview, #speclab-image, #speclab-full { height: 180px !important; }
}
"""
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "plotly_theme.js")) as _f:
    HEAD = f"<script>\n{_f.read()}</script>"
"""In the page's <head>: the Plotly figures follow the page's light/dark theme (assets/plotly_theme.js)."""


def page_options() -> dict:
    """`launch()`'s look of the page: theme, CSS and the figures' theme script (the app and the browser tests)."""
    return dict(theme=gr.themes.Soft(), css=CSS, head=HEAD)


# ---- errors and Markdown ---------------------------------------------------------------------------------------
def user_error(e: BaseException) -> gr.Error:
    """Our messages as they are; anything else logged with an id, and only the id shown."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, LabError) and str(e):
        return gr.Error(str(e))
    if isinstance(e, M.torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e):
        if M.torch.cuda.is_available():
            M.torch.cuda.empty_cache()
        log.warning("out of GPU memory: %s", str(e)[:200])
        return gr.Error("out of GPU memory: lower the size, the steps or the frames, untick compare or compile, "
                        "or wait for other runs on this GPU to end; the app goes on serving")
    error_id = uuid.uuid4().hex[:8]
    log.error("internal error %s", error_id, exc_info=e)
    return gr.Error(f"internal error (id {error_id}): the server's log has the details")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]!|~])")  # what is Markdown inside a line (the text never starts one)


def md_text(text, limit: int = 200) -> str:
    """Plain text inside Markdown: HTML and Markdown syntax escaped, cut to `limit` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _fmt_speedup(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summary_markdown(trace: Trace | None, extra: dict | None = None) -> str:
    """The run's numbers as Markdown (also used for loaded traces; every text from the trace is escaped)."""
    if trace is None:
        return "No run yet: pick a method and press **Generate**."
    extra = extra or {}
    s = trace.summary()
    done = max((r.step for r in trace.steps), default=-1) + 1
    run = trace.meta.get("run") if isinstance(trace.meta.get("run"), dict) else {}
    lab_method = LM.by_name(trace.method)
    method = lab_method.label if lab_method is not None else trace.method
    model = run.get("model") or extra.get("model") or trace.model  # the preset's name, not the model's class
    lines = [
        f"**{md_text(method, 60)}** on {md_text(model, 80)} — step {done}/{trace.num_steps}"
        + (" — **stopped**" if extra.get("stopped") else "") + (" — running…" if extra.get("running") else ""),
        f"full {s['full_steps']} · accepted {s['accepted_steps']} · rejected {s['rejected_steps']} · "
        f"partial {s['partial_steps']}" + (f" · pre-run calls {s['overhead_calls']}" if s["overhead_calls"] else ""),
        f"ideal speedup (compute, not time) **{_fmt_speedup(s['ideal_speedup'])}** "
        f"({s['blocks_computed']:g}/{s['blocks_plain']} block computations) · denoiser time "
        f"{s['measured_ms'] / 1000:.2f} s"
        + (f" · peak GPU memory {trace.meta['peak_gpu_bytes'] / 2**30:.1f} GiB"
           if isinstance(trace.meta.get("peak_gpu_bytes"), int) else ""),
    ]
    if extra.get("measured_speedup") is not None:
        pairs = extra.get("pairs") or []
        spread = (f", {min(pairs):.2f}–{max(pairs):.2f}x over {len(pairs)} back-to-back pairs" if len(pairs) > 1
                  else ", one back-to-back pair")
        lines.append(f"measured speedup (time) vs the full run timed in this request **"
                     f"{_fmt_speedup(extra['measured_speedup'])}** (median{spread}; full run "
                     f"{extra['full_ms'] / 1000:.2f} s"
                     + ("; the first pair's accelerated run is the one streamed here, live view included"
                        if extra.get("timed_streaming") else "; this method re-run without the live view") + ")")
    if extra.get("psnr") is not None:
        p = extra["psnr"]
        lines.append(f"vs the full run: PSNR **{'∞' if math.isinf(p) else f'{p:.2f}'} dB** · "
                     f"SSIM **{extra['ssim']:.4f}**")
    if extra.get("calibrated"):
        lines.append(extra["calibrated"])
    if extra.get("compiled"):
        lines.append(md_text(extra["compiled"], 300))
    if extra.get("note"):
        lines.append(extra["note"])
    return "  \n".join(lines) + "\n\n<details><summary>exact config</summary>\n\n" + md_text(
        json.dumps(trace.config, separators=(", ", ": ")), 1200) + "\n\n</details>"


def _slider_update(trace: Trace | None):
    steps = V.map_steps(trace) if trace is not None else []
    if not steps:
        return gr.update(minimum=0, maximum=max(1, (trace.num_steps - 1) if trace else 1), value=0,
                         interactive=False, label="step (no token maps in this trace)")
    return gr.update(minimum=min(steps), maximum=max(max(steps), min(steps) + 1), value=steps[-1], step=1,
                     interactive=True, label="step (scrub the token maps)")


def _frame_update(trace: Trace | None):
    """The token-map frame slider: shown for video traces (maps [frames][h][w]), hidden otherwise."""
    n = V.map_frames(trace) if trace is not None else 0
    if n <= 0:
        return gr.update(visible=False, value=0)
    return gr.update(visible=True, minimum=0, maximum=max(1, n - 1), value=n // 2, step=1, interactive=n > 1,
                     label=f"frame (latent frame of the token maps, 0..{n - 1})")


def panels(**values) -> tuple:
    """One update of `/generate`'s outputs (`OUTPUTS`); outputs not named are left as they are."""
    unknown = set(values) - set(OUTPUTS)
    assert not unknown, unknown
    return tuple(values[k] if k in values else gr.skip() for k in OUTPUTS)


TRACE_PANELS = ("error_plot", "timeline_plot", "maps_plot")
VERIFYING = ("speca", "fbcache")
"""Methods whose error figure plots something (FirstBlockCache: its residual change against its threshold)."""


def trace_panels(trace: Trace, only=TRACE_PANELS, **extra) -> dict:
    """The per-step figures of a trace (those named in `only`)."""
    m = LM.by_name(trace.method)
    figs = {}
    if "error_plot" in only:
        figs["error_plot"] = V.error_figure(trace) if trace.method in VERIFYING else V.empty_figure(
            f"{m.label if m else trace.method} verifies nothing: no error to plot",
            title="verification error vs threshold")
    if "timeline_plot" in only:
        figs["timeline_plot"] = V.timeline_figure(trace, reference=extra.get("ref"))
    if "maps_plot" in only:
        figs["maps_plot"] = V.token_maps_figure(trace)
    if m is not None:  # the UI's name in the subtitles ("SpeCa · ideal 2.4x", not "speca · ...")
        for key in ("error_plot", "timeline_plot"):
            if key not in figs:
                continue
            sub = figs[key].layout.title.subtitle
            if (sub.text or "").startswith(trace.method):
                sub.text = m.label + sub.text[len(trace.method):]
    return figs


def streamed_panels(trace: Trace, shown: dict) -> dict:
    """`trace_panels` for a streamed update of a running trace: a figure is built and sent only when what it shows
    changed since the run's last update (`shown`, kept by the caller between updates); the others are skipped
    (`gr.skip()`: the page keeps them). A method that verifies nothing shows the same empty error figure all run,
    and the token maps change only at a step that records maps: rebuilding those at every update was Python work
    (the consumer's, beside the pipeline's thread) and figure JSON for nothing."""
    steps = len(trace.steps)
    maps = V.map_steps(trace)
    now = dict(error_plot=steps if trace.method in VERIFYING else None, timeline_plot=steps,
               maps_plot=maps[-1] if maps else None)
    changed = tuple(k for k in TRACE_PANELS if k not in shown or shown[k] != now[k])
    shown.update(now)
    figs = trace_panels(trace, only=changed) if changed else {}
    return {k: figs.get(k, gr.skip()) for k in TRACE_PANELS}


def _sweep_table(points: list[dict], full_ms: float) -> str:
    rows = ["| setting | ideal (compute) | measured (time) | PSNR dB | SSIM |", "|---|---|---|---|---|"]
    for p in points:
        psnr = "∞" if math.isinf(p["psnr"]) else f"{p['psnr']:.2f}"
        rows.append(f"| {md_text(p['label'])} | {_fmt_speedup(p['ideal'])} | {_fmt_speedup(p['measured'])} | "
                    f"{psnr} | {p['ssim']:.4f} |")
    return (f"full run {full_ms / 1000:.2f} s; each point's measured speedup is timed against a full run right "
            "after it.\n\n" + "\n".join(rows))


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class Lab:
    """Process-wide state of the lab: loaded models (each with its line of runs), the full-run cache, the run
    files and the limits. Per-session things live in the session's state (`lab.session.Session`, the trace)."""

    def __init__(self, manager: M.ModelManager | None = None, full_cache: R.FullRunCache | None = None,
                 every_s: float = 0.3, limits: Limits | None = None, files: RunFiles | None = None, gpu=None,
                 timing_pairs: int = 3, timing_budget_s: float = 4.0):
        self.manager = manager or M.ModelManager()
        self.full_cache = full_cache or R.FullRunCache()
        self.every_s = every_s
        self.timing_pairs = timing_pairs
        """Compare mode: at most this many accelerated/full pairs timed back to back per request..."""
        self.timing_budget_s = timing_budget_s
        self.play_delay_s = 0.15
        self._example = None
        """...while the timing so far took less than half of this (a run of seconds gets one pair); and an
        accelerated run up to this long is run again without the live view for the first pair (`_timed_pairs`)."""
        self.limits = limits or Limits()
        self.files = files or RunFiles(self.limits.run_files)
        # ZeroGPU: only the run holds a GPU slice, not the wait in line
        self._run_turn = (gpu or (lambda fn: fn))(self._run_turn)

    @staticmethod
    def stop(session: Session | None) -> None:
        if session is not None:
            session.stop()

    def end_session(self, session: Session | None) -> None:
        """The session ended (its tab closed): stop its run, remove its run files."""
        if isinstance(session, Session):
            session.ended = True
            session.stop()
            self.files.release(session)

    # ---- Generate ---------------------------------------------------------------------------------
    def parse(self, controls: dict):
        """Control values -> (spec, lab method, config, compare, loaded model); `InputError`s name the control."""
        unknown = set(controls) - set(RUN_CONTROLS) - {m.param(k.name) for m in LM.TABLE for k in m.knobs()}
        if unknown:
            raise InputError(f"unknown control(s) {sorted(unknown)[:5]}")
        c = {k: controls.get(k) for k in RUN_CONTROLS}
        lim = self.limits
        preset = self.manager.preset(R.as_text("model", c["model"], lim.max_text_chars))
        prompt = R.as_text("prompt", c["prompt"], lim.max_prompt_chars)
        method = LM.by_label(R.as_text("method", c["method"], lim.max_text_chars))
        target = R.as_float("target speedup", c["target_speedup"] or 0.0)
        if target and not 1 <= target <= 20:
            raise InputError(f"target speedup={target:g} is out of range: use 1..20, or 0 to set the knobs yourself")
        if target and method.speed_knob is None:
            raise InputError(f"target speedup: {method.label} has no speed knob; set it to 0 or pick another method")

        def given(name, default):  # a control left out (None) takes the chosen model's own default
            return default if c[name] is None else c[name]

        frames = R.as_int("frames", given("frames", preset.frames)) if preset.is_video else None
        spec = R.RunSpec(preset.name, prompt, R.as_int("seed", c["seed"] or 0),
                         R.as_int("steps", given("steps", preset.steps)), R.as_int("width", given("width", preset.width)),
                         R.as_int("height", given("height", preset.height)),
                         R.as_float("guidance", given("guidance", preset.guidance)), frames)
        spec.target_speedup = target
        if not isinstance(c["compare"], (bool, type(None))):
            raise InputError("compare must be true or false")
        if not isinstance(c["compile"], (bool, type(None))):
            raise InputError("compile must be true or false")
        config = method.build(controls)
        model = self.manager.get(preset.name)
        spec.compile = bool(c["compile"])
        if spec.compile and not model.on_gpu:
            raise InputError(f"compile needs a GPU preset: {preset.name} runs on the CPU here, where compiling would "
                             "take longer than the run. Untick compile.")
        R.validate_spec(spec, model, lim, compare=bool(c["compare"]))
        return spec, method, config, bool(c["compare"]), model

    def generate(self, session: Session | None = None, **controls):
        """`/generate`: stream a run's updates (tuples in `OUTPUTS` order). See `api_doc()` for the controls."""
        session = session if isinstance(session, Session) else Session()
        try:
            spec, method, config, compare, model = self.parse(controls)
        except Exception as e:
            raise user_error(e) from None
        stop = session.new_run()
        ticket = model.line.join(f"{method.label}, {spec.steps} steps")
        try:
            if (yield from self._wait(ticket, stop, model)):
                yield from self._run_turn(model, spec, method, config, compare, stop, ticket, session)
        except Exception as e:
            raise user_error(e) from None
        finally:
            ticket.leave()

    def _wait(self, ticket, stop, model):
        """Wait for the model's turn, telling the user their place; False if Stop took them out of the line."""
        while not ticket.wait(timeout=self.every_s):
            if stop.is_set():
                yield panels(summary="Stopped before it started: you left the line.")
                return False
            running = model.line.running()
            now = f"{running.what}, {running.progress}" if running is not None and running.progress else (
                running.what if running is not None else "-")
            ahead = max(1, ticket.position())
            yield panels(summary=f"Waiting for **{md_text(model.preset.name)}**: you are {_ordinal(ahead + 1)} in "
                                 f"line ({ahead} run{'s' if ahead > 1 else ''} before yours). In use by: "
                                 f"{md_text(now)}. Press **Stop** to leave the line.")
        return True

    def _run_turn(self, model, spec, method, config, compare, stop, ticket, session):
        """The run and, in compare mode, the full reference run, on the model's turn."""
        final, calibrated = None, None
        compiled_note = yield from self._compile_turn(model, spec, method, config, compare, ticket)
        if getattr(spec, "target_speedup", 0):
            knob = next(k.label for k in method.knobs() if k.name == method.speed_knob)  # the UI's name
            ticket.progress = "calibrating"
            yield panels(summary=f"Finding the {md_text(knob)} whose ideal speedup is {spec.target_speedup:g}x on "
                                 "this prompt (bisection, a few runs)…")
            kwargs = dict(R.pipe_kwargs(spec, model), output_type="latent")
            cal = accel.calibrate(model.pipe, config, spec.target_speedup, max_iter=5, **kwargs)
            config = cal.config
            calibrated = (f"target speedup {spec.target_speedup:g}x: {md_text(knob)} = "
                          f"{getattr(config, method.speed_knob):g} gives {cal.speedup:.2f}x ideal "
                          f"({len(cal.tried)} runs tried)")
        shown = {}  # what the streamed figures show (streamed_panels)
        for up in R.stream_run(model, spec, config, stop=stop, every_s=self.every_s):
            if up.done:
                final = up
                break
            ticket.progress = f"step {up.step + 1}/{spec.steps}"
            if up.trace is not None:
                # the run's first update clears the last run's pictures: "this method" and "full run" would
                # otherwise show a finished run's images beside this run's live preview
                # (and the last run's other results: once sent here, each output is re-sent unchanged by
                # `SteadyOutputs` rather than skipped, which costs Gradio a component rebuild per update)
                stale = {} if shown else dict(image=None, full_image=None, diff_plot=None, files=None, video=None,
                                              step=_slider_update(None), frame=_frame_update(None))
                yield panels(preview=up.preview if up.preview is not None else gr.skip(),
                             summary=summary_markdown(up.trace, {"running": True, "model": spec.preset}),
                             **stale, **streamed_panels(up.trace, shown))
        trace, result = final.trace, final.result
        extra, ref, pairs = {"stopped": final.stopped, "calibrated": calibrated, "compiled": compiled_note}, None, []
        diff_note = "tick 'compare with the full run' to see it"
        if final.stopped:
            extra["note"] = ("stopped: the image is the model's estimate of the clean image at the last step done; "
                             "no comparison with the full run")
            diff_note = "no comparison for a stopped run"
        elif compare:
            ticket.progress = "timing the full run"
            yield panels(preview=final.preview if final.preview is not None else gr.skip(), image=result.image,
                         summary=summary_markdown(trace, {"model": spec.preset,
                                                          "note": "timing the full run, then this method again "
                                                                  "without the live view, back to back (the honest "
                                                                  "measured speedup)…"}),
                         step=_slider_update(trace), trace=trace, **trace_panels(trace))
            ref, pairs, full_ms, extra["timed_streaming"] = self._timed_pairs(model, spec, method, config, trace,
                                                                               stop)
            if ref is None:
                extra["note"] = diff_note = "the full reference run was stopped: no comparison"
        metrics_on = model.pipe._execution_device if model.on_gpu else None  # SSIM of 1024² takes seconds on a CPU
        comparison = C.compare(result, trace, *ref, device=metrics_on) if ref is not None else None
        session.reference = (trace, ref[1]) if ref is not None else None
        if comparison is not None:
            extra.update(comparison.as_summary())
            if pairs:
                extra["pairs"] = pairs
                extra["measured_speedup"] = float(np.median(pairs))
                extra["full_ms"] = full_ms
            session.add_point(spec.key(), method.label, dict(
                label=method.label, psnr=comparison.psnr, ssim=comparison.ssim,
                measured=extra.get("measured_speedup"), ideal=trace.summary()["ideal_speedup"]))
        trace.meta["run"] = self._run_meta(spec, method, config)
        self.last_extra = extra  # the example recorder (scripts.lab.examples) reads it
        files, export_note = self._export(session, trace, spec, result)
        if export_note:
            extra["note"] = (extra["note"] + "  \n" if extra.get("note") else "") + md_text(export_note, 400)
        yield panels(preview=final.preview if final.preview is not None else result.image, image=result.image,
                     summary=summary_markdown(trace, extra), **trace_panels(trace, ref=ref[1] if ref else None),
                     step=_slider_update(trace), full_image=ref[0].image if ref else None,
                     diff_plot=comparison.difference if comparison else V.empty_figure(diff_note, title="difference"),
                     files=files, video=next((f for f in files if f.endswith((".mp4", ".webm"))), None),
                     frame=_frame_update(trace), trace=trace)

    def _compile_turn(self, model, spec, method, config, compare, ticket):
        """Compiled or eager, as the run asks (`spec.compile`): the first compiled run of a method at a size
        compiles the transformer's blocks with warm-up runs first (shown as such, not timed); eager runs put the
        blocks back to eager. Returns the line the summary shows (None for eager runs of a never-compiled model)."""
        if model.compiler is None:
            if not spec.compile:
                return None
            model.compiler = G.Compiled(model.pipe.transformer)
        model.compiler.set(spec.compile)
        if not spec.compile:
            return "eager (the compiled blocks are kept for runs that ask for compile)"
        key = (method.label, spec.width, spec.height, spec.frames)
        if key in model.compiler.warmed:
            return "compiled blocks (compile_repeated_blocks), warmed up by an earlier run"
        warm = R.RunSpec(spec.preset, spec.prompt, spec.seed, min(spec.steps, 8), spec.width, spec.height,
                         spec.guidance, spec.frames)
        ticket.progress = "compiling (warm-up)"
        yield panels(summary=f"**Compiling** the transformer's blocks for {md_text(method.label)} at "
                             f"{spec.width}x{spec.height}: warm-up runs of {warm.steps} steps (the first compile "
                             "takes tens of seconds; not counted in any timing)…")
        start = time.perf_counter()
        configs = [config] + ([LM.by_label(LM.FULL).build({})] if compare and method.label != LM.FULL else [])
        for cfg in configs:
            R.run_to_end(model, warm, cfg)
        seconds = time.perf_counter() - start
        model.compiler.warmed.add(key)
        self.last_compile_s = seconds
        return f"compiled blocks (compile_repeated_blocks); compile warm-up {seconds:.1f} s before this run, not timed"

    def _timed_pairs(self, model, spec, method, config, trace, stop):
        """The full run timed right after this one (its picture cached per settings), then the accelerated run
        again, unstreamed, right after it: the streamed run's time holds what the live view costs the pipeline's
        thread (figures, Gradio's updates: 5-15 % on short GPU runs, run 4 of issue 13) and the full reference has
        no live view. Then, while it is cheap (`timing_budget_s`), more accelerated/full pairs interleaved. An
        accelerated run longer than `timing_budget_s` is not run again: the first pair then uses the streamed run.
        Returns (full result, full trace), the per-pair speedups (full denoiser time / accelerated), the full runs'
        median milliseconds and whether the first pair used the streamed run; (None, [], None, False) if Stop came
        first."""
        stop.clear()  # a Stop that came as the accelerated run ended must not cancel the reference
        start = time.perf_counter()
        full_cfg = LM.by_label(LM.FULL).build({})
        ref = R.run_to_end(model, spec, full_cfg, stop=stop)
        if ref.stopped:
            return None, [], None, False
        self.full_cache.put(spec, ref.result, ref.trace)  # for sweeps; timing is never reused

        def ratio(full_trace, run_trace):
            mine = run_trace.summary()["measured_ms"]
            return full_trace.summary()["measured_ms"] / mine if mine else None

        first, streamed = trace, trace.summary()["measured_ms"] / 1000 > self.timing_budget_s
        if not streamed:
            again = R.run_to_end(model, spec, config, stop=stop)
            if again.stopped:
                return (ref.result, ref.trace), [], None, False
            first = again.trace
        pairs = [ratio(ref.trace, first)]
        full_ms = [ref.trace.summary()["measured_ms"]]
        while len(pairs) < self.timing_pairs and time.perf_counter() - start < self.timing_budget_s / 2:
            again = R.run_to_end(model, spec, config, stop=stop)
            full = R.run_to_end(model, spec, full_cfg, stop=stop)
            if again.stopped or full.stopped:
                break
            pairs.append(ratio(full.trace, again.trace))
            full_ms.append(full.trace.summary()["measured_ms"])
        return (ref.result, ref.trace), [p for p in pairs if p is not None], float(np.median(full_ms)), streamed

    @staticmethod
    def _run_meta(spec: R.RunSpec, method: LM.LabMethod, config) -> dict:
        """What restores the view of a run (`trace.meta["run"]`): the run's controls, the method and its config."""
        run = {k: getattr(spec, k) for k in ("prompt", "seed", "steps", "width", "height", "guidance", "frames")}
        return dict(run, model=spec.preset, method=method.label, config=config.to_dict())

    def _export(self, session, trace: Trace, spec: R.RunSpec, result) -> tuple[list[str], str | None]:
        """The run's files (trace JSON and CSV, config, a video's file) and a note for the summary when the video
        file could not be written (no video writer installed: the note names the fix; the run is shown anyway)."""
        d = self.files.new(session)
        base = os.path.join(d, f"speclab_{trace.method}")
        trace.to_json(base + "_trace.json", indent=1)
        trace.to_csv(base + "_trace.csv")
        run = {k: getattr(spec, k) for k in ("prompt", "seed", "steps", "width", "height", "guidance")}
        run["model"] = spec.preset
        if spec.frames is not None:
            run["frames"] = spec.frames
        with open(base + "_config.json", "w") as f:
            json.dump({"method": trace.method, "config": trace.config, "run": run}, f, indent=2)
        files = [base + "_trace.json", base + "_trace.csv", base + "_config.json"]
        try:
            return files + result.export(d, f"speclab_{trace.method}"), None
        except VideoWriteError as e:
            return files, str(e)

    @staticmethod
    def api_doc() -> str:
        """The `/generate` parameters, with each knob's help (the config's own words)."""
        lines = ["Run a method and stream its updates.", "", "Args:"]
        run = dict(model=f"model preset: {', '.join(M.PRESETS)}", prompt="text prompt", seed="random seed",
                   steps="denoising steps", width="image width in pixels", height="image height in pixels",
                   guidance="guidance scale (models with guidance embeds, HunyuanVideo)",
                   frames="video presets only: number of frames (4k + 1)", method=f"one of {LM.METHODS}",
                   compare="also run (or reuse) the full run: PSNR/SSIM, measured speedup, difference map",
                   target_speedup="0: off; else the speed knob giving this ideal speedup on this prompt",
                   compile="GPU presets only: run the transformer's blocks compiled (regional compilation; the "
                           "first run per method and size compiles first, shown as a warm-up)")
        lines += [f"    {k}: {v}." for k, v in run.items()]
        for m in LM.TABLE:
            lines += [f"    {m.param(k.name)}: {m.label}, {k.label} ({k.allowed()}): {k.help}" for k in m.knobs()]
        return "\n".join(lines)

    # ---- sweep: the method's Pareto curve for this prompt --------------------------------------------
    def sweep(self, session: Session | None = None, sweep_from=None, sweep_to=None, sweep_count=4, **controls):
        """`/sweep`: run the chosen method at `sweep_count` values of its speed knob (SpeCa's threshold, SpecDiff's
        cache rate, TaylorSeer's interval, FirstBlockCache's threshold) from `sweep_from` to `sweep_to` (default:
        the knob's slider range) on this prompt and seed; streams (plot, table, point choices)."""
        session = session if isinstance(session, Session) else Session()
        try:
            spec, method, config, _, model = self.parse(dict(controls, compare=False))
            values, knob = self._sweep_values(method, sweep_from, sweep_to, sweep_count)
            work = self.limits.work(spec.steps, spec.width, spec.height, spec.frames, False) * (len(values) + 1)
            if work > self.limits.max_work:
                raise InputError(f"this sweep is too large for this server: {len(values) + 1} runs = {work:.0f} M "
                                 f"pixel-steps, at most {self.limits.max_work:g} M: fewer points, steps or pixels")
        except Exception as e:
            raise user_error(e) from None
        stop = session.new_run()
        ticket = model.line.join(f"{method.label} sweep, {len(values)} runs")
        try:
            while not ticket.wait(timeout=self.every_s):
                if stop.is_set():
                    return
                yield (gr.skip(), f"Waiting for **{md_text(model.preset.name)}**: {ticket.position()} run(s) "
                                  "before yours.", gr.skip())
            yield from self._sweep_turn(model, spec, method, config, knob, values, stop, session)
        except Exception as e:
            raise user_error(e) from None
        finally:
            ticket.leave()

    @staticmethod
    def _sweep_values(method: LM.LabMethod, lo, hi, count):
        name = method.speed_knob
        if name is None:
            raise InputError(f"{method.label} has no speed knob to sweep: pick SpeCa, SpecDiff, TaylorSeerCache or "
                             "FirstBlockCache")
        knob = next(k for k in method.knobs() if k.name == name)
        s_lo, s_hi, _ = knob.slider()
        lo = s_lo if lo is None or lo == 0 else R.as_float("sweep from", lo)  # 0: the page's empty box
        hi = s_hi if hi is None or hi == 0 else R.as_float("sweep to", hi)  # 0: an empty box in the page
        count = R.as_int("sweep points", count)
        if not 2 <= count <= 8:
            raise InputError(f"sweep points={count} is out of range: use 2..8")
        if not lo < hi:
            raise InputError(f"sweep from={lo:g} must be below sweep to={hi:g}")
        values = [lo + (hi - lo) * i / (count - 1) for i in range(count)]
        values = sorted({int(round(v)) for v in values}) if knob.kind == "int" else [round(v, 4) for v in values]
        for v in values:
            LM.coerce(method, knob, v)  # names the control if a value is out of the knob's range
        return values, knob

    def _sweep_turn(self, model, spec, method, config, knob, values, stop, session):
        full_cfg = LM.by_label(LM.FULL).build({})
        ref = R.run_to_end(model, spec, full_cfg, stop=stop)
        if ref.stopped:
            return
        self.full_cache.put(spec, ref.result, ref.trace)
        full_ms = ref.trace.summary()["measured_ms"]
        points, runs = [], []
        others = [p for label, p in session.points.get(spec.key(), {}).items() if label != method.label
                  and p.get("measured") is not None]
        for v in values:
            cfg = type(config)(**dict(config.to_dict(), **{knob.name: v}))
            run = R.run_to_end(model, spec, cfg, stop=stop)
            if run.stopped:
                break
            # the full run again right after: each point's measured speedup is a back-to-back pair
            full = R.run_to_end(model, spec, full_cfg, stop=stop)
            if full.stopped:
                break
            run.trace.meta["run"] = self._run_meta(spec, method, cfg)
            s = run.trace.summary()
            mine = s["measured_ms"]
            label = f"{knob.label} {v:.3g}"
            points.append(dict(label=label, value=v, psnr=C.psnr(run.result.pixels(), ref.result.pixels()),
                               ssim=C.ssim(run.result.pixels(), ref.result.pixels()),
                               measured=full.trace.summary()["measured_ms"] / mine if mine else None,
                               ideal=s["ideal_speedup"]))
            runs.append((label, run.result, run.trace))
            yield (V.sweep_figure(points, others, title=f"{method.label}: speedup vs PSNR, by {knob.label} "
                                                          f"({len(points)}/"
                                                          f"{len(values)})"), _sweep_table(points, full_ms), gr.skip())
        session.sweep = runs
        yield (V.sweep_figure(points, others, title=f"{method.label}: speedup vs PSNR, by {knob.label}"),
               _sweep_table(points, full_ms), gr.update(choices=[r[0] for r in runs], value=None, interactive=True))

    def pick(self, label, session: Session | None = None):
        """Load one point of the latest sweep: its image, summary, panels and trace."""
        runs = session.sweep if isinstance(session, Session) else []
        hit = next((r for r in runs if r[0] == label), None)
        if hit is None:
            raise gr.Error("no such point in this session's latest sweep: run a sweep first")
        _, result, trace = hit
        return (result.image, summary_markdown(trace, {"note": f"sweep point: {md_text(label)}"}),
                *trace_panels(trace).values(), _slider_update(trace), trace)

    # ---- replay -------------------------------------------------------------------------------------
    PLAY_OUTPUTS = ("maps_plot", "step", "timeline_plot", "error_plot")

    def play(self, trace, frame=None, session: Session | None = None):
        """Play: the run again, step by step from its trace (a run on the bundled models is over too fast to
        watch): the timeline and the error plot grow as they did live, the token maps and the step slider follow
        the latest step with maps; it ends on the whole run. Yields updates of `PLAY_OUTPUTS`."""
        if not isinstance(trace, Trace):
            raise gr.Error("nothing to play: run or load a trace first")
        frame = None if frame is None else R.as_int("frame", frame)
        ref = session.reference if isinstance(session, Session) else None
        ref = ref[1] if ref is not None and ref[0] is trace else None
        # the same trace growing from its records (the pre-run calls came first, as they did in the run)
        partial = dataclasses.replace(trace, steps=[], overhead=list(trace.overhead))
        records = sorted(trace.steps, key=lambda r: r.step)
        with_maps = set(V.map_steps(trace))
        shown, i = None, 0
        for s in sorted({r.step for r in records}):
            while i < len(records) and records[i].step == s:
                partial.append(records[i])
                i += 1
            panels = trace_panels(partial, ref=ref)
            if s in with_maps:
                shown = s
                maps, step = V.token_maps_figure(partial, step=s, frame=frame), gr.update(value=s)
            elif shown is None:
                maps, step = V.empty_figure(f"no token maps up to step {s} (SpeCa records them on verified "
                                            "steps)", title=f"token maps — step {s}"), gr.skip()
            else:
                maps, step = gr.skip(), gr.skip()
            yield (maps, step, panels["timeline_plot"],
                   panels["error_plot"] if trace.method == "speca" else gr.skip())
            time.sleep(self.play_delay_s)

    # ---- restoring a loaded trace's view ------------------------------------------------------------
    def restore(self, trace) -> dict:
        """Control values from a trace's `meta["run"]` (checked: a loaded file is untrusted); {} if it has none."""
        run = trace.meta.get("run") if isinstance(trace, Trace) else None
        if not isinstance(run, dict):
            return {}
        out = {}
        if run.get("model") in self.manager.presets:
            out["model"] = run["model"]
        if isinstance(run.get("prompt"), str) and len(run["prompt"]) <= self.limits.max_prompt_chars:
            out["prompt"] = run["prompt"]
        for name in ("seed", "steps", "width", "height", "frames"):
            try:
                out[name] = R.as_int(name, run.get(name))
            except InputError:
                pass
        try:
            out["guidance"] = R.as_float("guidance", run.get("guidance"))
        except InputError:
            pass
        method = next((m for m in LM.TABLE if m.label == run.get("method")), None)
        if method is not None:
            out["method"] = method.label
            config = run.get("config") if isinstance(run.get("config"), dict) else {}
            for k in method.knobs():
                if k.name in config:
                    try:
                        out[method.param(k.name)] = LM.coerce(method, k, config[k.name])
                    except InputError:
                        pass
        return out

    # ---- the first page: a recorded example run ------------------------------------------------------
    EXAMPLE_OUTPUTS = ("preview", "image", "full_image", "summary", "error_plot", "timeline_plot", "maps_plot", "step",
                       "diff_plot", "trace")

    def example(self):
        """The recorded example (assets/examples/, `python -m scripts.lab.examples`) as the first page's panels,
        so a visitor sees what a run shows before pressing anything; skipped if the files are not there."""
        if self._example is None:
            try:
                from PIL import Image

                d = EXAMPLE_DIR
                trace = read_trace(os.path.join(d, "speca_trace.json"), self.limits)
                image = Image.open(os.path.join(d, "speca.png")).convert("RGB")
                full = Image.open(os.path.join(d, "full.png")).convert("RGB")
                with open(os.path.join(d, "speca_comparison.json")) as f:
                    extra = json.load(f)
                extra["note"] = ("**an example recorded with the bundled tiny FLUX** (its numbers are from that "
                                 "machine): press **Play** to step through it, or **Generate** for your own run")
                self._example = (image, image, full, summary_markdown(trace, extra), *trace_panels(trace).values(),
                                 _slider_update(trace), V.difference_figure(image, full), trace)
            except Exception:  # no example: the empty panels explain themselves
                log.info("no example run in %s", EXAMPLE_DIR)
                self._example = tuple(gr.skip() for _ in self.EXAMPLE_OUTPUTS)
        # a fresh copy of each update per page load: Gradio pops "value" out of an update dict it sends, so a
        # cached one would reach the second visitor without it (the step slider left at 0)
        return tuple(dict(x) if isinstance(x, dict) else x for x in self._example)

    # ---- post-run views ---------------------------------------------------------------------------
    @staticmethod
    def scrub(step, trace, frame=None):
        if not isinstance(trace, Trace):
            return V.empty_figure("no trace in this session (it expires after a while): run or load one",
                                  title="token maps")
        try:
            return V.token_maps_figure(trace, step=R.as_int("step", step),
                                       frame=None if frame is None else R.as_int("frame", frame))
        except Exception as e:
            raise user_error(e) from None

    def load_trace(self, file):
        """Load an exported trace JSON and show it (figures, summary, step slider)."""
        try:
            path = file if isinstance(file, str) else getattr(file, "path", None)
            if not isinstance(path, str) or not path:
                raise TraceError("choose a trace JSON file (exported by this lab or by accel's Trace.to_json)")
            trace = read_trace(path, self.limits)
            note = (f"loaded from {md_text(os.path.basename(path), 80)}: a trace has no pictures; the controls are "
                    "set to its run, press **Generate** to make them again")
            # the pictures of the run shown before would sit beside this trace's panels: cleared
            return (summary_markdown(trace, {"note": note}), *trace_panels(trace).values(), _slider_update(trace),
                    _frame_update(trace), None, None, None,
                    V.empty_figure("a loaded trace has no pictures: press Generate", title="difference"), trace)
        except Exception as e:
            raise user_error(e) from None


# ---- the UI ------------------------------------------------------------------------------------------------------
def knob_info(k) -> str:
    """A knob's help as a control's info text. Gradio's info renderer turns the help's formulas
    (`threshold * decay ** (i / n)`) into emphasis and shows Markdown escapes as they are: the formulas are
    written with x and ^ instead."""
    return k.help.replace("`", "").replace("**", "^").replace("*", "×")


def _knob_control(method: LM.LabMethod, k):
    """One control from a config knob: label, range, step and help text from the field's declaration."""
    kw = dict(value=method.default(k), label=k.label, info=knob_info(k), elem_id=f"speclab-{method.param(k.name)}")
    if k.kind == "bool":
        return gr.Checkbox(**kw)
    if k.kind == "choice":
        return gr.Dropdown(list(k.choices), **kw)
    bounds = k.slider()
    if bounds is not None and (bounds[1] - bounds[0]) / bounds[2] <= 2000:
        return gr.Slider(bounds[0], bounds[1], step=bounds[2], **kw)
    return gr.Number(minimum=k.minimum, maximum=k.maximum, precision=0 if k.kind == "int" else None, **kw)


def _method_controls(default: str):
    """Every method's group of controls (main knobs open, the others in an accordion), from the method table."""
    groups, controls = {}, {}
    for m in LM.TABLE:
        with gr.Group(visible=m.label == default) as groups[m.label]:
            knobs = m.knobs()
            for k in [k for k in knobs if m.is_main(k)]:
                controls[m.param(k.name)] = _knob_control(m, k)
            with gr.Accordion(f"{m.label}: advanced", open=False):
                for k in [k for k in knobs if not m.is_main(k)]:
                    controls[m.param(k.name)] = _knob_control(m, k)
        for name, (other, table) in m.linked.items():
            controls[m.param(name)].change(lambda v, t=table: gr.update(value=t[v]) if v in t else gr.skip(),
                                           controls[m.param(name)], controls[m.param(other)],
                                           api_visibility="private", queue=False)
    return groups, controls


CAPTIONS = {
    "maps": "**Token maps** at one step, one cell per image token: SpeCa's forecast error per token (verified steps), "
            "SpecDiff's importance and the level each token got (C1 computed, C2 reused, C3 history blend), "
            "FirstBlockCache's residual change. Scrub with the step slider, or press **Play**.",
    "timeline": "**Compute timeline**: one bar per step, its height the share of the model computed: blue full, "
                "green accepted forecast, red rejected (computed again), orange partial (SpecDiff), purple the "
                "pre-run. Below: full steps so far and the ideal speedup (compute, not time).",
    "error": "**Verification error** of each verified step against the threshold curve (SpeCa): above the line the "
             "forecast is rejected and the step computed. FirstBlockCache: its first block's residual change; "
             "above the threshold the step is computed, below it the cache is used. Methods that verify nothing "
             "leave it empty.",
    "diff": "**Difference** |this run − full run| per pixel, same seed and settings: dark is identical.",
}


def _caption(key: str):
    return gr.Markdown(CAPTIONS[key], elem_classes=["speclab-caption"], elem_id=f"speclab-caption-{key}")


def _size_controls(lab: Lab, P: M.Preset) -> dict:
    """Seed, steps, size, guidance, frames. Their first values are None (an API call that leaves them out gets the
    chosen model's defaults); the page fills them with the preset's on load."""
    c = {}
    with gr.Row():
        c["seed"] = gr.Number(0, label="seed", precision=0, minimum=0, info="same seed, same noise")
        c["steps"] = gr.Slider(1, P.max_steps, value=None, step=1, label="steps", elem_id="speclab-steps",
                               info="denoising steps")
    with gr.Row():
        c["width"] = gr.Slider(P.min_size, P.max_size, value=None, step=8, label="width", elem_id="speclab-width",
                               info="pixels, in the model's range (a size it cannot take is refused)")
        c["height"] = gr.Slider(P.min_size, P.max_size, value=None, step=8, label="height",
                                elem_id="speclab-height", info="pixels; more pixels, more tokens")
    c["guidance"] = gr.Slider(0, R.MAX_GUIDANCE, value=None, step=0.1, label="guidance",
                              info="used only by models with guidance embeds (FLUX.1-dev, HunyuanVideo); "
                                   "tiny FLUX has none")
    c["frames"] = gr.Slider(1, P.max_frames, value=None, step=4, label="frames (4k + 1)",
                            visible=P.is_video, elem_id="speclab-frames")
    for name in SIZE_CONTROLS:  # a Slider turns None into its minimum: the API default must stay None
        c[name].value = None
    return c


class PictureFiles:
    """The pictures of one `/generate` request as files, each encoded once, for Gradio to send as they are.

    `gr.Image` would encode a PIL picture at every update that carries it: the method's image goes out twice in
    compare mode (when its run ends, then with the comparison), the last preview again with the result. Here the same
    PIL object reuses its file. The formats are the components' (`PICTURE_FORMATS`): WebP at Gradio's quality
    (Pillow's default, 80) with the fastest effort (`method=0`), about 3x less time than Gradio's default effort at
    1024² for files of about the same size; JPEG previews as Gradio saved them. `Lab.generate` itself yields PIL
    pictures (its Python callers and tests); `build_app`'s `/generate` passes them through here."""

    SAVE = {"webp": dict(method=0), "jpeg": {}}

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[int, tuple] = {}  # id(picture) -> (weak reference to it, its file)
        self.encodes = 0
        """Pictures encoded (tests count them)."""

    def file(self, picture, fmt: str) -> str:
        hit = self.files.get(id(picture))
        if hit is not None and hit[0]() is picture:
            return hit[1]
        buf = io.BytesIO()
        picture.save(buf, fmt, **self.SAVE[fmt])
        data = buf.getvalue()
        folder = os.path.join(self.folder, hashlib.sha256(data).hexdigest())  # Gradio's cache layout
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"image.{fmt}")
        with open(path, "wb") as f:
            f.write(data)
        self.files[id(picture)] = (weakref.ref(picture), path)
        self.encodes += 1
        return path

    def update(self, values: tuple) -> tuple:
        """One update of `/generate` (`OUTPUTS` order) with its PIL pictures replaced by their files."""
        return tuple(self.file(v, PICTURE_FORMATS[k]) if k in PICTURE_FORMATS and isinstance(v, PILImage.Image)
                     else v for k, v in zip(OUTPUTS, values))


class SteadyOutputs:
    """One `/generate` request's updates with the outputs they leave as they are re-sent as last sent, not skipped.

    Gradio (6.31) handles `gr.skip()` like any property update: for each skipped output of each streamed update it
    builds a new component and regenerates its config (pydantic JSON schemas), about 2 ms an output on the server's
    event loop, holding the GIL that the pipeline's thread needs to issue its steps (run 3 of issue 13: 15-22 ms
    an update, most of it this). An output this request already sent goes again as the same value instead: Gradio's
    stream diff finds it unchanged and sends nothing, and postprocessing it costs little (figures go as Gradio's
    `PlotData`, serialised once here instead of by Gradio; pictures as the files `PictureFiles` wrote). A property
    update re-sends its value alone; the session's state (`trace`) is cheap to skip and is left alone. Outputs not
    yet sent in this request are still skipped (the run's first update sends them: `Lab._run_turn`)."""

    STATEFUL = ("trace",)

    def __init__(self):
        self.last: dict[str, object] = {}
        self.rebuilds = 0
        """Outputs passed on as property updates (Gradio rebuilds the component for each; tests count them)."""

    def update(self, values: tuple) -> tuple:
        out = []
        for k, v in zip(OUTPUTS, values):
            if k not in self.STATEFUL:
                if isinstance(v, dict) and v.get("__type__") == "update":
                    if len(v) == 1 and k in self.last:  # gr.skip(): the same value again
                        v = self.last[k]
                    else:
                        self.rebuilds += 1
                        if "value" in v:
                            self.last[k] = v["value"]
                else:
                    if hasattr(v, "to_plotly_json"):  # a plotly figure: serialised once, as gr.Plot would
                        v = PlotData(type="plotly", plot=v.to_json())
                    self.last[k] = v
            out.append(v)
        return tuple(out)


def _view_panels(P: M.Preset, limits: Limits) -> dict:
    v = {}
    with gr.Row(equal_height=True):
        pictures = dict(type="pil", height=230, min_width=100, interactive=False, buttons=["download", "fullscreen"],
                        elem_classes=["speclab-picture"])
        v["preview"] = gr.Image(label="live preview", elem_id="speclab-preview", format=PICTURE_FORMATS["preview"],
                                **pictures)
        v["image"] = gr.Image(label="this method", elem_id="speclab-image", format=PICTURE_FORMATS["image"],
                              **pictures)
        v["full_image"] = gr.Image(label="full run (same seed)", elem_id="speclab-full",
                                   format=PICTURE_FORMATS["full_image"], **pictures)
    v["video"] = gr.Video(label="video", visible=P.is_video, elem_id="speclab-video", interactive=False,
                          height=300)
    v["summary"] = gr.Markdown(summary_markdown(None), elem_id="speclab-summary")
    with gr.Row(equal_height=True):
        v["play"] = gr.Button("▶ Play", elem_id="speclab-play", scale=0, min_width=90)
        v["step"] = gr.Slider(0, 1, value=0, step=1, label="step (scrub the token maps)", interactive=False,
                              elem_id="speclab-step", scale=4)
        v["frame"] = gr.Slider(0, 1, value=0, step=1, label="frame (latent frame of the token maps)", visible=False,
                               elem_id="speclab-frame", scale=2)
    with gr.Row():  # the token maps wider: SpecDiff shows two maps side by side
        with gr.Column(scale=3, min_width=320):
            v["maps_plot"] = gr.Plot(V.empty_figure("token maps appear here during a run", "token maps"),
                                     label="token maps", elem_id="speclab-maps", show_label=False)
            _caption("maps")
        with gr.Column(scale=2, min_width=320):
            v["timeline_plot"] = gr.Plot(V.empty_figure("one bar per step, as the run goes", "compute timeline"),
                                         label="compute timeline", elem_id="speclab-timeline", show_label=False)
            _caption("timeline")
    with gr.Row():
        with gr.Column(min_width=320):
            v["error_plot"] = gr.Plot(V.empty_figure("SpeCa's verification errors (FirstBlockCache's residual "
                                                     "changes) appear here", "error vs threshold"),
                                      label="error vs threshold", elem_id="speclab-error", show_label=False)
            _caption("error")
        with gr.Column(min_width=320):
            v["diff_plot"] = gr.Plot(V.empty_figure("compare mode shows it here", "difference"),
                                     label="difference vs full run", elem_id="speclab-diff", show_label=False)
            _caption("diff")
    with gr.Accordion("Sweep: this method's speed/quality curve on this prompt", open=False, elem_id="speclab-sweep-box"):
        gr.Markdown("Runs the chosen method at several values of its speed knob (SpeCa's threshold, SpecDiff's "
                    "cache rate, TaylorSeer's interval, FirstBlockCache's threshold) and each against a full run "
                    "timed right after it; other methods you ran on this prompt appear as squares.",
                    elem_classes=["speclab-caption"])
        with gr.Row():
            v["sweep_from"] = gr.Number(None, label="from (0: the knob's lowest)", info="e.g. SpeCa threshold 1",
                                        elem_id="speclab-sweep-from")
            v["sweep_to"] = gr.Number(None, label="to (0: the knob's highest)", info="e.g. 15",
                                      elem_id="speclab-sweep-to")
            v["sweep_count"] = gr.Slider(2, 8, value=4, step=1, label="points", elem_id="speclab-sweep-count",
                                         info="settings tried, evenly spaced; each is a run and a full run")
        v["sweep_btn"] = gr.Button("Sweep", elem_id="speclab-sweep")
        v["sweep_plot"] = gr.Plot(V.sweep_figure([]), elem_id="speclab-sweep-plot", show_label=False)
        v["sweep_table"] = gr.Markdown("", elem_id="speclab-sweep-table")
        v["sweep_pick"] = gr.Dropdown([], label="load a point's run", interactive=True, elem_id="speclab-sweep-pick")
    with gr.Accordion("Export / load a trace", open=False):
        v["files"] = gr.File(label="trace JSON, trace CSV, exact config", file_count="multiple", interactive=False)
        v["upload"] = gr.File(label=f"load a trace JSON to view it (up to {limits.max_upload_mb:g} MB): the "
                                    "controls are restored; press Generate to make its image again",
                              file_types=[".json"], type="filepath", elem_id="speclab-upload")
    return v


def _on_model(presets: dict):
    def on_model(name, current_prompt):
        p = presets.get(name)
        if p is None:
            raise gr.Error("unknown model preset")
        examples = VIDEO_EXAMPLES if p.is_video else EXAMPLES
        switch = current_prompt in (EXAMPLES + VIDEO_EXAMPLES) and current_prompt not in examples
        index = EXAMPLES.index(current_prompt) if current_prompt in EXAMPLES else (
            VIDEO_EXAMPLES.index(current_prompt) if switch else 0)
        return (M.preset_status(name) if name in M.PRESETS else "",
                gr.update(value=examples[index]) if switch else gr.update(),
                gr.update(maximum=p.max_steps, value=p.steps),
                gr.update(minimum=p.min_size, maximum=p.max_size, value=p.width),
                gr.update(minimum=p.min_size, maximum=p.max_size, value=p.height),
                gr.update(value=p.guidance),
                gr.update(visible=p.is_video, maximum=p.max_frames, value=p.frames or 1),
                gr.update(visible=p.is_video),
                gr.update(visible=False, value=0),
                gr.update(value=False, **_compile_control(p)))

    return on_model


def _compile_control(p: M.Preset) -> dict:
    """The compile checkbox for preset `p`: usable on a GPU preset, greyed out with the reason otherwise."""
    if M.runs_on_gpu(p):
        return dict(interactive=True, label="compile (GPU)",
                    info="regional compilation of the transformer's blocks: the first run per method and size "
                         "compiles first (a warm-up shown as such), later runs are faster")
    return dict(interactive=False, label="compile (GPU only)",
                info=f"{p.name} runs on the CPU here: compiling would take longer than the run")


def _how(label: str) -> str:
    m = next((m for m in LM.TABLE if m.label == label), None)
    return m.how if m is not None else ""


HEADER = ("# SpecLab — speculative caching for diffusion transformers\n"
          "Skip work a diffusion transformer would redo: **forecast** features instead of computing them (SpeCa, "
          "TaylorSeer) or compute only the **tokens** that matter (SpecDiff). Pick a method, press **Generate**, "
          "and watch each step: full, forecast and accepted, rejected, or partial.")


SWITCH_INTERVAL_S = 0.001
"""The interpreter's thread switch interval while the lab serves (CPython's default: 5 ms). A short speculative step
(a CUDA graph replay) gives the GIL up and needs it back many times per step; while the lab's other threads build a
streamed update's figures or Gradio processes it, each of those waits could last up to the interval. The H100 run 3
(README, "The lab at GPU scale") measured SpeCa's and SpecDiff's denoiser 9-10 % slower in the lab than bare; the
simulation `python -m scripts.lab.gil_contention` gives +8-10 % at 5 ms and +2-6 % at 1 ms over 5 runs on a 2-core CPU
(not yet measured on a GPU)."""


def build_app(lab: Lab | None = None) -> gr.Blocks:
    lab = lab or Lab()
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    presets = lab.manager.presets
    default_preset = M.DEFAULT_PRESET if M.DEFAULT_PRESET in presets else next(iter(presets))
    P = presets[default_preset]
    ttl = lab.limits.trace_ttl_s

    with gr.Blocks(title="SpecLab", delete_cache=(int(min(ttl, 600)), int(ttl))) as demo:
        gr.Markdown(HEADER, elem_id="speclab-header")
        session = gr.State(Session())  # each session gets its own copy; ended by _forget_session
        trace_state = gr.State(None, time_to_live=ttl)
        run = {}
        with gr.Row(elem_id="speclab-main"):
            with gr.Column(scale=1, min_width=300, elem_id="speclab-controls"):
                run["model"] = gr.Dropdown(list(presets), value=default_preset, label="model",
                                           elem_id="speclab-model")
                status = gr.Markdown(M.preset_status(default_preset) if default_preset in M.PRESETS else "",
                                     elem_classes=["speclab-caption"])
                run["method"] = gr.Radio(LM.METHODS, value=LM.SPECA, label="method", elem_id="speclab-method")
                how = gr.Markdown(_how(LM.SPECA), elem_id="speclab-how", elem_classes=["speclab-how"])
                groups, knobs = _method_controls(LM.SPECA)
                run["target_speedup"] = gr.Number(
                    0, label="target speedup (0: off)", minimum=0, maximum=20, elem_id="speclab-target",
                    info="instead of setting the threshold / cache rate / interval: the lab finds the value whose "
                         "ideal speedup (compute) is this on your prompt, by bisection (a few extra runs)")
                run["compare"] = gr.Checkbox(True, label="compare with the full run", elem_id="speclab-compare",
                                             info="also runs the full pipeline right after: PSNR, SSIM, and the "
                                                  "measured speedup from both timed back to back")
                run["compile"] = gr.Checkbox(False, **_compile_control(P), elem_id="speclab-compile")
                with gr.Accordion("size, steps, seed", open=True):
                    run.update(_size_controls(lab, P))
            with gr.Column(scale=3, elem_id="speclab-results"):
                with gr.Row(equal_height=True):
                    run["prompt"] = gr.Textbox(EXAMPLES[0], label="prompt", lines=2, scale=4, min_width=250,
                                               max_length=lab.limits.max_prompt_chars, elem_id="speclab-prompt")
                    with gr.Column(scale=1, min_width=130):
                        run_btn = gr.Button("Generate", variant="primary", elem_id="speclab-generate")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="speclab-stop", size="sm")
                view = _view_panels(P, lab.limits)
                with gr.Accordion("example prompts", open=False):
                    gr.Examples([[e] for e in EXAMPLES], inputs=[run["prompt"]], label="images")
                    gr.Examples([[e] for e in VIDEO_EXAMPLES], inputs=[run["prompt"]], label="video")
        view["trace"] = trace_state

        def generate(session: Session = None, **controls):
            pictures, steady = PictureFiles(view["image"].GRADIO_CACHE), SteadyOutputs()
            for values in lab.generate(session, **controls):
                yield steady.update(pictures.update(values))

        knob_names = list(knobs)
        _with_signature(generate, RUN_CONTROLS + tuple(knob_names))
        generate.__doc__ = lab.api_doc()
        knob_controls = list(knobs.values())

        def show_knobs(trace, target=None):
            """The knobs of the run now shown (its method's, from the trace): the value a target speedup found,
            or a sweep point's setting; left as they are after a run that used the knobs as set."""
            values = lab.restore(trace) if target is None or (isinstance(target, (int, float)) and target > 0) else {}
            return [gr.update(value=values[k]) if k in values else gr.skip() for k in knob_names]

        run_btn.click(generate, inputs_kwargs={"session": session, **{k: run[k] for k in RUN_CONTROLS}, **knobs},
                      outputs=[view[k] for k in OUTPUTS], api_name="generate",
                      concurrency_limit=lab.limits.waiting,
                      # progress (and an error's badge) on the summary only: the panels stay readable as they stream
                      show_progress_on=[view["summary"]],
                      preprocess=False,  # raw values to Lab.parse: Gradio's Radio/Dropdown echo a bad value whole
                      ).success(show_knobs, [trace_state, run["target_speedup"]], knob_controls,
                                api_visibility="private", queue=False, show_progress="hidden")
        stop_btn.click(lab.stop, session, None, queue=False, api_name="stop")

        def sweep(session: Session = None, sweep_from=None, sweep_to=None, sweep_count=4, **controls):
            yield from lab.sweep(session, sweep_from, sweep_to, sweep_count, **controls)

        _with_signature(sweep, ("sweep_from", "sweep_to", "sweep_count") + RUN_CONTROLS + tuple(knob_names))
        sweep.__doc__ = Lab.sweep.__doc__
        view["sweep_btn"].click(
            sweep, inputs_kwargs={"session": session, "sweep_from": view["sweep_from"], "sweep_to": view["sweep_to"],
                                  "sweep_count": view["sweep_count"], **{k: run[k] for k in RUN_CONTROLS}, **knobs},
            outputs=[view["sweep_plot"], view["sweep_table"], view["sweep_pick"]], api_name="sweep",
            show_progress_on=[view["sweep_table"]],
            concurrency_limit=lab.limits.waiting, preprocess=False)
        view["sweep_pick"].input(
            lambda label, s: lab.pick(label, s), [view["sweep_pick"], session],
            [view[k] for k in ("image", "summary", "error_plot", "timeline_plot", "maps_plot", "step")] + [trace_state],
            api_visibility="private").success(show_knobs, trace_state, knob_controls, api_visibility="private",
                                              queue=False, show_progress="hidden")
        view["play"].click(lab.play, [trace_state, view["frame"], session], [view[k] for k in Lab.PLAY_OUTPUTS],
                           api_visibility="private", concurrency_limit=None)
        run["method"].change(lambda m: [gr.update(visible=m == label) for label in groups] + [_how(m)],
                             run["method"], list(groups.values()) + [how], api_visibility="private", queue=False)
        model_outputs = [status, run["prompt"], run["steps"], run["width"], run["height"], run["guidance"],
                         run["frames"], view["video"], view["frame"], run["compile"]]
        run["model"].change(_on_model(presets), [run["model"], run["prompt"]], model_outputs,
                            api_visibility="private", queue=False)
        on_model = _on_model(presets)

        def on_load(model, prompt):  # one event: the preset's size controls, then the example's panels
            return (*on_model(model, prompt), *lab.example())

        demo.load(on_load, [run["model"], run["prompt"]],
                  model_outputs + [view[k] for k in Lab.EXAMPLE_OUTPUTS], api_visibility="private", queue=False)
        for slider in (view["step"], view["frame"]):
            slider.input(lab.scrub, [view["step"], trace_state, view["frame"]], view["maps_plot"],
                         api_visibility="private", concurrency_limit=None)
        restorable = [run[k] for k in RUN_CONTROLS if k not in ("compare", "target_speedup")] + list(knobs.values())
        restorable_keys = [k for k in RUN_CONTROLS if k not in ("compare", "target_speedup")] + knob_names

        def restore(trace):
            values = lab.restore(trace)
            return [gr.update(value=values[k]) if k in values else gr.skip() for k in restorable_keys]

        view["upload"].upload(lab.load_trace, view["upload"],
                              [view[k] for k in ("summary", "error_plot", "timeline_plot", "maps_plot", "step",
                                                 "frame", "preview", "image", "full_image", "diff_plot")]
                              + [trace_state],
                              api_name="load_trace", concurrency_limit=1,  # one trace parsed at a time: bounds
                              # the memory of parsing (a 20 MB trace is briefly millions of Python objects)
                              ).success(restore, trace_state, restorable, api_visibility="private", queue=False)
        demo.unload(_forget_session(demo, lab, session))
    demo.lab = lab
    return demo


def _with_signature(fn, names) -> None:
    """Give `fn` (which takes **controls) a signature naming every control with a default of None: the API then
    lists each as optional, and a control left out reaches `Lab.parse` as None (the model's default)."""
    params = [inspect.Parameter("session", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    fn.__signature__ = inspect.Signature(params)


def _forget_session(demo: gr.Blocks, lab: Lab, session_state: gr.State):
    """When a tab closes (its heartbeat ends), forget the session at once: its run files go (`Lab.end_session`),
    then its state. Gradio would keep a closed session's state for an hour whatever the states' time-to-live,
    would call no delete_callback for a state that was only read (our `Session`), and keeps the session's copy
    of every component's last value (the figures, the inputs, a 50 MB prompt...) until 'state_session_capacity'
    newer sessions push it out; dropping the entry frees all of it, and the freed memory goes back to the OS.
    A client that comes back with the same session hash starts afresh."""

    def forget(request: gr.Request):
        holder = getattr(demo, "state_holder", None)
        sid = getattr(request, "session_hash", None)
        if holder is None or not sid or sid not in holder:
            return
        lab.end_session(holder.session_data[sid].state_data.get(session_state._id))
        holder.delete_state(sid)
        with holder.lock:
            holder.session_data.pop(sid, None)
            holder.time_last_used.pop(sid, None)
        give_back_memory()

    return forget


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="SpecLab: the Gradio lab")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    ap.add_argument("--max-work", type=float, default=None,
                    help="largest request in million pixel-steps (steps x pixels x frames, x2 in compare mode); "
                         "default: SPECLAB_MAX_WORK or 400")
    ap.add_argument("--max-upload-mb", type=float, default=None,
                    help="largest trace upload in MB; default: SPECLAB_MAX_UPLOAD_MB or 20")
    ap.add_argument("--model", action="append", default=[], metavar="PATH",
                    help="add a preset for a local diffusers FLUX or HunyuanVideo pipeline folder (repeatable; the "
                         f"first becomes the default); also {M.MODEL_ENV}=PATH[{os.pathsep}PATH...]")
    ap.add_argument("--trace-ttl", type=float, default=None, dest="trace_ttl_s",
                    help="seconds a session keeps its trace and Gradio its cached files; default: "
                         "SPECLAB_TRACE_TTL_S or 3600")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        added = M.add_folder_presets(list(args.model) + M.folders_from_env())
    except M.ModelError as e:
        ap.error(str(e))
    for name in added:
        log.info("model preset %r from %s", name, M.PRESETS[name].source)
    release_large_blocks_at_once()
    limits = Limits.from_env(max_work=args.max_work, max_upload_mb=args.max_upload_mb, trace_ttl_s=args.trace_ttl_s)
    demo = build_app(Lab(limits=limits, gpu=GPU))
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **page_options(),
                show_error=False, max_file_size=int(limits.max_upload_mb * 1e6), state_session_capacity=1000)


if __name__ == "__main__":
    main()

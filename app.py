"""SpecLab — the Gradio lab: pick a model and a method, tune it, press Generate, watch it work step by step.

    python app.py                      # http://127.0.0.1:7860, bundled tiny FLUX on the CPU
    python app.py --port 7861 --host 0.0.0.0 --max-work 100

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
import html
import json
import logging
import math
import os
import re
import uuid

import gradio as gr

import visualizers as V
from accel.trace import Trace
from lab import compare as C
from lab import methods as LM
from lab import models as M
from lab import runner as R
from lab.errors import InputError, LabError
from lab.limits import Limits
from lab.session import RunFiles, Session, give_back_memory, release_large_blocks_at_once
from lab.traces import TraceError, read_trace

log = logging.getLogger("speclab")

try:  # Hugging Face Spaces (ZeroGPU): run each generation on a GPU slice
    import spaces

    GPU = spaces.GPU(duration=240)
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
RUN_CONTROLS = ("model", "prompt", "seed", "steps", "width", "height", "guidance", "frames", "method", "compare")
OUTPUTS = ("preview", "image", "summary", "error_plot", "timeline_plot", "maps_plot", "step", "full_image",
           "diff_plot", "files", "video", "frame", "trace")
"""What every update of `/generate` carries, in this order (the trace goes to the session's state, not the API)."""

CSS = """
#speclab-controls .form { gap: 6px; }
#speclab-preview img, #speclab-image img { image-rendering: auto; }
"""


# ---- errors and Markdown ---------------------------------------------------------------------------------------
def user_error(e: BaseException) -> gr.Error:
    """Our messages as they are; anything else logged with an id, and only the id shown."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, LabError) and str(e):
        return gr.Error(str(e))
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
    lines = [
        f"**{md_text(trace.method, 60)}** on {md_text(trace.model, 80)} — step {done}/{trace.num_steps}"
        + (" — **stopped**" if extra.get("stopped") else "") + (" — running…" if extra.get("running") else ""),
        f"full {s['full_steps']} · accepted {s['accepted_steps']} · rejected {s['rejected_steps']} · "
        f"partial {s['partial_steps']}" + (f" · pre-run calls {s['overhead_calls']}" if s["overhead_calls"] else ""),
        f"ideal speedup **{_fmt_speedup(s['ideal_speedup'])}** ({s['blocks_computed']:g}/{s['blocks_plain']} "
        f"block computations) · denoiser time {s['measured_ms'] / 1000:.2f} s",
    ]
    if extra.get("measured_speedup") is not None:
        lines.append(f"measured speedup vs the full run **{_fmt_speedup(extra['measured_speedup'])}** "
                     f"(full run {extra['full_ms'] / 1000:.2f} s)")
    if extra.get("psnr") is not None:
        p = extra["psnr"]
        lines.append(f"vs the full run: PSNR **{'∞' if math.isinf(p) else f'{p:.2f}'} dB** · "
                     f"SSIM **{extra['ssim']:.4f}**")
    if extra.get("note"):
        lines.append(extra["note"])
    lines.append("config: " + md_text(json.dumps(trace.config, separators=(",", ":")), 600))
    return "  \n".join(lines)


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


def trace_panels(trace: Trace, **extra) -> dict:
    """The per-step figures of a trace."""
    return dict(error_plot=V.error_figure(trace), timeline_plot=V.timeline_figure(trace, reference=extra.get("ref")),
                maps_plot=V.token_maps_figure(trace))


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class Lab:
    """Process-wide state of the lab: loaded models (each with its line of runs), the full-run cache, the run
    files and the limits. Per-session things live in the session's state (`lab.session.Session`, the trace)."""

    def __init__(self, manager: M.ModelManager | None = None, full_cache: R.FullRunCache | None = None,
                 every_s: float = 0.3, limits: Limits | None = None, files: RunFiles | None = None, gpu=None):
        self.manager = manager or M.ModelManager()
        self.full_cache = full_cache or R.FullRunCache()
        self.every_s = every_s
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
        frames = None
        if preset.is_video:
            frames = R.as_int("frames", preset.frames if c["frames"] is None else c["frames"])
        spec = R.RunSpec(preset.name, prompt, R.as_int("seed", c["seed"] or 0), R.as_int("steps", c["steps"]),
                         R.as_int("width", c["width"]), R.as_int("height", c["height"]),
                         R.as_float("guidance", c["guidance"] if c["guidance"] is not None else 0.0), frames)
        if not isinstance(c["compare"], (bool, type(None))):
            raise InputError("compare must be true or false")
        config = method.build(controls)
        model = self.manager.get(preset.name)
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
        final = None
        for up in R.stream_run(model, spec, config, stop=stop, every_s=self.every_s):
            if up.done:
                final = up
                break
            ticket.progress = f"step {up.step + 1}/{spec.steps}"
            if up.trace is not None:
                yield panels(preview=up.preview if up.preview is not None else gr.skip(),
                             summary=summary_markdown(up.trace, {"running": True}), **trace_panels(up.trace))
        trace, result = final.trace, final.result
        extra, ref, diff_note = {"stopped": final.stopped}, None, "tick 'compare with the full run' to see it"
        if final.stopped:
            extra["note"] = ("stopped: the image is the model's estimate of the clean image at the last step done; "
                             "no comparison with the full run")
            diff_note = "no comparison for a stopped run"
        elif compare:
            ref = self.full_cache.get(spec)
            if ref is None and method.label == LM.FULL:
                self.full_cache.put(spec, result, trace)
                ref = (result, trace)
            if ref is None:
                ticket.progress = "the full reference run"
                yield panels(preview=final.preview if final.preview is not None else gr.skip(), image=result.image,
                             summary=summary_markdown(trace, {"note": "running the full reference run (cached for "
                                                                      "this model/prompt/seed/size/steps)…"}),
                             step=_slider_update(trace), trace=trace, **trace_panels(trace))
                ref = self._reference(model, spec, stop)
                if ref is None:
                    extra["note"] = diff_note = "the full reference run was stopped: no comparison"
        comparison = C.compare(result, trace, *ref) if ref is not None else None
        if comparison is not None:
            extra.update(comparison.as_summary())
        files = self._export(session, trace, spec, result)
        yield panels(preview=final.preview if final.preview is not None else result.image, image=result.image,
                     summary=summary_markdown(trace, extra), **trace_panels(trace, ref=ref[1] if ref else None),
                     step=_slider_update(trace), full_image=ref[0].image if ref else None,
                     diff_plot=comparison.difference if comparison else V.empty_figure(diff_note, title="difference"),
                     files=files, video=next((f for f in files if f.endswith(".mp4")), None),
                     frame=_frame_update(trace), trace=trace)

    def _reference(self, model, spec, stop):
        stop.clear()  # a Stop that came as the accelerated run ended must not cancel the reference
        ref = R.run_to_end(model, spec, LM.by_label(LM.FULL).build({}), stop=stop)
        if ref.stopped:
            return None
        self.full_cache.put(spec, ref.result, ref.trace)
        return ref.result, ref.trace

    def _export(self, session, trace: Trace, spec: R.RunSpec, result) -> list[str]:
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
        return [base + "_trace.json", base + "_trace.csv", base + "_config.json"] + result.export(
            d, f"speclab_{trace.method}")

    @staticmethod
    def api_doc() -> str:
        """The `/generate` parameters, with each knob's help (the config's own words)."""
        lines = ["Run a method and stream its updates.", "", "Args:"]
        run = dict(model=f"model preset: {', '.join(M.PRESETS)}", prompt="text prompt", seed="random seed",
                   steps="denoising steps", width="image width in pixels", height="image height in pixels",
                   guidance="guidance scale (models with guidance embeds, HunyuanVideo)",
                   frames="video presets only: number of frames (4k + 1)", method=f"one of {LM.METHODS}",
                   compare="also run (or reuse) the full run: PSNR/SSIM, measured speedup, difference map")
        lines += [f"    {k}: {v}." for k, v in run.items()]
        for m in LM.TABLE:
            lines += [f"    {m.param(k.name)}: {m.label}, {k.label} ({k.allowed()}): {k.help}" for k in m.knobs()]
        return "\n".join(lines)

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
            return (summary_markdown(trace, {"note": f"loaded from {md_text(os.path.basename(path), 80)}"}),
                    *trace_panels(trace).values(), _slider_update(trace), _frame_update(trace), trace)
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
    kw = dict(value=k.default, label=k.label, info=knob_info(k), elem_id=f"speclab-{method.param(k.name)}")
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


def _run_controls(lab: Lab, default_preset: str) -> dict:
    P = lab.manager.presets[default_preset]
    c = {"model": gr.Dropdown(list(lab.manager.presets), value=default_preset, label="model",
                              elem_id="speclab-model")}
    c["status"] = gr.Markdown(M.preset_status(default_preset) if default_preset in M.PRESETS else "")
    c["prompt"] = gr.Textbox(EXAMPLES[0], label="prompt", lines=2, max_length=lab.limits.max_prompt_chars)
    gr.Examples([[e] for e in EXAMPLES], inputs=[c["prompt"]], label="example prompts")
    gr.Examples([[e] for e in VIDEO_EXAMPLES], inputs=[c["prompt"]], label="example prompts (video)")
    with gr.Row():
        c["seed"] = gr.Number(0, label="seed", precision=0, minimum=0)
        c["steps"] = gr.Slider(1, P.max_steps, value=P.steps, step=1, label="steps", elem_id="speclab-steps")
    with gr.Row():
        c["width"] = gr.Slider(P.min_size, P.max_size, value=P.width, step=8, label="width", elem_id="speclab-width")
        c["height"] = gr.Slider(P.min_size, P.max_size, value=P.height, step=8, label="height",
                                elem_id="speclab-height")
    c["guidance"] = gr.Slider(0, R.MAX_GUIDANCE, value=P.guidance, step=0.1, label="guidance",
                              info="used only by models with guidance embeds (FLUX.1-dev, HunyuanVideo); "
                                   "tiny FLUX has none")
    c["frames"] = gr.Slider(1, P.max_frames, value=P.frames or 9, step=4, label="frames (4k + 1)",
                            visible=P.is_video, elem_id="speclab-frames")
    return c


def _view_panels(P: M.Preset, limits: Limits) -> dict:
    v = {}
    with gr.Row():
        v["preview"] = gr.Image(label="preview (latent decode, live)", type="pil", height=260,
                                elem_id="speclab-preview", interactive=False)
        v["image"] = gr.Image(label="image (VAE)", type="pil", height=260, elem_id="speclab-image", interactive=False)
        v["full_image"] = gr.Image(label="full run (same seed)", type="pil", height=260, elem_id="speclab-full",
                                   interactive=False)
    v["video"] = gr.Video(label="video (mp4)", visible=P.is_video, elem_id="speclab-video", interactive=False,
                          height=300)
    v["summary"] = gr.Markdown(summary_markdown(None), elem_id="speclab-summary")
    with gr.Row():
        v["error_plot"] = gr.Plot(V.empty_figure("press Generate", "verification error vs threshold"),
                                  label="error vs threshold", elem_id="speclab-error")
        v["timeline_plot"] = gr.Plot(V.empty_figure("press Generate", "compute timeline"), label="compute timeline",
                                     elem_id="speclab-timeline")
    with gr.Row():
        v["maps_plot"] = gr.Plot(V.empty_figure("press Generate", "token maps"), label="token maps",
                                 elem_id="speclab-maps")
        v["diff_plot"] = gr.Plot(V.empty_figure("compare mode shows it here", "difference"),
                                 label="difference vs full run", elem_id="speclab-diff")
    v["step"] = gr.Slider(0, 1, value=0, step=1, label="step (scrub the token maps)", interactive=False,
                          elem_id="speclab-step")
    v["frame"] = gr.Slider(0, 1, value=0, step=1, label="frame (latent frame of the token maps)", visible=False,
                           elem_id="speclab-frame")
    with gr.Accordion("Export / load a trace", open=False):
        v["files"] = gr.File(label="trace JSON, trace CSV, exact config", file_count="multiple", interactive=False)
        v["upload"] = gr.File(label=f"load a trace JSON to view it (up to {limits.max_upload_mb:g} MB)",
                              file_types=[".json"], type="filepath")
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
                gr.update(visible=False, value=0))

    return on_model


def build_app(lab: Lab | None = None) -> gr.Blocks:
    lab = lab or Lab()
    presets = lab.manager.presets
    default_preset = M.DEFAULT_PRESET if M.DEFAULT_PRESET in presets else next(iter(presets))
    ttl = lab.limits.trace_ttl_s

    with gr.Blocks(title="SpecLab", delete_cache=(int(min(ttl, 600)), int(ttl))) as demo:
        gr.Markdown("# SpecLab — speculative caching for diffusion transformers\n"
                    "Pick a model and a method, tune it, press **Generate** and watch every step: full, "
                    "speculative (accepted), rejected or partial.")
        session = gr.State(Session())  # each session gets its own copy; ended by _forget_session
        trace_state = gr.State(None, time_to_live=ttl)
        with gr.Row():
            with gr.Column(scale=1, min_width=320, elem_id="speclab-controls"):
                run = _run_controls(lab, default_preset)
                run["method"] = gr.Radio(LM.METHODS, value=LM.SPECA, label="method")
                groups, knobs = _method_controls(LM.SPECA)
                run["compare"] = gr.Checkbox(True, label="compare with the full run (cached per "
                                                         "model/prompt/seed/size/steps)")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="speclab-generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="speclab-stop")
            with gr.Column(scale=2):
                view = _view_panels(presets[default_preset], lab.limits)
        view["trace"] = trace_state

        def generate(session: Session = None, **controls):
            yield from lab.generate(session, **controls)

        generate.__doc__ = lab.api_doc()
        run_btn.click(generate, inputs_kwargs={"session": session, **{k: run[k] for k in RUN_CONTROLS}, **knobs},
                      outputs=[view[k] for k in OUTPUTS], api_name="generate",
                      concurrency_limit=lab.limits.waiting,
                      preprocess=False)  # raw values to Lab.parse: Gradio's Radio/Dropdown echo a bad value whole
        stop_btn.click(lab.stop, session, None, queue=False, api_name="stop")
        run["method"].change(lambda m: [gr.update(visible=m == label) for label in groups], run["method"],
                             list(groups.values()), api_visibility="private", queue=False)
        run["model"].change(_on_model(presets), [run["model"], run["prompt"]],
                            [run["status"], run["prompt"], run["steps"], run["width"], run["height"],
                             run["guidance"], run["frames"], view["video"], view["frame"]],
                            api_visibility="private", queue=False)
        for slider in (view["step"], view["frame"]):
            slider.input(lab.scrub, [view["step"], trace_state, view["frame"]], view["maps_plot"],
                         api_visibility="private", concurrency_limit=None)
        view["upload"].upload(lab.load_trace, view["upload"],
                              [view[k] for k in ("summary", "error_plot", "timeline_plot", "maps_plot", "step",
                                                 "frame")] + [trace_state],
                              api_name="load_trace", concurrency_limit=1)  # one trace parsed at a time: bounds
        # the memory of parsing (a 20 MB trace is briefly millions of Python objects) and what it leaves fragmented
        demo.unload(_forget_session(demo, lab, session))
    demo.lab = lab
    return demo


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
    ap.add_argument("--trace-ttl", type=float, default=None, dest="trace_ttl_s",
                    help="seconds a session keeps its trace and Gradio its cached files; default: "
                         "SPECLAB_TRACE_TTL_S or 3600")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    release_large_blocks_at_once()
    limits = Limits.from_env(max_work=args.max_work, max_upload_mb=args.max_upload_mb, trace_ttl_s=args.trace_ttl_s)
    demo = build_app(Lab(limits=limits, gpu=GPU))
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Soft(), css=CSS,
                show_error=False, max_file_size=int(limits.max_upload_mb * 1e6), state_session_capacity=1000)


if __name__ == "__main__":
    main()

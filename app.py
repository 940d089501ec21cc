"""SpecLab — the Gradio lab: pick a model and a method, tune it, press Generate, watch it work step by step.

    python app.py                      # http://127.0.0.1:7860, bundled tiny FLUX on the CPU
    python app.py --port 7861 --host 0.0.0.0

Thin by design: controls -> `accel` config (lab.runner.build_config) -> one streamed pipeline call
(lab.runner.stream_run) -> `accel.Trace` -> `visualizers` figures.

API (`gradio_client`): the Generate event is exposed as `/generate`; see `generate`'s docstring for its
inputs and outputs, e.g.

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/")
    out = c.predict(prompt="a large red circle on the left ...", method="SpeCa", api_name="/generate")
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading

import gradio as gr

import accel
import visualizers as V
from accel.trace import Trace
from lab import metrics
from lab import models as M
from lab import runner as R
from lab import video as VID

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
VIDEO_EXAMPLES = [  # captions of the bundled tiny HunyuanVideo's training clips (scripts/tinyvideo_data.py)
    "a large red circle moving left, on a gray background",
    "a small yellow triangle moving up, on a black background",
    "a large green square moving right, on a white background",
    "a small blue circle moving down, on a gray background",
]
SPECA_DEF = accel.SpeCaConfig()
SD_DEF = R.SpecDiffConfig() if R.SpecDiffConfig is not None else None
TS_DEF = accel.TaylorSeerConfig()
FBC_DEF = accel.FirstBlockConfig()
METRIC_THRESHOLDS = {"rel_l1": 7.0, "rel_l2": 0.15, "cosine": 0.05}

CSS = """
#speclab-controls .form { gap: 6px; }
#speclab-preview img, #speclab-image img { image-rendering: auto; }
"""


def _gr_error(e: BaseException) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, (M.ModelError, R.InputError, RuntimeError)) and str(e):
        return gr.Error(str(e))
    return gr.Error(f"the run failed: {type(e).__name__}: {e}")


def _fmt_speedup(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summary_markdown(trace: Trace | None, extra: dict | None = None) -> str:
    """The run's numbers as Markdown (also used for loaded traces)."""
    if trace is None:
        return "No run yet: pick a method and press **Generate**."
    extra = extra or {}
    s = trace.summary()
    done = max((r.step for r in trace.steps), default=-1) + 1
    lines = [
        f"**{trace.method}** on `{trace.model}` — step {done}/{trace.num_steps}"
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
    lines.append(f"config: `{json.dumps(trace.config, separators=(',', ':'))}`")
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


def _export(trace: Trace, run: dict) -> list[str]:
    d = tempfile.mkdtemp(prefix="speclab_")
    base = os.path.join(d, f"speclab_{trace.method}")
    trace.to_json(base + "_trace.json", indent=1)
    trace.to_csv(base + "_trace.csv")
    with open(base + "_config.json", "w") as f:
        json.dump({"method": trace.method, "config": trace.config, "run": run}, f, indent=2)
    return [base + "_trace.json", base + "_trace.csv", base + "_config.json"]


class Lab:
    """Process-wide state of the lab: loaded models, the full-run cache, per-session stop flags.
    Nothing per user lives here except the stop flags (keyed by session); traces live in gr.State."""

    def __init__(self, manager: M.ModelManager | None = None, full_cache: R.FullRunCache | None = None,
                 every_s: float = 0.3):
        self.manager = manager or M.ModelManager()
        self.full_cache = full_cache or R.FullRunCache()
        self.every_s = every_s
        self._stops: dict[str, threading.Event] = {}
        self._stops_lock = threading.Lock()

    def stop(self, request: gr.Request | None = None) -> None:
        sid = getattr(request, "session_hash", None) or "default"
        with self._stops_lock:
            ev = self._stops.get(sid)
        if ev is not None:
            ev.set()

    def _new_stop(self, request) -> threading.Event:
        sid = getattr(request, "session_hash", None) or "default"
        ev = threading.Event()
        with self._stops_lock:
            self._stops[sid] = ev
        return ev

    def generate(self, model, prompt, seed, steps, width, height, guidance, method, compare,
                 speca_threshold, speca_decay, speca_order, speca_min_spec, speca_max_spec, speca_warmup,
                 speca_metric, speca_on_reject,
                 sd_cache_rate, sd_spec_steps, sd_c2_share, sd_history, sd_starvation, sd_warmup,
                 ts_interval, ts_warmup, ts_order, fbc_threshold, frames=None, request: gr.Request = None):
        params = dict(locals())
        for k in ("self", "request"):
            params.pop(k)
        try:
            preset = self.manager.preset(str(model))
            n_frames = None
            if preset.is_video:
                n_frames = R.as_int("frames", preset.frames if frames is None else frames)
            params["frames"] = n_frames
            spec = R.RunSpec(str(model), str(prompt or ""), R.as_int("seed", seed), R.as_int("steps", steps),
                             R.as_int("width", width), R.as_int("height", height), float(guidance or 0.0),
                             n_frames)
            config = R.build_config(str(method), params)
            loaded = self.manager.get(spec.preset)
            R.validate_spec(spec, loaded)
        except Exception as e:
            raise _gr_error(e) from None
        stop = self._new_stop(request)
        skip = gr.skip()
        run_info = {k: params[k] for k in ("model", "prompt", "seed", "steps", "width", "height", "guidance")}
        if preset.is_video:
            run_info["frames"] = n_frames
        final = None
        try:
            for up in R.stream_run(loaded, spec, config, stop=stop, every_s=self.every_s):
                if up.done:
                    final = up
                    break
                t = up.trace
                if t is None:
                    continue
                yield (up.preview if up.preview is not None else skip, skip,
                       summary_markdown(t, {"running": True}), V.error_figure(t), V.timeline_figure(t),
                       V.token_maps_figure(t), skip, skip, skip, skip, skip, skip, skip)
            trace = final.trace
            extra = {"stopped": final.stopped}
            ref_image, ref_trace, diff = None, None, V.empty_figure("tick 'compare with the full run' to see "
                                                                    "the difference", title="difference")
            if compare and not final.stopped:
                cached = self.full_cache.get(spec)
                if cached is None and method == R.FULL:
                    self.full_cache.put(spec, final.image, trace, final.frames)
                    cached = (final.image, trace, final.frames)
                if cached is None:
                    yield (final.preview if final.preview is not None else skip, final.image, summary_markdown(trace, {
                        "note": "running the full reference run (cached for this model/prompt/seed/size/steps)…"}),
                        V.error_figure(trace), V.timeline_figure(trace), V.token_maps_figure(trace),
                        _slider_update(trace), skip, skip, skip, skip, skip, trace)
                    stop.clear()  # a Stop that came as the accelerated run ended must not cancel the reference
                    ref = R.run_to_end(loaded, spec, accel.FullConfig(), stop=stop)
                    if not ref.stopped:
                        self.full_cache.put(spec, ref.image, ref.trace, ref.frames)
                        cached = (ref.image, ref.trace, ref.frames)
                    else:
                        extra["note"] = "the full reference run was stopped: no comparison"
                        diff = V.empty_figure("the full reference run was stopped", title="difference")
                if cached is not None:
                    ref_image, ref_trace, ref_frames = cached
                    if final.frames and ref_frames:  # a video: PSNR/SSIM over all its frames (side by side)
                        a, b = VID.strip(final.frames, len(final.frames)), VID.strip(ref_frames, len(ref_frames))
                    else:
                        a, b = final.image, ref_image
                    extra["psnr"] = metrics.psnr(a, b)
                    extra["ssim"] = metrics.ssim(a, b)
                    diff = V.difference_figure(final.image, ref_image)
                    full_ms = ref_trace.summary()["measured_ms"]
                    mine = trace.summary()["measured_ms"]
                    extra["full_ms"] = full_ms
                    extra["measured_speedup"] = full_ms / mine if mine else None
            if final.stopped:
                extra["note"] = ("stopped: the image is the model's estimate of the clean image at the last step "
                                 "done; no comparison with the full run")
                diff = V.empty_figure("no comparison for a stopped run", title="difference")
            files = _export(trace, run_info)
            video = None
            if final.frames:
                video = VID.write_mp4(final.frames, preset.fps, os.path.join(os.path.dirname(files[0]),
                                                                               f"speclab_{trace.method}.mp4"))
                files.append(video)
            shown = final.preview if final.preview is not None else final.image
            yield (shown, final.image, summary_markdown(trace, extra), V.error_figure(trace),
                   V.timeline_figure(trace, reference=ref_trace), V.token_maps_figure(trace),
                   _slider_update(trace), ref_image, diff, files, video, _frame_update(trace), trace)
        except gr.Error:
            raise
        except Exception as e:
            raise _gr_error(e) from None

    # ---- post-run views ---------------------------------------------------------------------------
    @staticmethod
    def scrub(step, trace, frame=None):
        if trace is None:
            return V.empty_figure("no trace yet", title="token maps")
        return V.token_maps_figure(trace, step=int(step), frame=None if frame is None else int(frame))

    @staticmethod
    def load_trace(file):
        """Load an exported trace JSON and show it (figures, summary, step slider)."""
        if file is None:
            raise gr.Error("choose a trace JSON file (exported by this lab or by accel's Trace.to_json)")
        path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
        try:
            trace = Trace.load(path)
        except (OSError, ValueError, TypeError) as e:
            raise gr.Error(f"could not read {os.path.basename(str(path))}: {e}") from None
        return (summary_markdown(trace, {"note": f"loaded from {os.path.basename(str(path))}"}),
                V.error_figure(trace), V.timeline_figure(trace), V.token_maps_figure(trace), _slider_update(trace),
                _frame_update(trace), trace)


def build_app(lab: Lab | None = None) -> gr.Blocks:
    lab = lab or Lab()
    presets = lab.manager.presets
    default_preset = M.DEFAULT_PRESET if M.DEFAULT_PRESET in presets else next(iter(presets))
    P = presets[default_preset]

    @GPU
    def generate(model, prompt, seed, steps, width, height, guidance, method, compare,
                 speca_threshold, speca_decay, speca_order, speca_min_spec, speca_max_spec, speca_warmup,
                 speca_metric, speca_on_reject,
                 sd_cache_rate, sd_spec_steps, sd_c2_share, sd_history, sd_starvation, sd_warmup,
                 ts_interval, ts_warmup, ts_order, fbc_threshold, frames=None, request: gr.Request = None):
        """Generate an image (or, with a video preset, a video) with one acceleration method, streaming its trace step by step.

        Args:
            model: model preset, e.g. "tiny FLUX (bundled, CPU)", "FLUX.1-dev (GPU)", "FLUX.1-schnell (GPU)",
                "tiny HunyuanVideo (bundled, CPU)", "HunyuanVideo (hub, GPU)".
            prompt: text prompt.
            seed: random seed (the full reference run uses the same one).
            steps: denoising steps.
            width: image width in pixels (a multiple of the model's vae_scale_factor x 2; 16 for FLUX.1).
            height: image height in pixels (same rule).
            guidance: guidance scale (used only by models with guidance embeds, e.g. FLUX.1-dev).
            method: "Full", "SpeCa", "SpecDiff", "TaylorSeerCache (diffusers)" or "FirstBlockCache (diffusers)".
            compare: also run (or reuse from the cache) the full run and report PSNR/SSIM and measured speedup.
            speca_threshold: SpeCa threshold base (rel_l1 ~7; rel_l2/cosine ~0.05-0.3).
            speca_decay: SpeCa threshold decay in (0, 1].
            speca_order: SpeCa Taylor order 0-4.
            speca_min_spec: SpeCa speculative steps accepted before verification can reject.
            speca_max_spec: SpeCa max consecutive speculative steps.
            speca_warmup: SpeCa full warm-up steps.
            speca_metric: SpeCa verification metric: "rel_l1", "rel_l2" or "cosine".
            speca_on_reject: SpeCa rejection policy: "recompute" or "defer".
            sd_cache_rate: SpecDiff share of image tokens not computed on partial steps, in [0, 1).
            sd_spec_steps: SpecDiff speculative pre-run steps.
            sd_c2_share: SpecDiff importance share of the reuse-as-is level (C2).
            sd_history: SpecDiff history window of the C3 level.
            sd_starvation: SpecDiff starvation scale.
            sd_warmup: SpecDiff full warm-up steps.
            ts_interval: TaylorSeerCache cache interval.
            ts_warmup: TaylorSeerCache steps before caching starts.
            ts_order: TaylorSeerCache Taylor order.
            fbc_threshold: FirstBlockCache threshold.
            frames: video presets only: number of frames (4k + 1); None: the preset's default.

        Returns:
            preview: latent preview (live). image: final image. summary: Markdown of the run's numbers.
            error_plot, timeline_plot, maps_plot: Plotly figures. step: the token-map step slider.
            full_image: the full run's image (compare). diff_plot: difference heatmap (compare).
            files: trace JSON, trace CSV, exact config JSON (and the mp4 for a video).
            video: the mp4 (video presets), else None. frame: the token-map frame slider (video traces).
        """
        yield from lab.generate(model, prompt, seed, steps, width, height, guidance, method, compare,
                                speca_threshold, speca_decay, speca_order, speca_min_spec, speca_max_spec,
                                speca_warmup, speca_metric, speca_on_reject, sd_cache_rate, sd_spec_steps,
                                sd_c2_share, sd_history, sd_starvation, sd_warmup, ts_interval, ts_warmup, ts_order,
                                fbc_threshold, frames, request=request)

    with gr.Blocks(title="SpecLab") as demo:
        gr.Markdown("# SpecLab — speculative caching for diffusion transformers\n"
                    "Pick a model and a method, tune it, press **Generate** and watch every step: full, "
                    "speculative (accepted), rejected or partial.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320, elem_id="speclab-controls"):
                model = gr.Dropdown(list(presets), value=default_preset, label="model", elem_id="speclab-model")
                model_status = gr.Markdown(M.preset_status(default_preset) if default_preset in M.PRESETS else "")
                prompt = gr.Textbox(EXAMPLES[0], label="prompt", lines=2)
                gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="example prompts")
                gr.Examples([[e] for e in VIDEO_EXAMPLES], inputs=[prompt], label="example prompts (video)")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, minimum=0)
                    steps = gr.Slider(1, P.max_steps, value=P.steps, step=1, label="steps", elem_id="speclab-steps")
                with gr.Row():
                    width = gr.Slider(P.min_size, P.max_size, value=P.width, step=8, label="width",
                                      elem_id="speclab-width")
                    height = gr.Slider(P.min_size, P.max_size, value=P.height, step=8, label="height",
                                       elem_id="speclab-height")
                guidance = gr.Slider(0, 10, value=P.guidance, step=0.1, label="guidance",
                                     info="used only by models with guidance embeds (FLUX.1-dev, HunyuanVideo); "
                                          "tiny FLUX has none")
                frames = gr.Slider(1, P.max_frames, value=P.frames or 9, step=4, label="frames (4k + 1)",
                                   visible=P.is_video, elem_id="speclab-frames")
                method = gr.Radio(R.METHODS, value=R.SPECA, label="method")
                with gr.Group(visible=True) as g_speca:
                    speca_threshold = gr.Slider(0, 20, value=SPECA_DEF.threshold, step=0.01, label="threshold base")
                    speca_decay = gr.Slider(0.01, 1, value=SPECA_DEF.decay, step=0.01, label="threshold decay")
                    with gr.Row():
                        speca_order = gr.Slider(0, 4, value=SPECA_DEF.order, step=1, label="Taylor order")
                        speca_warmup = gr.Slider(1, 10, value=SPECA_DEF.warmup_steps, step=1, label="warm-up steps")
                    with gr.Row():
                        speca_min_spec = gr.Slider(0, 10, value=SPECA_DEF.min_spec_steps, step=1,
                                                   label="min speculative steps")
                        speca_max_spec = gr.Slider(1, 16, value=SPECA_DEF.max_spec_steps, step=1,
                                                   label="max speculative steps")
                    with gr.Row():
                        speca_metric = gr.Dropdown(["rel_l1", "rel_l2", "cosine"], value=SPECA_DEF.metric,
                                                   label="metric")
                        speca_on_reject = gr.Radio(["recompute", "defer"], value=SPECA_DEF.on_reject,
                                                   label="on reject")
                sd = SD_DEF
                with gr.Group(visible=False) as g_sd:
                    sd_cache_rate = gr.Slider(0, 0.99, value=sd.cache_rate if sd else 0.85, step=0.01,
                                              label="cache rate (share of tokens not computed)")
                    with gr.Row():
                        sd_spec_steps = gr.Slider(1, 8, value=sd.spec_steps if sd else 2, step=1,
                                                  label="speculative steps")
                        sd_warmup = gr.Slider(1, 10, value=sd.warmup_steps if sd else 4, step=1, label="warm-up steps")
                    with gr.Row():
                        sd_c2_share = gr.Slider(0, 0.9, value=sd.c2_share if sd else 0.1, step=0.01,
                                                label="C2 share (reused as is)")
                        sd_history = gr.Slider(1, 8, value=sd.history_window if sd else 3, step=1,
                                               label="history window (C3)")
                    sd_starvation = gr.Slider(0, 2, value=sd.starvation_scale if sd else 0.1, step=0.01,
                                              label="starvation scale")
                with gr.Group(visible=False) as g_ts:
                    with gr.Row():
                        ts_interval = gr.Slider(1, 10, value=TS_DEF.cache_interval, step=1, label="cache interval")
                        ts_warmup = gr.Slider(1, 10, value=TS_DEF.disable_cache_before_step, step=1,
                                              label="warm-up steps")
                    ts_order = gr.Slider(0, 4, value=TS_DEF.max_order, step=1, label="Taylor order")
                with gr.Group(visible=False) as g_fbc:
                    fbc_threshold = gr.Slider(0, 1, value=FBC_DEF.threshold, step=0.005, label="threshold")
                compare = gr.Checkbox(True, label="compare with the full run (cached per model/prompt/seed/size/steps)")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="speclab-generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="speclab-stop")
            with gr.Column(scale=2):
                with gr.Row():
                    preview = gr.Image(label="preview (latent decode, live)", type="pil", height=260,
                                       elem_id="speclab-preview", interactive=False)
                    image = gr.Image(label="image (VAE)", type="pil", height=260, elem_id="speclab-image",
                                     interactive=False)
                    full_image = gr.Image(label="full run (same seed)", type="pil", height=260,
                                          elem_id="speclab-full", interactive=False)
                video = gr.Video(label="video (mp4)", visible=P.is_video, elem_id="speclab-video", interactive=False,
                                 height=300)
                summary = gr.Markdown(summary_markdown(None), elem_id="speclab-summary")
                with gr.Row():
                    error_plot = gr.Plot(V.empty_figure("press Generate", "verification error vs threshold"),
                                         label="error vs threshold", elem_id="speclab-error")
                    timeline_plot = gr.Plot(V.empty_figure("press Generate", "compute timeline"),
                                            label="compute timeline", elem_id="speclab-timeline")
                with gr.Row():
                    maps_plot = gr.Plot(V.empty_figure("press Generate", "token maps"), label="token maps",
                                        elem_id="speclab-maps")
                    diff_plot = gr.Plot(V.empty_figure("compare mode shows it here", "difference"),
                                        label="difference vs full run", elem_id="speclab-diff")
                step_slider = gr.Slider(0, 1, value=0, step=1, label="step (scrub the token maps)",
                                        interactive=False, elem_id="speclab-step")
                frame_slider = gr.Slider(0, 1, value=0, step=1, label="frame (latent frame of the token maps)",
                                         visible=False, elem_id="speclab-frame")
                with gr.Accordion("Export / load a trace", open=False):
                    files = gr.File(label="trace JSON, trace CSV, exact config", file_count="multiple",
                                    interactive=False)
                    upload = gr.File(label="load a trace JSON to view it", file_types=[".json"], type="filepath")

        inputs = [model, prompt, seed, steps, width, height, guidance, method, compare,
                  speca_threshold, speca_decay, speca_order, speca_min_spec, speca_max_spec, speca_warmup,
                  speca_metric, speca_on_reject, sd_cache_rate, sd_spec_steps, sd_c2_share, sd_history,
                  sd_starvation, sd_warmup, ts_interval, ts_warmup, ts_order, fbc_threshold, frames]
        outputs = [preview, image, summary, error_plot, timeline_plot, maps_plot, step_slider, full_image,
                   diff_plot, files, video, frame_slider, state]
        run_btn.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1,
                      concurrency_id="pipeline")
        stop_btn.click(lab.stop, None, None, queue=False, api_name="stop")

        def on_method(m):
            return [gr.update(visible=m == R.SPECA), gr.update(visible=m == R.SPECDIFF),
                    gr.update(visible=m == R.TAYLORSEER), gr.update(visible=m == R.FBCACHE)]

        method.change(on_method, method, [g_speca, g_sd, g_ts, g_fbc], api_visibility="private", queue=False)
        speca_metric.change(lambda m: gr.update(value=METRIC_THRESHOLDS.get(m, 7.0)), speca_metric,
                            speca_threshold, api_visibility="private", queue=False)

        def on_model(name, current_prompt):
            p = presets.get(name)
            if p is None:
                raise gr.Error(f"unknown model preset {name!r}")
            examples = VIDEO_EXAMPLES if p.is_video else EXAMPLES
            switch = current_prompt in (EXAMPLES + VIDEO_EXAMPLES) and current_prompt not in examples
            return (M.preset_status(name) if name in M.PRESETS else "",
                    gr.update(value=examples[EXAMPLES.index(current_prompt) if current_prompt in EXAMPLES else
                                             VIDEO_EXAMPLES.index(current_prompt)]) if switch else gr.update(),
                    gr.update(maximum=p.max_steps, value=p.steps),
                    gr.update(minimum=p.min_size, maximum=p.max_size, value=p.width),
                    gr.update(minimum=p.min_size, maximum=p.max_size, value=p.height),
                    gr.update(value=p.guidance),
                    gr.update(visible=p.is_video, maximum=p.max_frames, value=p.frames or 1),
                    gr.update(visible=p.is_video),
                    gr.update(visible=False, value=0))

        model.change(on_model, [model, prompt],
                     [model_status, prompt, steps, width, height, guidance, frames, video, frame_slider],
                     api_visibility="private", queue=False)
        step_slider.input(lab.scrub, [step_slider, state, frame_slider], maps_plot, api_visibility="private",
                          concurrency_limit=None)
        frame_slider.input(lab.scrub, [step_slider, state, frame_slider], maps_plot, api_visibility="private",
                           concurrency_limit=None)
        upload.upload(lab.load_trace, upload,
                      [summary, error_plot, timeline_plot, maps_plot, step_slider, frame_slider, state],
                      api_name="load_trace", concurrency_limit=None)
    demo.lab = lab
    return demo


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="SpecLab: the Gradio lab")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    args = ap.parse_args(argv)
    demo = build_app()
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Soft(), css=CSS,
                show_error=True)


if __name__ == "__main__":
    main()

"""The lab's generate function end to end, its error messages, Stop, isolation, and the app's wiring."""

import os
import threading
import time
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go
import numpy as np
import pytest
from PIL import Image

import accel
import app
import tiny
import tiny_video
from accel.trace import Trace
from lab import compare as C
from lab import methods as LM
from lab import models as M
from lab import runner as R
from lab.errors import InputError
from lab.session import Session
from scripts.tiny_video import data as tinyvideo_data

BUNDLED = os.path.isfile(os.path.join(M.TINY_FLUX_DIR, "model_index.json"))


def _random_factory(preset):
    return tiny.tiny_flux_pipe()


def _bundled_or_random():
    """The bundled tiny FLUX when its folder is there and loads, else the random test pipe."""
    if BUNDLED:
        try:
            pipe = M.load_preset(M.PRESETS[M.TINY])
            return M.ModelManager(factory=lambda preset: pipe if preset.name == M.TINY else M.load_preset(preset))
        except M.ModelError:
            pass
    return M.ModelManager(factory=_random_factory)


@pytest.fixture(scope="module")
def lab():
    return app.Lab(_bundled_or_random(), every_s=0.5)


@pytest.fixture(scope="module")
def rlab():
    """Always the random pipe (fast, exercises the encoder-less / VAE-less path)."""
    return app.Lab(M.ModelManager(factory=_random_factory), every_s=0.3)


def kw(method=LM.SPECA, **over):
    """The run's controls; every method's knobs keep their config defaults unless given (`speca_threshold=...`)."""
    d = dict(model=M.TINY, prompt=app.EXAMPLES[0], seed=0, steps=16, width=128, height=128, guidance=3.5,
             method=method, compare=True)
    d.update(over)
    return d


def _no_speclab_hooks(pipe):
    reg = getattr(pipe.transformer, "_diffusers_hook", None)
    names = list(reg.hooks) if reg is not None else []
    return not any(n.startswith("speclab_") for n in names) and not pipe.transformer.is_cache_enabled


def test_generate_end_to_end_with_compare(lab):
    outs = list(lab.generate(**kw(LM.SPECA)))
    assert len(outs) >= 2, "streams at least one update before the final one"
    preview, image, summary, err, tl, maps, slider, full_image, diff, files, video, frame, trace = outs[-1]
    assert video is None and frame["visible"] is False  # an image preset: no video, no frame slider
    assert isinstance(image, Image.Image) and image.size == (128, 128)
    assert isinstance(preview, Image.Image)
    for fig in (err, tl, maps, diff):
        assert isinstance(fig, go.Figure) and len(fig.data) > 0
    assert {d.name for d in err.data} >= {"threshold", "full"}
    assert isinstance(trace, Trace) and trace.method == "speca" and len(trace.steps) == 16
    assert "PSNR" in summary and "ideal speedup" in summary and "measured speedup" in summary
    # every streamed summary names the method and the model as the page does, not their classes
    streamed = [o[2] for o in outs if isinstance(o[2], str) and "step " in o[2]]
    assert len(streamed) >= 2 and all(f"on {M.TINY}" in t.replace("\\", "") for t in streamed), streamed
    assert isinstance(full_image, Image.Image) and full_image.size == (128, 128)
    assert len(lab.full_cache) == 1
    # exported files: the trace round-trips, the config is the exact one
    by_ext = {os.path.splitext(f)[0].rsplit("_", 1)[-1] + os.path.splitext(f)[1]: f for f in files}
    back = Trace.load(by_ext["trace.json"])
    assert back.summary() == trace.summary()
    assert open(by_ext["trace.csv"]).readline().startswith("phase,step")
    exported = open(by_ext["config.json"]).read()
    assert '"threshold": 0.3' in exported and '"forecast": "output"' in exported and '"metric": "rel_l2"' in exported
    # a streamed update carries the live panels and leaves the final-only outputs untouched; the first clears the
    # last run's pictures
    running = [o for o in outs if "running" in o[2]]
    assert running and isinstance(running[0][3], go.Figure) and running[0][1] is None
    assert all(isinstance(o[1], type(gr.skip())) for o in running[1:])
    assert _no_speclab_hooks(lab.manager.get(M.TINY).pipe)


def test_measured_speedup_comes_from_back_to_back_pairs(rlab, monkeypatch):
    """Issue 12: the measured speedup divides by a full run timed in the same request right after the accelerated
    one (never a cached timing), repeated interleaved while cheap, and the summary shows the spread."""
    calls = []
    orig = R.run_to_end
    monkeypatch.setattr(R, "run_to_end", lambda m, s, config, **k: calls.append(type(config).__name__)
                        or orig(m, s, config, **k))
    small = dict(steps=6, width=64, height=64)
    for _ in range(2):  # the second request has the same settings: its full run is timed again all the same
        calls.clear()
        out = list(rlab.generate(**kw(LM.SPECA, **small)))[-1]
        # the full run, the accelerated run again without the live view (the first pair), then more pairs
        assert calls[:2] == ["FullConfig", "SpeCaConfig"]
        assert calls[2:] == ["SpeCaConfig", "FullConfig"] * ((len(calls) - 2) // 2)
        pairs = 1 + (len(calls) - 2) // 2
        assert 1 <= pairs <= rlab.timing_pairs
        assert "measured speedup (time)" in out[2] and ("back-to-back pairs" in out[2] or "one back-to-back pair"
                                                         in out[2])
        assert "ideal speedup (compute, not time)" in out[2]
    calls.clear()
    list(rlab.generate(**kw(LM.SPECA, compare=False, **small)))
    assert calls == []  # no comparison: no full run


@pytest.mark.parametrize("budget_s", [60.0, 0.0], ids=["run-again", "too-long-to-run-again"])
def test_the_first_pair_times_the_method_again_without_the_live_view(monkeypatch, budget_s):
    """The streamed run's time holds the live view's work, which the full reference has not: the first pair's
    accelerated time is the method run again, unstreamed, right after the full run; an accelerated run longer than
    `timing_budget_s` is not run again, and the summary says the pair then includes the live view."""
    lab = app.Lab(M.ModelManager(factory=_random_factory), every_s=0.0, timing_pairs=1, timing_budget_s=budget_s)
    runs = []
    orig = R.run_to_end

    def run_to_end(m, s, config, **k):
        r = orig(m, s, config, **k)
        runs.append(r)
        return r

    monkeypatch.setattr(R, "run_to_end", run_to_end)
    final = list(lab.generate(**kw(LM.SPECA, steps=6, width=64, height=64)))[-1]
    streamed, full = final[-1], runs[0].trace
    assert full.method == "full"
    ms = lambda t: t.summary()["measured_ms"]  # noqa: E731
    if budget_s:
        assert [r.trace.method for r in runs] == ["full", "speca"] and runs[1].trace is not streamed
        assert lab.last_extra["pairs"] == [pytest.approx(ms(full) / ms(runs[1].trace))]
        assert "live view included" not in final[2] and "re-run without the live view" in final[2]
    else:
        assert [r.trace.method for r in runs] == ["full"]
        assert lab.last_extra["pairs"] == [pytest.approx(ms(full) / ms(streamed))]
        assert "the one streamed here, live view included" in final[2]


@pytest.mark.parametrize("method", LM.METHODS)
def test_every_method_streams_a_trace(rlab, method):
    outs = list(rlab.generate(**kw(method, steps=10, width=64, height=64, compare=False)))
    final = outs[-1]
    trace = final[-1]
    assert isinstance(final[1], Image.Image) and final[1].size == (64, 64)
    assert len(trace.steps) == 10 and trace.summary()["blocks_plain"] > 0
    for fig in final[3:6]:
        assert isinstance(fig, go.Figure)
    if method == LM.SPECDIFF:
        cfg = trace.config
        assert cfg["cache_rate"] == 0.85 and cfg["spec_steps"] == 2 and cfg["share_first_step"] is True
        # the pre-run ran: spec_steps calls, the first shared with step 0
        assert len(trace.overhead) == 1 and trace.overhead[0].reason == "prerun"
        assert trace.meta["prerun"]["cond"]["calls"] == 1 and len(trace.meta["prerun"]["cond"]["sigmas"]) == 2
        part = [r for r in trace.steps if r.decision == "partial"]
        assert len(part) == 10 - 4  # the lab's warm-up: 4 steps
        assert all(r.tokens_computed < r.tokens_total and "importance" in r.maps for r in part)
        assert all((r.maps["level"] == 1).any() for r in part)
    assert _no_speclab_hooks(rlab.manager.get(M.TINY).pipe)


@pytest.mark.parametrize("over, needle", [
    (dict(width=100), "width=100 is not a multiple of"),
    (dict(height=1000), "height=1000 is out of range"),
    (dict(steps=0), "steps=0 is out of range"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(prompt="  "), "prompt is empty"),
    (dict(model="SDXL"), "unknown model preset 'SDXL'"),
    (dict(method="Magic"), "unknown method 'Magic'"),
    (dict(speca_min_spec_steps=5, speca_max_spec_steps=3),
     "SpeCa: max_spec_steps=3 is out of range.*controls: min speculative steps, max speculative steps"),
    (dict(speca_decay=0), "SpeCa, threshold decay: decay=0.0 is out of range: decay must be a finite number in"),
    (dict(speca_order=2.5), "SpeCa, Taylor order: must be a whole number"),
    (dict(speca_order=float("nan")), "SpeCa, Taylor order: must be a finite number"),
    (dict(speca_record_maps=1), "SpeCa, record token maps: .*must be a bool"),
    (dict(speca_metric="l7"), "SpeCa, error metric: metric='l7' is out of range"),
    (dict(method=LM.FBCACHE, fbcache_threshold=-1), "FirstBlockCache \\(diffusers\\), threshold: threshold=-1.0"),
    (dict(method=LM.TAYLORSEER, taylorseer_cache_interval=0), "cache interval: cache_interval=0"),
    (dict(nonsense=1), "unknown control"),
])
def test_bad_input_is_a_gr_error_naming_the_problem(rlab, over, needle):
    with pytest.raises(gr.Error, match=needle):
        list(rlab.generate(**kw(**{"steps": 4, "width": 64, "height": 64, **over})))
    pipe = rlab.manager.get(M.TINY).pipe
    assert _no_speclab_hooks(pipe) and rlab.manager.get(M.TINY).line.idle()
    list(rlab.generate(**kw(steps=3, width=64, height=64, compare=False)))  # still serving


def test_missing_models_give_clear_messages(monkeypatch):
    missing = M.Preset("tiny FLUX (bundled, CPU)", "/nonexistent/tiny-flux", "local")
    with pytest.raises(M.ModelError, match="tiny FLUX model is missing.*scripts.tiny_flux.train"):
        M.load_preset(missing)
    monkeypatch.setattr(M.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    with pytest.raises(M.ModelError, match="needs a CUDA GPU"):
        M.load_preset(M.PRESETS[M.DEV])
    with pytest.raises(M.ModelError, match="needs a CUDA GPU.*tiny HunyuanVideo"):
        M.load_preset(M.PRESETS[M.HUNYUAN])
    lab = app.Lab(M.ModelManager())
    with pytest.raises(gr.Error, match="needs a CUDA GPU"):
        list(lab.generate(**kw(model=M.SCHNELL, width=1024, height=1024, steps=4)))

    class GatedRepoError(Exception):
        pass

    class LocalEntryNotFoundError(Exception):
        pass

    msg = M.explain_load_error(M.PRESETS[M.DEV], GatedRepoError("401 Client Error"))
    assert "gated" in msg and "accept its licence" in msg and "HF_TOKEN" in msg
    msg = M.explain_load_error(M.PRESETS[M.DEV], LocalEntryNotFoundError("cannot find the requested files"))
    assert "not reachable" in msg and "hf download black-forest-labs/FLUX.1-dev" in msg
    msg = M.explain_load_error(M.PRESETS[M.DEV], RuntimeError("CUDA out of memory. Tried to allocate"))
    assert "out of GPU memory" in msg


@pytest.fixture
def slow_steps(rlab):
    """Each denoiser call of the random pipe takes >= 20 ms, so a run is still going when Stop comes."""
    pipe = rlab.manager.get(M.TINY).pipe
    h = pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.02))
    yield
    h.remove()


def test_stop_ends_the_run_cleanly_and_the_pipeline_stays_usable(rlab, slow_steps):
    alice, bob = Session(), Session()
    gen = rlab.generate(alice, **kw(steps=60, width=64, height=64, compare=True))
    first = next(gen)  # a few steps in
    rlab.stop(bob)  # somebody else's Stop does nothing to this run
    rlab.stop(alice)
    final = list(gen)[-1]
    trace = final[-1]
    assert 0 < len(trace.steps) < 60
    assert "stopped" in final[2]
    assert isinstance(final[1], Image.Image)
    assert final[7] is None  # no comparison for a stopped run
    assert first[3] is not None
    m = rlab.manager.get(M.TINY)
    assert _no_speclab_hooks(m.pipe) and m.line.idle() and not m.pipe.interrupt
    again = list(rlab.generate(alice, **kw(steps=6, width=64, height=64, compare=False)))[-1]
    assert len(again[-1].steps) == 6


def test_abandoned_stream_removes_hooks(rlab, slow_steps):
    gen = rlab.generate(**kw(steps=60, width=64, height=64, compare=False))
    next(gen)
    gen.close()  # the browser went away mid-run
    m = rlab.manager.get(M.TINY)
    assert _no_speclab_hooks(m.pipe) and m.line.idle()


def test_concurrent_sessions_do_not_share_traces(rlab):
    results = {}

    def run(name, seed, steps):
        results[name] = list(rlab.generate(Session(), **kw(seed=seed, steps=steps, width=64, height=64,
                                                          compare=False)))[-1][-1]

    ts = [threading.Thread(target=run, args=("a", 1, 5)), threading.Thread(target=run, args=("b", 2, 7))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(results["a"].steps) == 5 and len(results["b"].steps) == 7
    assert results["a"] is not results["b"]


def test_model_is_loaded_once():
    n = []
    mgr = M.ModelManager(factory=lambda p: n.append(1) or tiny.tiny_flux_pipe())
    assert mgr.get(M.TINY) is mgr.get(M.TINY) and n == [1]


def test_load_trace_and_scrub(rlab, tmp_path):
    trace = list(rlab.generate(**kw(LM.SPECA, steps=10, width=64, height=64, compare=False,
                                    speca_min_spec_steps=0, speca_threshold=0.01)))[-1][-1]
    p = tmp_path / "t.json"
    trace.to_json(str(p))
    summary, err, tl, maps, slider, frame, preview, image, full, diff, state = rlab.load_trace(str(p))
    assert frame["visible"] is False
    assert preview is image is full is None and "press Generate" in diff.layout.annotations[0].text  # no stale pictures
    assert "loaded from t.json" in summary and state.summary() == trace.summary()
    assert len(err.data) > 0 and len(tl.data) > 0
    step = next(r.step for r in trace.steps if r.maps)
    assert f"step {step}" in app.Lab.scrub(step, state).layout.title.text
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(gr.Error, match="not a trace this lab can show"):
        rlab.load_trace(str(bad))


def test_play_replays_the_run_step_by_step(rlab, monkeypatch):
    """Play: one update per step; the timeline grows one step at a time, the token maps and the step slider
    follow the latest verified step, and the last update shows the whole run, measured against its full run."""
    monkeypatch.setattr(rlab, "play_delay_s", 0.0)
    session = Session()
    outs = list(rlab.generate(session, **kw(LM.SPECA, steps=8, width=64, height=64, speca_threshold=5.0)))
    trace = outs[-1][-1]
    frames = list(rlab.play(trace, None, session))
    assert len(frames) == 8
    map_steps = V_steps(trace)
    shown = []
    for n, (maps, step, timeline, error) in enumerate(frames):
        bars = sum(len(d.x) for d in timeline.data if d.type == "bar")
        assert bars == n + 1  # one denoiser call per step so far (no CFG, no pre-run)
        assert len([x for d in error.data if d.name != "threshold" for x in d.x]) == n + 1
        if n in map_steps:
            assert f"step {n}" in maps.layout.title.text and step["value"] == n
            shown.append(n)
    assert shown == map_steps and shown
    final = app.trace_panels(trace, ref=session.reference[1])["timeline_plot"]
    assert frames[-1][2].to_dict()["data"] == final.to_dict()["data"]
    assert any(d.name == "measured speedup" for d in frames[-1][2].data)  # the full run's times, not an estimate
    with pytest.raises(gr.Error, match="nothing to play"):
        list(rlab.play(None))


def test_target_speedup_runs_with_the_threshold_it_found(rlab):
    """Target-speedup mode: the run uses the threshold the bisection found, and the summary names it (by the
    control's label) with the ideal speedup reached, which is this run's."""
    out = list(rlab.generate(**kw(LM.SPECA, steps=8, width=64, height=64, compare=False, target_speedup=2.0)))
    summary, trace = out[-1][2], out[-1][-1]
    assert "target speedup 2x: threshold base = " in summary
    found = float(summary.split("threshold base = ")[1].split(" ")[0])
    reached = float(summary.split(" gives ")[1].split("x")[0])
    assert trace.config["threshold"] == pytest.approx(found, rel=1e-3)
    assert trace.summary()["ideal_speedup"] == pytest.approx(reached, abs=0.006)
    assert rlab.restore(trace)["speca_threshold"] == pytest.approx(found, rel=1e-3)  # what the page's control gets


def test_sweep_range_boxes_left_at_zero_take_the_knobs_range():
    """The page's empty from/to boxes send 0: the knob's own slider range, also for a knob whose lowest is not 0
    (TaylorSeer's interval starts at 1), and the points' labels are short."""
    for method in LM.TABLE:
        if method.speed_knob is None:
            continue
        knob = next(k for k in method.knobs() if k.name == method.speed_knob)
        lo, hi, _ = knob.slider()
        values, got = app.Lab._sweep_values(method, 0, 0, 3)
        assert got == knob and values[0] == pytest.approx(lo) and values[-1] == pytest.approx(hi), method.label
    speca = LM.by_label(LM.SPECA)
    assert app.Lab._sweep_values(speca, 1, 2, 4)[0] == pytest.approx([1, 1.3333, 1.6667, 2])
    with pytest.raises(InputError, match="sweep from=3 must be below sweep to=2"):
        app.Lab._sweep_values(speca, 3, 2, 4)


def test_psnr_ssim_against_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert C.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-6)
    assert C.psnr(a, a) == float("inf") and C.ssim(a, a) == pytest.approx(1.0)
    # SSIM by hand on a flat pair: no structure, so only the luminance term: (2 m1 m2 + c1) / (m1^2 + m2^2 + c1)
    x, y = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert C.ssim(x, y) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-6)
    assert C.ssim(a, b) < 1.0 and C.ssim(a, 255 - a) < 0.1
    assert C.ssim(a[:6, :6], b[:6, :6]) < 1.0  # smaller than the window: still a number
    with pytest.raises(ValueError, match="same size"):
        C.psnr(a, a[:, :10])


def test_full_run_compared_with_itself_is_infinitely_close(rlab):
    out = list(rlab.generate(**kw(LM.FULL, steps=4, width=64, height=64, seed=7)))[-1]
    assert "PSNR **∞ dB**" in out[2] and "SSIM **1.0000**" in out[2]
    assert isinstance(out[7], Image.Image) and isinstance(out[8], go.Figure)


def test_controls_come_from_the_configs_knobs(rlab):
    """Every shown knob is a control and an API parameter: label, range and help from the config's field."""
    demo = app.build_app(rlab)
    params = {p["parameter_name"]: p for p in demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]}
    by_elem = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    for m in LM.TABLE:
        cls = accel.method(m.name).config_cls
        assert m.config_cls is cls
        for k in accel.knobs(cls):
            key = m.param(k.name)
            if not LM.showable(k) or k.name in m.fixed:
                assert key not in params
                continue
            control = by_elem[f"speclab-{key}"]
            assert key in params and control.label == k.label and control.info == app.knob_info(k)
            assert params[key]["parameter_default"] == m.default(k)  # the lab's start (FirstBlockCache: 0.25)
            if isinstance(control, gr.Slider):
                assert (control.minimum, control.maximum, control.step) == k.slider()
    assert "The threshold at step i of n is threshold × decay ^ (i / n)." in app.knob_info(
        accel.knobs(accel.SpeCaConfig)[0])
    # SpeCa's main knobs are open, the others folded away
    speca = LM.by_label(LM.SPECA)
    assert [k.name for k in speca.knobs() if speca.is_main(k)] == ["threshold", "decay", "order"]
    # the lab's fixed values reach the config
    assert LM.by_label(LM.TAYLORSEER).build({}).taylor_factors_dtype == "float32"
    assert LM.by_label(LM.SPECA).build({"speca_order": 3.0, "speca_threshold": 2}).order == 3


def test_accel_exports_the_baselines():
    for name in ("FullConfig", "TaylorSeerConfig", "FirstBlockConfig"):
        assert hasattr(accel, name)


def test_out_of_memory_gives_the_fix_and_the_app_keeps_serving(rlab, monkeypatch):
    pipe = rlab.manager.get(M.TINY).pipe
    cls = type(pipe)
    real_call = cls.__call__

    def oom(self, *a, **k):
        raise M.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cls, "__call__", oom)
    with pytest.raises(gr.Error, match="out of memory at 64x64.*lower the size"):
        list(rlab.generate(**kw(steps=4, width=64, height=64, compare=False)))
    monkeypatch.setattr(cls, "__call__", real_call)
    assert _no_speclab_hooks(pipe) and rlab.manager.get(M.TINY).line.idle()
    assert len(list(rlab.generate(**kw(steps=4, width=64, height=64, compare=False)))[-1][-1].steps) == 4


# ---- video (HunyuanVideo) ---------------------------------------------------------------------------------------
def _video_factory(preset):
    return tiny_video.tiny_video_pipe() if preset.is_video else tiny.tiny_flux_pipe()


@pytest.fixture(scope="module")
def vlab():
    """The tiny random HunyuanVideo pipe (no text encoders, no VAE) behind the video preset."""
    return app.Lab(M.ModelManager(factory=_video_factory), every_s=0.2)


def vkw(method=LM.SPECDIFF, **over):
    return kw(method, **{"model": M.TINY_VIDEO, "steps": 8, "width": 64, "height": 64, "frames": 9,
                         "guidance": 6.0, "specdiff_warmup_steps": 2, **over})


@pytest.mark.parametrize("method", [LM.SPECDIFF, LM.SPECA])
def test_video_preset_end_to_end(vlab, method):
    outs = list(vlab.generate(**vkw(method, compare=True)))
    preview, image, summary, err, tl, maps, slider, full_image, diff, files, video, frame, trace = outs[-1]
    # a video file, also among the exported files
    assert video is not None and video.endswith(".mp4") and os.path.getsize(video) > 1000 and video in files
    import imageio.v2 as imageio

    got = imageio.mimread(video)
    assert len(got) == 3 and got[0].shape == (64, 64, 3)  # no VAE in the test pipe: one frame per latent frame
    # the image panels show a strip of frames; the comparison runs over the frames
    assert isinstance(image, Image.Image) and image.size == (64 * 3, 64)
    assert isinstance(full_image, Image.Image) and full_image.size == image.size
    assert isinstance(preview, Image.Image) and preview.size == (64 * 3, 64)  # 3 latent frames
    assert "PSNR" in summary and "measured speedup" in summary
    # the per-step panels are the image ones; a method that verifies nothing says so instead of plotting zeros
    for fig in (tl, maps, diff):
        assert isinstance(fig, go.Figure) and len(fig.data) > 0
    if method == LM.SPECA:
        assert len(err.data) > 0
    else:
        assert not err.data and "verifies nothing" in err.layout.annotations[0].text
    assert isinstance(trace, Trace) and len(trace.steps) == 8 and trace.token_grid == list(tiny_video.GRID)
    # token maps: one frame at a time, with the frame slider shown for this trace
    assert frame["visible"] is True and frame["maximum"] == 2 and frame["value"] == 1
    step = max(V_steps(trace))
    for f in range(3):
        fig = app.Lab.scrub(step, trace, f)
        assert f"frame {f} (0–2)" in fig.layout.title.text and np.asarray(fig.data[0].z).shape == (4, 4)
    run = [f for f in files if f.endswith("_config.json")][0]
    assert '"frames": 9' in open(run).read()
    assert _no_speclab_hooks(vlab.manager.get(M.TINY_VIDEO).pipe)


def V_steps(trace):
    import visualizers

    return visualizers.map_steps(trace)


@pytest.mark.parametrize("over, needle", [
    (dict(frames=8), "frames=8 is not 4k \\+ 1.*use 5 or 9"),
    (dict(frames=101), "frames=101 is out of range"),
    (dict(frames="x"), "frames must be a number"),
])
def test_video_bad_frames_are_gr_errors(vlab, over, needle):
    with pytest.raises(gr.Error, match=needle):
        list(vlab.generate(**vkw(**over)))


def test_video_preset_frames_default_and_stop(vlab, slow_video_steps):
    session = Session()
    gen = vlab.generate(session, **vkw(LM.SPECA, steps=60, compare=True, frames=None))
    next(gen)
    vlab.stop(session)
    final = list(gen)[-1]
    assert 0 < len(final[-1].steps) < 60 and "stopped" in final[2]
    assert final[10].endswith(".mp4") and final[7] is None
    m = vlab.manager.get(M.TINY_VIDEO)
    assert _no_speclab_hooks(m.pipe) and m.line.idle() and not m.pipe.interrupt


@pytest.fixture
def slow_video_steps(vlab):
    pipe = vlab.manager.get(M.TINY_VIDEO).pipe
    h = pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.02))
    yield
    h.remove()


def test_missing_bundled_video_model_and_hub_video_errors(monkeypatch, tmp_path):
    missing = M.Preset(M.TINY_VIDEO, str(tmp_path / "tiny-hunyuanvideo"), "local", frames=9,
                       build_script="python -m scripts.tiny_video.train")
    with pytest.raises(M.ModelError, match="bundled video model is not installed.*python -m scripts.tiny_video.train"):
        M.load_preset(missing)
    lab = app.Lab(M.ModelManager(presets={M.TINY_VIDEO: missing}))
    with pytest.raises(gr.Error, match="not installed.*scripts.tiny_video.train"):
        list(lab.generate(**vkw()))
    assert "scripts.tiny_video.train" in M.preset_status(M.TINY_VIDEO) or os.path.isfile(
        os.path.join(M.TINY_VIDEO_DIR, "model_index.json"))
    hub = M.PRESETS[M.HUNYUAN]
    assert hub.kind == "hub" and hub.source == "hunyuanvideo-community/HunyuanVideo" and hub.is_video

    class GatedRepoError(Exception):
        pass

    assert "gated" in M.explain_load_error(hub, GatedRepoError("401"))
    assert "out of GPU memory" in M.explain_load_error(hub, RuntimeError("CUDA out of memory"))
    assert "hf download hunyuanvideo-community/HunyuanVideo" in M.explain_load_error(
        hub, ConnectionError("offline"))
    monkeypatch.setattr(M.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert "needs a CUDA GPU" in M.preset_status(M.HUNYUAN)


def _video_pipe_with_vae():
    """The tiny random video pipe plus a tiny random HunyuanVideo VAE: the decode path of real video models."""
    from diffusers import AutoencoderKLHunyuanVideo

    pipe = tiny_video.tiny_video_pipe()
    M.torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4).eval()
    pipe.register_modules(vae=vae)
    return pipe


def test_video_preset_with_a_vae_writes_every_frame(slow_video_steps_vae):
    vlab_vae, session = slow_video_steps_vae
    out = list(vlab_vae.generate(**vkw(LM.SPECA, steps=4, compare=False)))[-1]
    image, video, trace = out[1], out[10], out[-1]
    import imageio.v2 as imageio

    got = imageio.mimread(video)
    assert len(got) == 9 and got[0].shape == (64, 64, 3)  # the VAE's 9 frames, not the 3 latent ones
    assert image.size == (64 * 8, 64) and len(trace.steps) == 4
    assert vlab_vae.manager.get(M.TINY_VIDEO).previewer.weights is not None  # calibrated on the video VAE
    # stopped mid-run: the frames are the VAE decode of the clean estimate
    gen = vlab_vae.generate(session, **vkw(LM.SPECA, steps=40, compare=False))
    next(gen)
    vlab_vae.stop(session)
    final = list(gen)[-1]
    assert "stopped" in final[2] and len(imageio.mimread(final[10])) == 9


@pytest.fixture
def slow_video_steps_vae():
    lab = app.Lab(M.ModelManager(factory=lambda p: _video_pipe_with_vae()), every_s=0.2)
    pipe = lab.manager.get(M.TINY_VIDEO).pipe
    pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.02))
    return lab, Session()


def test_model_switch_shows_the_video_controls_only_for_video_presets(vlab):
    demo = app.build_app(vlab)
    on_model = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_model")
    status, prompt, steps, width, height, guidance, frames, video, frame, compile_ = on_model(M.TINY_VIDEO,
                                                                                             app.EXAMPLES[0])
    assert frames["visible"] is True and frames["value"] == 9 and video["visible"] is True
    assert frame["visible"] is False  # until a video trace is there
    assert prompt["value"] == app.VIDEO_EXAMPLES[0] and width["value"] == 64
    assert compile_["interactive"] is False and "CPU" in compile_["info"]  # the tiny presets run on the CPU
    status, prompt, steps, width, height, guidance, frames, video, frame, _ = on_model(M.TINY, app.VIDEO_EXAMPLES[1])
    assert frames["visible"] is False and video["visible"] is False and prompt["value"] == app.EXAMPLES[1]
    assert "value" not in on_model(M.TINY, "my own prompt")[1]  # a prompt of the user's own stays


@pytest.fixture(scope="module")
def bundled_video_lab():
    """The real bundled tiny HunyuanVideo, loaded the way the app loads it."""
    return app.Lab(M.ModelManager(), every_s=1.0)


def _bundled_video(lab, method, prompt, **over):
    import imageio.v2 as imageio

    p = M.PRESETS[M.TINY_VIDEO]
    out = list(lab.generate(**vkw(method, **{"prompt": prompt, "steps": p.steps, "compare": False, "width": p.width,
                                           "height": p.height, "frames": p.frames, "guidance": p.guidance, **over})))
    *_, video, frame, trace = out[-1]
    assert video.endswith(".mp4") and frame["visible"] is True
    frames = imageio.mimread(video)
    assert len(frames) == p.frames and frames[0].shape == (p.height, p.width, 3)
    return tinyvideo_data.analyze_clip(frames), trace


# SpeCa's case runs its per-block forecast: this example's plain yellow already sits at the yellow/orange boundary
# of the colour classifier (green 0.73-0.75 against a boundary near 0.70), and the stack forecast (the default)
# moves 5 of its 9 frames across it. Over 16 held-out prompts both forecasts keep colour at 88 % (plain 94 %) at
# the same schedule (`python -m scripts.tiny_video.check --method speca --steps 20 -n 16 --forecast ...`).
@pytest.mark.parametrize("method,prompt,over", [(LM.FULL, app.VIDEO_EXAMPLES[0], {}),
                                                (LM.SPECA, app.VIDEO_EXAMPLES[1], {"speca_forecast": "per_block"}),
                                                (LM.SPECDIFF, app.VIDEO_EXAMPLES[2], {})])
def test_bundled_tiny_video_follows_the_prompt_in_the_lab(bundled_video_lab, method, prompt, over):
    """The lab passes the bundled model's prompt template (the pipeline's default one would crop the prompt away):
    the mp4 it writes shows the named colour moving in the named direction."""
    a, trace = _bundled_video(bundled_video_lab, method, prompt, **over)
    want = tinyvideo_data.parse_caption(prompt)
    assert (a["direction"], a["color"], a["bg"]) == (want["direction"], want["color"], want["bg"]), (prompt, a)
    assert len(trace.steps) == M.PRESETS[M.TINY_VIDEO].steps and trace.token_grid[0] == 3  # 3 latent frames


def test_bundled_tiny_video_prompt_template_is_passed():
    def fake_pipe():
        return SimpleNamespace(text_encoder=object(), tokenizer=object(),
                               transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=False)))

    m = M.LoadedModel(M.PRESETS[M.TINY_VIDEO], pipe=fake_pipe())
    spec = R.RunSpec(M.TINY_VIDEO, app.VIDEO_EXAMPLES[0], seed=0, steps=4, width=64, height=64, guidance=1.0, frames=9)
    kwargs = R.pipe_kwargs(spec, m)
    assert kwargs["prompt_template"] == {"template": "{}", "crop_start": 0}
    assert kwargs["prompt"] == app.VIDEO_EXAMPLES[0] and kwargs["max_sequence_length"] == 32
    # presets without a template of their own leave the pipeline's default alone
    hub = M.LoadedModel(M.PRESETS[M.HUNYUAN], pipe=fake_pipe())
    assert "prompt_template" not in R.pipe_kwargs(spec, hub)

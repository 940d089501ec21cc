"""The lab at the scale its users run it, checked on a CPU: presets from local pipeline folders (`--model PATH`,
SPECLAB_MODEL), where a pipeline goes on a GPU (all on it, model CPU offload, or a message), memory estimates,
the ZeroGPU duration, the compile option, bad input and out-of-memory on a GPU preset, and the streamed update's
cost (the preview drawn outside the denoising loop, the work per update at a 64x64 token grid)."""

import json
import os
import shutil
import threading

import gradio as gr
import numpy as np
import pytest
import torch

import app
import tiny
import visualizers as V
from accel.trace import ACCEPTED, FULL, StepRecord, Trace
from lab import gpu as G
from lab import methods as LM
from lab import models as M
from lab import output as O
from lab import runner as R
from lab.session import Session

GIB = 2**30
FLUX_DEV_TRANSFORMER = dict(_class_name="FluxTransformer2DModel", attention_head_dim=128, axes_dims_rope=[16, 56, 56],
                            guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
                            num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768)
FLUX_DEV_VAE = dict(_class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512], sample_size=1024,
                    latent_channels=16)
FLUX_DEV_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0, use_dynamic_shifting=True,
                          max_image_seq_len=4096)
FLUX_INDEX = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
              "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _write(folder, files: dict) -> str:
    for rel, data in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
    return str(folder)


def _flux_configs(folder, transformer=None, scheduler=None, index=None):
    """A FLUX pipeline folder's configs (no weights: presets read configs only)."""
    files = {"model_index.json": index or FLUX_INDEX, "transformer/config.json": transformer or FLUX_DEV_TRANSFORMER,
             "vae/config.json": FLUX_DEV_VAE, "scheduler/scheduler_config.json": scheduler or FLUX_DEV_SCHEDULER,
             "tokenizer_2/tokenizer_config.json": {"model_max_length": 512}}
    for comp in ("text_encoder", "text_encoder_2", "tokenizer"):
        files[f"{comp}/config.json"] = {}
    return _write(folder, files)


# ---- --model PATH: valid folders --------------------------------------------------------------------------------
def test_flux_dev_shaped_folder_takes_its_defaults_from_its_configs(tmp_path):
    p = M.folder_preset(_flux_configs(tmp_path / "FLUX.1-dev"), gpu=True)
    assert p.name == "FLUX.1-dev (folder, GPU)" and p.kind == "folder" and p.pipeline == "FluxPipeline"
    assert (p.width, p.height, p.size_multiple) == (1024, 1024, 16)  # VAE sample_size; 2^(4-1) x 2
    assert (p.steps, p.guidance, p.max_sequence_length, p.dtype) == (28, 3.5, 512, "bfloat16")
    assert (p.min_size, p.max_size) == (256, 2048) and not p.is_video
    cpu = M.folder_preset(str(tmp_path / "FLUX.1-dev"), gpu=False)
    assert cpu.name.endswith("(folder, CPU)") and cpu.width == 256 and cpu.dtype == "float32"


def test_schnell_shaped_folder_gets_4_steps_and_no_guidance(tmp_path):
    folder = _flux_configs(tmp_path / "schnell", transformer=dict(FLUX_DEV_TRANSFORMER, guidance_embeds=False),
                           scheduler=dict(FLUX_DEV_SCHEDULER, use_dynamic_shifting=False, shift=1.0))
    p = M.folder_preset(folder, gpu=True)
    assert (p.steps, p.guidance, p.max_sequence_length) == (4, 0.0, 256)


def test_bundled_tiny_folders_are_valid_presets_also_through_a_symlink(tmp_path):
    flux = M.folder_preset(M.TINY_FLUX_DIR, gpu=False)
    assert (flux.width, flux.steps, flux.size_multiple, flux.max_sequence_length) == (128, 28, 8, 512)
    os.symlink(M.TINY_VIDEO_DIR, tmp_path / "my-video")
    video = M.folder_preset(str(tmp_path / "my-video"), gpu=False)
    assert video.name == "my-video (folder, CPU)" and video.pipeline == "HunyuanVideoPipeline"
    assert (video.width, video.height, video.frames, video.size_multiple) == (64, 64, 9, 4)
    assert video.prompt_template == {"template": "{}", "crop_start": 0}  # no Llama 3 header tokens in its tokenizer
    gpu_video = M.folder_preset(M.TINY_VIDEO_DIR, gpu=True)
    assert (gpu_video.width, gpu_video.height, gpu_video.frames, gpu_video.steps) == (512, 320, 33, 30)


def test_add_folder_presets_makes_the_first_the_default_and_reads_the_environment(tmp_path, monkeypatch):
    presets = dict(M.PRESETS)
    names = M.add_folder_presets([M.TINY_FLUX_DIR, M.TINY_VIDEO_DIR], presets, gpu=False)
    assert names == ["tiny-flux (folder, CPU)", "tiny-hunyuanvideo (folder, CPU)"]
    assert all(n in presets for n in names) and M.DEFAULT_PRESET == M.TINY  # only PRESETS moves the default
    env = {M.MODEL_ENV: f"{M.TINY_FLUX_DIR}{os.pathsep}{M.TINY_VIDEO_DIR}{os.pathsep}"}
    assert M.folders_from_env(env) == [M.TINY_FLUX_DIR, M.TINY_VIDEO_DIR]


def test_a_folder_preset_runs_end_to_end_in_the_lab():
    presets = dict(M.PRESETS)
    name, = M.add_folder_presets([M.TINY_FLUX_DIR], presets, gpu=False)
    lab = app.Lab(M.ModelManager(presets=presets), every_s=0.2)
    ups = list(lab.generate(Session(), model=name, prompt=app.EXAMPLES[0], method=LM.SPECA, compare=True,
                            steps=8))
    trace = ups[-1][-1]
    assert trace.num_steps == 8 and trace.meta["run"]["model"] == name and trace.meta["run"]["width"] == 128
    assert ups[-1][app.OUTPUTS.index("image")].size == (128, 128)
    assert lab.manager.get(name).pipe.transformer.dtype == torch.float32


# ---- --model PATH: folders that are not one -------------------------------------------------------------------
def _bad_folders(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    _flux_configs(tmp_path / "parent" / "flux")
    _write(tmp_path / "badjson", {"model_index.json": "{not json"})
    _write(tmp_path / "sd", {"model_index.json": {"_class_name": "StableDiffusionPipeline"}})
    _flux_configs(tmp_path / "novae")
    shutil.rmtree(tmp_path / "novae" / "vae")
    _flux_configs(tmp_path / "notransformer")
    os.remove(tmp_path / "notransformer" / "transformer" / "config.json")
    return {
        "missing": (tmp_path / "nope", "no such folder"),
        "file": (tmp_path / "file.txt", "is a file: pass the pipeline's folder"),
        "parent": (tmp_path / "parent", "no model_index.json.*flux inside it are: pass one of them"),
        "empty": (tmp_path / "file.txt" / "..", "no model_index.json.*inside it are"),
        "bad json": (tmp_path / "badjson", "is not valid JSON.*save or download it again"),
        "class": (tmp_path / "sd", "a StableDiffusionPipeline; the lab runs FluxPipeline and HunyuanVideoPipeline"),
        "component": (tmp_path / "novae", "names a vae \\(AutoencoderKL\\) but the folder vae/ is missing"),
        "config": (tmp_path / "notransformer", "the transformer's config is missing"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "parent", "empty", "bad json", "class", "component", "config"])
def test_a_folder_that_is_not_a_pipeline_gets_a_message_with_the_fix(tmp_path, case):
    path, needle = _bad_folders(tmp_path)[case]
    with pytest.raises(M.ModelError, match=needle):
        M.folder_preset(str(path))


def test_app_main_refuses_a_bad_folder_before_serving(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda *a, **k: pytest.fail("must not serve"))
    with pytest.raises(SystemExit) as e:
        app.main(["--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    monkeypatch.setenv(M.MODEL_ENV, str(tmp_path))
    with pytest.raises(SystemExit):
        app.main([])
    assert "no model_index.json" in capsys.readouterr().err


def test_a_folder_that_breaks_while_loading_says_so(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(M.TINY_FLUX_DIR, folder)
    with open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(b"\0" * 100)  # a half-written weights file
    p = M.folder_preset(str(folder), gpu=False)
    with pytest.raises(M.ModelError, match=r"could not load broken \(folder, CPU\).*folder may be incomplete"):
        M.load_preset(p)


# ---- memory: estimates and where the pipeline goes -------------------------------------------------------------
def _flux_dev_shape(size=1024):
    cfg = type("Cfg", (), dict(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38))
    return G.run_shape(cfg, size, size, 16, text_tokens=512)


def test_flux_dev_memory_estimates_per_method_at_1024():
    shape = _flux_dev_shape()
    assert (shape.tokens, shape.inner_dim, shape.blocks) == (4096 + 512, 3072, 57)
    weights = 12 * 10**9 * 2 + 5 * 10**9 * 2  # transformer ~12B + T5-XXL ~4.7B + CLIP/VAE, bf16
    peaks = {m: G.peak_bytes(weights, shape, m) / GIB for m in ("full", "speca", "taylorseer", "specdiff")}
    peaks["speca per_block"] = G.peak_bytes(weights, shape, "speca", forecast="per_block") / GIB
    # the H100 measured 137 MiB for SpeCa's stack forecast and 6198 MiB for per-block (README): same order
    assert 0.05 < G.method_cache_bytes("speca", shape) / GIB < 0.3
    assert 5 < G.method_cache_bytes("speca", shape, forecast="per_block") / GIB < 8
    assert peaks["full"] < peaks["taylorseer"] < peaks["speca"] < peaks["specdiff"] < peaks["speca per_block"]
    assert all(p > 24 for p in peaks.values())  # why a 24 GB A10G cannot hold FLUX.1-dev in bf16


@pytest.mark.parametrize("free_gib, mode", [(80, "gpu"), (30, "offload"), (20, "refuse")])
def test_placement_decision(free_gib, mode):
    comps = {"transformer": int(22.2 * GIB), "text_encoder_2": int(8.9 * GIB), "vae": int(0.16 * GIB),
             "text_encoder": int(0.23 * GIB)}
    plan = G.plan_placement(comps, work=int(2.5 * GIB), free=free_gib * GIB, total=80 * GIB, name="FLUX.1-dev")
    assert plan.mode == mode
    if mode == "offload":
        assert "enable_model_cpu_offload" in plan.message and "slower" in plan.message
    if mode == "refuse":
        assert "transformer, 22.2 GiB" in plan.message and "20.0 GiB free of 80.0 GiB" in plan.message
        assert "use a GPU with at least" in plan.message


class _FakeGpuPipe:
    """Records where the lab put it."""

    def __init__(self):
        self.calls = []
        self.transformer = type("T", (), {"config": type("C", (), dict(num_attention_heads=24, attention_head_dim=128,
                                                                         num_layers=19, num_single_layers=38))})()
        self.components = {"transformer": torch.nn.Linear(1024, 1024, dtype=torch.bfloat16)}

    def to(self, device):
        self.calls.append(("to", device))
        return self

    def enable_model_cpu_offload(self):
        self.calls.append(("offload",))


@pytest.mark.parametrize("free, expect", [(80 * GIB, ("to", "cuda")), (int(6.6 * GIB), ("offload",)), (GIB, None)])
def test_loading_a_folder_on_a_gpu_follows_the_decision(monkeypatch, tmp_path, free, expect):
    monkeypatch.setattr(G, "free_memory", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(G, "component_bytes", lambda pipe: {"transformer": int(1.5 * GIB), "text_encoder_2": GIB})
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    preset = M.folder_preset(_flux_configs(tmp_path / "dev"), gpu=True)
    pipe = _FakeGpuPipe()
    if expect is None:
        with pytest.raises(M.ModelError, match="does not fit on this GPU"):
            M._place(preset, pipe)
        assert pipe.calls == []
    else:
        assert M._place(preset, pipe).calls == [expect]


def test_component_bytes_counts_weights_in_the_run_dtype():
    pipe = type("P", (), {"components": {"transformer": torch.nn.Linear(10, 10), "tokenizer": object()}})()
    assert G.component_bytes(pipe) == {"transformer": 110 * 4}
    assert G.component_bytes(pipe, torch.bfloat16) == {"transformer": 110 * 2}


# ---- ZeroGPU ------------------------------------------------------------------------------------------------------
def test_zero_gpu_duration_grows_with_steps_size_frames_and_extra_runs():
    flux = _flux_dev_shape()
    base = G.zero_gpu_duration(flux, 28)
    assert G.zero_gpu_duration(flux, 50) > base
    assert G.zero_gpu_duration(_flux_dev_shape(1536), 28) > base
    assert G.zero_gpu_duration(flux, 28, compare=True) > base
    assert G.zero_gpu_duration(flux, 28, compile_warmup=True) > base
    assert G.zero_gpu_duration(flux, 28, calibrate=True) > G.zero_gpu_duration(flux, 28, compare=True)
    # one plain FLUX.1-dev-sized step at 1024² took 0.184 s on the H100: the ask covers them with room
    assert 2 * 50 * 0.184 * 1.4 < G.zero_gpu_duration(flux, 50, compare=True) - 20 < 2 * 50 * 0.184 * 1.6
    small = G.Shape(tokens=100, inner_dim=64, blocks=4)
    assert G.zero_gpu_duration(small, 28) == 30 and G.zero_gpu_duration(_flux_dev_shape(2048), 100, True, True, True) == 600


def test_app_asks_zero_gpu_for_a_duration_from_the_run():
    cfg = type("Cfg", (), dict(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38))
    model = type("Model", (), dict(pipe=type("P", (), dict(transformer=type("T", (), dict(config=cfg)))),
                                   size_multiple=16, compiler=None,
                                   preset=type("Pr", (), dict(max_sequence_length=512))))
    spec = R.RunSpec(M.TINY, "p", 0, 28, 256, 256, 1.0)
    short = app.zero_gpu_duration(model, spec, None, None, False, None, None, None)
    spec_long = R.RunSpec(M.TINY, "p", 0, 100, 512, 512, 1.0)
    assert app.zero_gpu_duration(model, spec_long, None, None, True) > short >= 30
    video = R.RunSpec(M.TINY, "p", 0, 28, 512, 512, 1.0, frames=33)
    assert app.zero_gpu_duration(model, video, None, None, True) > app.zero_gpu_duration(model, spec_long, None,
                                                                                          None, True)
    spec.compile = True
    assert app.zero_gpu_duration(model, spec) > short


@pytest.fixture(scope="module")
def rlab_random():
    return app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.2)


# ---- compile --------------------------------------------------------------------------------------------------------
def test_compile_is_refused_on_a_cpu_preset_with_the_reason(rlab_random):
    with pytest.raises(gr.Error, match="compile needs a GPU preset.*Untick compile"):
        list(rlab_random.generate(Session(), model=M.TINY, prompt="p", method=LM.FULL, steps=2, compile=True))
    with pytest.raises(gr.Error, match="compile must be true or false"):
        list(rlab_random.generate(Session(), model=M.TINY, prompt="p", method=LM.FULL, steps=2, compile="yes"))


class _Blocks(torch.nn.Module):
    _repeated_blocks = ["Linear"]

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.compile_calls = []

    def compile_repeated_blocks(self, **kw):
        self.compile_calls.append(kw)
        for m in (self.a, self.b):
            m._compiled_call_impl = lambda *a, _m=m, **k: ("compiled", _m)


def test_compiled_blocks_switch_between_compiled_and_eager_without_compiling_twice():
    t = _Blocks()
    c = G.Compiled(t)
    c.set(True)
    assert c.on and t.compile_calls == [{"dynamic": True}] and t.a(torch.zeros(2))[0] == "compiled"
    c.set(False)
    assert not c.on and t.a._compiled_call_impl is None and t.a(torch.zeros(2)).shape == (2,)
    c.set(True)
    assert t.compile_calls == [{"dynamic": True}] and t.b(torch.zeros(2))[0] == "compiled"


def test_compile_on_a_gpu_preset_warms_up_first_and_says_so(rlab_random, monkeypatch):
    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.2)
    monkeypatch.setattr(M.LoadedModel, "on_gpu", property(lambda self: True))
    switched = []
    monkeypatch.setattr(G.Compiled, "set", lambda self, on: switched.append(on) or setattr(self, "on", on))
    runs = []
    real = R.run_to_end
    monkeypatch.setattr(R, "run_to_end", lambda model, spec, cfg, **k: runs.append((spec.steps, type(cfg).__name__)) or
                        real(model, spec, cfg, **k))
    ups = list(lab.generate(Session(), model=M.TINY, prompt="p", method=LM.SPECA, steps=12, width=64, height=64,
                            compile=True, compare=True))
    summaries = [u[app.OUTPUTS.index("summary")] for u in ups]
    assert "**Compiling**" in summaries[0] and "warm-up runs of 8 steps" in summaries[0]
    assert runs[:2] == [(8, "SpeCaConfig"), (8, "FullConfig")]  # the method's graphs and the reference's, before any timing
    assert "compile warm-up" in summaries[-1] and "not timed" in summaries[-1]
    runs.clear()
    ups = list(lab.generate(Session(), model=M.TINY, prompt="p", method=LM.SPECA, steps=12, width=64, height=64,
                            compile=True, compare=False))
    assert runs == [] and "warmed up by an earlier run" in ups[-1][app.OUTPUTS.index("summary")]
    ups = list(lab.generate(Session(), model=M.TINY, prompt="p", method=LM.SPECA, steps=12, width=64, height=64,
                            compare=False))
    assert switched == [True, True, False] and "eager" in ups[-1][app.OUTPUTS.index("summary")]


# ---- bad input on a GPU preset ------------------------------------------------------------------------------------
@pytest.fixture()
def gpu_folder_lab(monkeypatch):
    presets = dict(M.PRESETS)
    name, = M.add_folder_presets([M.TINY_FLUX_DIR], presets, gpu=True)  # a GPU preset (bf16, 256..2048)
    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe(), presets=presets), every_s=0.2)
    return lab, name


def test_a_size_over_the_gpu_presets_limit_names_the_limit_and_the_app_keeps_serving(gpu_folder_lab):
    lab, name = gpu_folder_lab
    with pytest.raises(gr.Error, match="width=4096 is out of range: .* takes 128..2048 pixels"):
        list(lab.generate(Session(), model=name, prompt="p", method=LM.SPECA, width=4096, height=128, steps=2))
    ups = list(lab.generate(Session(), model=name, prompt="p", method=LM.SPECA, width=128, height=128, steps=4,
                            compare=False))
    assert ups[-1][-1].num_steps == 4


@pytest.mark.parametrize("where", ["run", "compile warm-up"])
def test_out_of_memory_on_a_gpu_preset_answers_with_the_fix_and_the_app_keeps_serving(gpu_folder_lab, monkeypatch,
                                                                                     where):
    lab, name = gpu_folder_lab
    pipe = lab.manager.get(name).pipe
    real_call = type(pipe).__call__

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    if where == "run":
        monkeypatch.setattr(type(pipe), "__call__", oom)
        match = "out of memory at 128x128 with 4 steps: lower the size"
        extra = {}
    else:  # outside the streamed run: the compile warm-up's own call
        monkeypatch.setattr(M.LoadedModel, "on_gpu", property(lambda self: True))
        monkeypatch.setattr(G.Compiled, "set", lambda self, on: None)
        monkeypatch.setattr(R, "run_to_end", lambda *a, **k: oom(None))
        match = "out of GPU memory: lower the size.*the app goes on serving"
        extra = dict(compile=True)
    with pytest.raises(gr.Error, match=match):
        list(lab.generate(Session(), model=name, prompt="p", method=LM.SPECA, width=128, height=128, steps=4,
                          compare=False, **extra))
    monkeypatch.setattr(type(pipe), "__call__", real_call)
    monkeypatch.undo()
    assert lab.manager.get(name).line.idle()
    ups = list(lab.generate(Session(), model=name, prompt="p", method=LM.SPECA, width=128, height=128, steps=4,
                            compare=False))
    assert ups[-1][-1].num_steps == 4


# ---- streaming: the preview leaves the device outside the denoising loop ----------------------------------------
def test_previews_are_drawn_by_the_consumer_not_in_the_pipelines_loop(rlab_random, monkeypatch):
    model = rlab_random.manager.get(M.TINY)
    threads, seen = [], []
    real = O.ImageOutput.preview

    def preview(self, latents):
        threads.append(threading.current_thread().name)
        seen.append(type(latents))
        return real(self, latents)

    monkeypatch.setattr(O.ImageOutput, "preview", preview)
    spec = R.RunSpec(M.TINY, "p", 0, 12, 64, 64, 1.0)
    ups = list(R.stream_run(model, spec, LM.by_label(LM.FULL).build({}), every_s=0.0))
    assert threads and "speclab-run" not in threads and all(t is torch.Tensor for t in seen)
    assert ups[-1].preview is not None and ups[-1].preview.size == (64, 64)


def test_preview_size_is_capped():
    assert O.preview_size(1024, 1024) == (512, 512)
    assert O.preview_size(960, 544) == (512, 290)
    assert O.preview_size(128, 64) == (128, 64)


# ---- streaming: the work per update at FLUX.1-dev's 1024² token grid ------------------------------------------
def _cells(fig) -> int:
    return sum(int(np.asarray(t.z).size) for t in fig.data if getattr(t, "z", None) is not None)


def test_an_update_at_step_50_draws_as_many_map_cells_as_at_step_5_on_a_64x64_grid():
    n, grid = 50, (64, 64)
    trace = Trace(method="speca", config={}, model="M", num_steps=n, token_grid=list(grid))
    cells, points = {}, {}
    g = np.random.default_rng(0)
    for i in range(n):
        full = i < 3 or i % 7 == 0
        rec = StepRecord(step=i, num_steps=n, decision=FULL if full else ACCEPTED, reason="",
                         error=None if full else 0.1, errors=None if full else [0.1], threshold=0.3,
                         time_ms=10.0, blocks_computed=57.0 if full else 1.0, blocks_total=57)
        if not full:
            rec.set_map("error", g.random(grid, dtype=np.float32))
        trace.append(rec)
        if i + 1 in (5, n):
            snap = trace.snapshot()
            cells[i + 1] = _cells(V.token_maps_figure(snap))
            points[i + 1] = sum(len(t.x) for t in V.timeline_figure(snap).data if getattr(t, "x", None) is not None)
    assert cells[5] == cells[n] == 64 * 64  # the newest map only, never the whole history of maps
    assert points[n] <= points[5] * n / 5 + 10  # the timeline grows by one bar per step, nothing more


# ---- the device script's arithmetic ---------------------------------------------------------------------------------
def test_gpu_lab_bare_wall_adds_what_the_prompt_and_decode_cost_to_the_latent_call():
    """Bare wall of a lab request = the method's latent-out call + (the plain 2-step call with prompt and decode -
    2 plain steps); bench speedup = plain latent / the method's latent."""
    from scripts.bench import gpu_lab as GL

    rows = {"flux": {"rows": [
        dict(method="Full+text+decode", steps=GL.PIL_STEPS, wall_s=1.0),
        dict(method=GL.FULL, steps=28, latent_wall_s=5.6, peak_gib=1.0),
        dict(method=GL.SPECA, steps=28, latent_wall_s=1.4, peak_gib=1.0)]}}
    text_decode = 1.0 - GL.PIL_STEPS * 5.6 / 28
    assert GL.bare_wall(rows, "flux", GL.SPECA, 28) == pytest.approx((1.4 + text_decode, 4.0))
    assert GL.bare_wall(rows, "flux", GL.SPECA, 50) == (None, None)
    lab = [dict(kind="lab", family="flux", method=GL.SPECA, steps=28, image_s=(1.4 + text_decode) * 1.05,
                shown_speedup=3.8)]
    line = GL.table(rows, lab)[1]
    assert "5.0%" in line and "0.950" in line

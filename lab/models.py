"""Model presets and loading: each pipeline is loaded once per process, and every failure becomes a
`ModelError` whose message says what is missing and how to fix it (never a stack trace in the UI)."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import LabError, shorten
from .line import Line
from .preview import Previewer

log = logging.getLogger("speclab")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLUX_DIR = os.path.join(ROOT, "assets", "models", "tiny-flux")
TINY_VIDEO_DIR = os.path.join(ROOT, "assets", "models", "tiny-hunyuanvideo")


class ModelError(LabError):
    """A preset that cannot be loaded here; the message is meant for the user."""


@dataclass(frozen=True)
class Preset:
    name: str
    """Label shown in the UI (and the API's `model` value)."""
    source: str
    """Local folder or Hugging Face hub id."""
    kind: str = "local"  # "local" (bundled) | "folder" (`--model PATH`) | "hub" | "planned"
    width: int = 128
    height: int = 128
    steps: int = 28
    guidance: float = 3.5
    max_sequence_length: int = 512
    size_multiple: int | None = None
    """Height/width must be multiples of this; None: the pipeline's `vae_scale_factor * 2`."""
    min_size: int = 32
    max_size: int = 2048
    max_steps: int = 100
    needs_gpu: bool = False
    dtype: str = "float32"
    note: str = ""
    frames: int | None = None
    """Video presets: default number of frames (4k + 1 for HunyuanVideo); None: an image preset."""
    max_frames: int = 129
    fps: int = 8
    pipeline: str | None = None
    """The diffusers pipeline class name (one of `PIPELINES`); None: the local folder's model_index.json says."""
    build_script: str = "python -m scripts.tiny_flux.train"
    """Local presets: the script that produces the folder."""
    prompt_template: dict | None = None
    """HunyuanVideo: the pipeline's ``prompt_template`` (None: the pipeline's default, cut at 95 real-Llama tokens,
    which only the real Llama tokenizer reproduces; the bundled model uses a plain "{}" template)."""

    @property
    def is_video(self) -> bool:
        return self.frames is not None


TINY = "tiny FLUX (bundled, CPU)"
DEV = "FLUX.1-dev (GPU)"
SCHNELL = "FLUX.1-schnell (GPU)"
TINY_VIDEO = "tiny HunyuanVideo (bundled, CPU)"
HUNYUAN = "HunyuanVideo (hub, GPU)"

PRESETS: dict[str, Preset] = {
    TINY: Preset(TINY, TINY_FLUX_DIR, "local", 128, 128, 28, 1.0, 32, None, 32, 512, 100, False, "float32",
                 "trained on captions of coloured shapes; runs on a CPU in seconds"),
    DEV: Preset(DEV, "black-forest-labs/FLUX.1-dev", "hub", 1024, 1024, 28, 3.5, 512, 16, 256, 2048, 100, True,
                "bfloat16", "gated: accept the licence on its hub page and provide HF_TOKEN", pipeline="FluxPipeline"),
    SCHNELL: Preset(SCHNELL, "black-forest-labs/FLUX.1-schnell", "hub", 1024, 1024, 4, 0.0, 256, 16, 256, 2048, 50,
                    True, "bfloat16", "4-step distilled model; Apache-2.0", pipeline="FluxPipeline"),
    TINY_VIDEO: Preset(TINY_VIDEO, TINY_VIDEO_DIR, "local", 64, 64, 20, 1.0, 32, None, 32, 256, 100, False,
                       "float32", "trained on clips of one coloured shape moving left, right, up or down (prompts like "
                       "the video examples); runs on a CPU in seconds", frames=9, max_frames=33,
                       fps=8, build_script="python -m scripts.tiny_video.train",
                       prompt_template={"template": "{}", "crop_start": 0}),
    HUNYUAN: Preset(HUNYUAN, "hunyuanvideo-community/HunyuanVideo", "hub", 512, 320, 30, 6.0, 256, 16, 256, 1280,
                    100, True, "bfloat16", "13B video model; about 40 GB of GPU memory in bfloat16 at small sizes",
                    frames=33, max_frames=129, fps=15, pipeline="HunyuanVideoPipeline"),
}
DEFAULT_PRESET = TINY


def gpu_available() -> bool:
    return torch.cuda.is_available() or bool(os.environ.get("SPACES_ZERO_GPU"))


def runs_on_gpu(preset: Preset) -> bool:
    """Whether `preset` runs on a CUDA GPU here (hub presets, folders loaded in bfloat16 on a GPU machine)."""
    return gpu_available() and (preset.needs_gpu or (preset.kind == "folder" and preset.dtype != "float32"))


def preset_status(name: str) -> str:
    """One line (Markdown) on whether `name` can run here."""
    p = PRESETS.get(name)
    if p is None:
        return f"Unknown model preset {name!r}."
    if p.kind == "planned":
        return f"**{p.name}**: {p.note}; not available yet."
    if p.kind == "local":
        if not os.path.isfile(os.path.join(p.source, "model_index.json")):
            return (f"**{p.name}**: the model folder `{os.path.relpath(p.source, ROOT)}` is missing "
                    f"(it is produced by `{p.build_script}`).")
        return f"**{p.name}**: {p.note}."
    if p.kind == "folder":
        return f"**{p.name}** (`{p.source}`): {p.note}. Loaded on first use."
    if p.needs_gpu and not gpu_available():
        return (f"**{p.name}**: needs a CUDA GPU and this machine has none: use the bundled tiny "
                f"{'HunyuanVideo' if p.is_video else 'FLUX'} here.")
    return f"**{p.name}** (`{p.source}`): {p.note}. Loaded on first use (several minutes the first time)."


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def explain_load_error(preset: Preset, e: BaseException) -> str:
    """Turn a loading exception into a message with the fix."""
    names = {type(x).__name__ for x in _chain(e)}
    text = " ".join(str(x) for x in _chain(e))
    if preset.kind == "folder" and not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower()):
        log.error("loading %s from %s failed", preset.name, preset.source, exc_info=e)
        return (f"could not load {preset.name} from {preset.source}: {type(e).__name__}: {shorten(str(e), 160)}. "
                "The folder may be incomplete, or saved by a diffusers/transformers version this lab cannot read; "
                "the server's log has the details")
    hub_page = f"https://huggingface.co/{preset.source}"
    if "GatedRepoError" in names or "gated" in text.lower() or "401" in text and "Unauthorized" in text:
        return (f"{preset.source} is a gated repository: accept its licence at {hub_page} while logged in, then "
                "give this process a token with access (environment variable HF_TOKEN, or `hf auth login`; "
                "on a Space add HF_TOKEN as a secret).")
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout",
                "ConnectError", "MaxRetryError", "NameResolutionError"} or "offline" in text.lower():
        return (f"cannot download {preset.source}: the Hugging Face Hub is not reachable (offline, or "
                "HF_HUB_OFFLINE=1) and the model is not in the local cache. Connect to the internet, or "
                f"download it once with `hf download {preset.source}`.")
    if "RepositoryNotFoundError" in names:
        return f"{preset.source} was not found on the hub, or this token cannot see it ({hub_page})."
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        need = "about 40 GB" if preset.is_video else "about 24 GB"
        return (f"out of GPU memory while loading {preset.name}: it needs {need} in bfloat16 (plus the text "
                "encoders); free the GPU or use a larger one.")
    log.error("loading %s from %s failed", preset.name, preset.source, exc_info=e)
    return (f"could not load {preset.name} from {preset.source} ({type(e).__name__}); the server's log has the "
            "details")


PIPELINES = ("FluxPipeline", "HunyuanVideoPipeline")
"""diffusers pipeline classes the lab can drive (accel has adapters for their transformers)."""


def pipeline_class(preset: Preset) -> type:
    """The diffusers pipeline class of `preset`: the preset's `pipeline`, else the `_class_name` of its folder's
    model_index.json. Only `PIPELINES` are accepted, with a `ModelError` naming what was found otherwise."""
    import diffusers

    name = preset.pipeline
    if name is None and preset.kind in ("local", "folder"):
        index = os.path.join(preset.source, "model_index.json")
        try:
            with open(index) as f:
                name = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise ModelError(f"{preset.name}: {os.path.relpath(index, ROOT)} is not a readable diffusers "
                             "model_index.json") from None
    if name not in PIPELINES:
        raise ModelError(f"{preset.name}: the lab cannot run a {name or 'pipeline of unknown class'}; it runs "
                         f"{' and '.join(PIPELINES)}")
    return getattr(diffusers, name)


# ---- a local pipeline folder (`python app.py --model PATH`, SPECLAB_MODEL) -----------------------------------------
MODEL_ENV = "SPECLAB_MODEL"
"""Environment variable with pipeline folders to add as presets (separated by the OS path separator, ':'), for
Spaces where the command line is fixed."""


def _read_json(path: str, what: str, folder: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        raise ModelError(f"{folder}: {what} is missing ({os.path.relpath(path, folder)}); a diffusers pipeline folder "
                         "has one (save one with pipe.save_pretrained(PATH))") from None
    except ValueError:
        raise ModelError(f"{folder}: {os.path.relpath(path, folder)} is not valid JSON; the folder is damaged or "
                         "half-written: save or download it again") from None
    if not isinstance(data, dict):
        raise ModelError(f"{folder}: {os.path.relpath(path, folder)} is not a JSON object")
    return data


def _has_llama3_template_tokens(folder: str) -> bool:
    """Whether the text tokenizer knows Llama 3's header tokens, which HunyuanVideo's default prompt template (cut
    at 95 tokens) is written in."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(folder, "tokenizer", name)) as f:
                if "<|start_header_id|>" in f.read():
                    return True
        except OSError:
            pass
    return False


def folder_preset(path: str, gpu: bool | None = None, name: str | None = None) -> Preset:
    """A preset for the diffusers FLUX or HunyuanVideo pipeline saved in folder `path`, its defaults read from
    the folder's configs; a `ModelError` saying what is wrong with a folder that is not one.

    Image (FluxPipeline): the size is the VAE's `sample_size` (FLUX.1: 1024; else the pipeline's default,
    128 latent pixels x the VAE's scale factor), sizes multiples of the VAE's scale factor x 2; a transformer
    with guidance embeds (FLUX.1-dev) takes 28 steps at guidance 3.5; one without and a scheduler without
    dynamic shifting (FLUX.1-schnell) 4 steps, no guidance, 256 text tokens. Text tokens: the T5 tokenizer's
    `model_max_length`, at most 512. Video (HunyuanVideoPipeline): sizes multiples of the VAE's spatial
    compression x the patch size, frames 4k + 1 (the VAE's temporal compression), guidance 6.0 with guidance
    embeds, 256 text tokens. `gpu` (default: whether this machine has one) picks bfloat16 and GPU-sized defaults
    and limits, else float32 and sizes a CPU runs (at most 256 pixels by default)."""
    gpu = gpu_available() if gpu is None else gpu
    folder = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(folder):
        raise ModelError(f"--model {path}: no such folder. Pass a diffusers pipeline folder (the one holding "
                         "model_index.json), e.g. one saved with pipe.save_pretrained(PATH) or downloaded with "
                         "`hf download REPO --local-dir PATH`.")
    if not os.path.isdir(folder):
        raise ModelError(f"--model {path} is a file: pass the pipeline's folder (the one holding model_index.json)")
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        inside = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "model_index.json")))
        hint = f" The folder(s) {', '.join(inside[:3])} inside it are: pass one of them." if inside else (
            " Save a pipeline with pipe.save_pretrained(PATH) or download one with "
            "`hf download REPO --local-dir PATH`.")
        raise ModelError(f"--model {path}: not a diffusers pipeline folder (no model_index.json).{hint}")
    meta = _read_json(index, "model_index.json", folder)
    cls = meta.get("_class_name")
    if cls not in PIPELINES:
        raise ModelError(f"--model {path}: a {cls or 'pipeline of unknown class'}; the lab runs "
                         f"{' and '.join(PIPELINES)} folders (their transformers are the ones accel has adapters "
                         "for)")
    for comp, spec in meta.items():
        if comp.startswith("_") or not isinstance(spec, list) or spec[:1] == [None] or not spec:
            continue
        if not os.path.isdir(os.path.join(folder, comp)):
            raise ModelError(f"--model {path}: model_index.json names a {comp} ({spec[-1]}) but the folder {comp}/ "
                             "is missing; the download or the save was incomplete")
    tcfg = _read_json(os.path.join(folder, "transformer", "config.json"), "the transformer's config", folder)
    vae_path = os.path.join(folder, "vae", "config.json")
    vcfg = _read_json(vae_path, "the VAE's config", folder) if os.path.isfile(vae_path) else {}
    base = name or os.path.basename(folder.rstrip(os.sep)) or folder
    where = "GPU" if gpu else "CPU"
    common = dict(kind="folder", needs_gpu=False, dtype="bfloat16" if gpu else "float32", pipeline=cls,
                  build_script="")
    if cls == "FluxPipeline":
        scale = 2 ** (len(vcfg["block_out_channels"]) - 1) if vcfg.get("block_out_channels") else 8
        multiple = scale * 2
        side = int(vcfg.get("sample_size") or 128 * scale)
        sched = {}
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        if os.path.isfile(sched_path):
            sched = _read_json(sched_path, "the scheduler's config", folder)
        guided = bool(tcfg.get("guidance_embeds", False))
        distilled = not guided and not sched.get("use_dynamic_shifting", True)
        tok_path = os.path.join(folder, "tokenizer_2", "tokenizer_config.json")
        tok_max = _read_json(tok_path, "the T5 tokenizer's config", folder).get("model_max_length", 512) \
            if os.path.isfile(tok_path) else 512
        text_len = int(min(256 if distilled else 512, tok_max if isinstance(tok_max, int) else 512))
        if not gpu:
            side = min(side, 256)
        side = max(multiple, side // multiple * multiple)
        steps, guidance = (4, 0.0) if distilled else (28, 3.5 if guided else 1.0)
        kind_note = "distilled (schnell-like): 4 steps" if distilled else (
            "guidance-distilled (dev-like)" if guided else "no guidance embeds")
        return Preset(f"{base} (folder, {where})", folder, width=side, height=side, steps=steps, guidance=guidance,
                      max_sequence_length=text_len, size_multiple=multiple,
                      min_size=min(256, side) if gpu else multiple, max_size=2048 if gpu else 512, max_steps=100,
                      note=f"FLUX pipeline folder, {kind_note}, {side}x{side} by default", **common)
    spatial = int(vcfg.get("spatial_compression_ratio", 8))
    temporal = int(vcfg.get("temporal_compression_ratio", 4))
    multiple = spatial * int(tcfg.get("patch_size", 2) or 1)
    guided = bool(tcfg.get("guidance_embeds", False))
    if gpu:
        width, height, frames, max_frames, max_size, steps, fps = 512, 320, 33, 129, 1280, 30, 15
    else:
        width, height, frames, max_frames, max_size, steps, fps = 64, 64, 9, 33, 256, 20, 8
    width, height = (max(multiple, v // multiple * multiple) for v in (width, height))
    template = None if _has_llama3_template_tokens(folder) else {"template": "{}", "crop_start": 0}
    return Preset(f"{base} (folder, {where})", folder, width=width, height=height, steps=steps,
                  guidance=6.0 if guided else 1.0, max_sequence_length=256, size_multiple=multiple,
                  min_size=multiple, max_size=max_size, max_steps=100, frames=frames, max_frames=max_frames, fps=fps,
                  prompt_template=template,
                  note=(f"HunyuanVideo pipeline folder, {width}x{height}, {frames} frames (4k + 1: the VAE packs "
                        f"{temporal} frames in one latent frame) by default"
                        + ("" if template is None else "; a plain prompt template (its tokenizer has no Llama 3 "
                           "header tokens)")), **common)


def add_folder_presets(paths, presets: dict[str, Preset] | None = None, gpu: bool | None = None) -> list[str]:
    """Add a preset for each folder of `paths` to `presets` (default `PRESETS`); returns their names. The first
    folder given becomes the default preset."""
    global DEFAULT_PRESET
    presets = PRESETS if presets is None else presets
    names = []
    for path in paths:
        p = folder_preset(path, gpu=gpu)
        if p.name in presets and presets[p.name].source != p.source:
            p = folder_preset(path, gpu=gpu, name=p.source)
        presets[p.name] = p
        names.append(p.name)
    if names and presets is PRESETS:
        DEFAULT_PRESET = names[0]
    return names


def folders_from_env(environ=os.environ) -> list[str]:
    return [p for p in environ.get(MODEL_ENV, "").split(os.pathsep) if p.strip()]


def _place(preset: Preset, pipe):
    """Put a folder's pipeline on the GPU, or offload it, or refuse (`lab.gpu.plan_placement`)."""
    from . import gpu as G

    comps = G.component_bytes(pipe)
    cfg = pipe.transformer.config
    multiple = preset.size_multiple or 16
    shape = G.run_shape(cfg, preset.width, preset.height, multiple, preset.frames,
                        text_tokens=preset.max_sequence_length)
    # the method that holds the most between steps (SpecDiff's K/V) at the preset's default size
    work = G.activation_bytes(shape) + G.method_cache_bytes("specdiff", shape)
    if os.environ.get("SPACES_ZERO_GPU"):  # ZeroGPU: a whole large GPU per call, memory not readable here
        pipe.to("cuda")
        return pipe
    free, total = G.free_memory()
    plan = G.plan_placement(comps, work, free, total, name=preset.name)
    if os.environ.get("SPECLAB_OFFLOAD") == "1" and plan.mode == "gpu":  # asked for (a GPU shared with others)
        plan = G.Placement("offload", f"{preset.name}: model CPU offload (SPECLAB_OFFLOAD=1), though it would fit "
                                      f"on the GPU: {plan.message}")
    log.info("%s", plan.message)
    if plan.mode == "refuse":
        raise ModelError(plan.message)
    if plan.mode == "offload":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to("cuda")
    pipe._speclab_placement = plan
    return pipe


def load_preset(preset: Preset):
    """Default factory: the diffusers pipeline of `preset`, on the GPU if it needs one."""
    if preset.kind == "planned":
        raise ModelError(f"{preset.name}: {preset.note}; not available yet.")
    if preset.kind == "local":
        if not os.path.isfile(os.path.join(preset.source, "model_index.json")):
            what = "video model is not installed" if preset.is_video else "tiny FLUX model is missing"
            raise ModelError(
                f"The bundled {what}: expected a diffusers folder at "
                f"{os.path.relpath(preset.source, ROOT)}/ (with model_index.json). It is produced by "
                f"{preset.build_script}; until then pick another preset."
            )
        cls = pipeline_class(preset)
        try:
            pipe = cls.from_pretrained(preset.source)
        except Exception as e:  # a half-written folder, a version mismatch...
            raise ModelError(explain_load_error(preset, e)) from None
    elif preset.kind == "folder":
        if not os.path.isfile(os.path.join(preset.source, "model_index.json")):
            raise ModelError(f"{preset.name}: the folder {preset.source} has no model_index.json any more")
        cls = pipeline_class(preset)
        try:
            pipe = cls.from_pretrained(preset.source, torch_dtype=getattr(torch, preset.dtype))
            if torch.cuda.is_available():
                pipe = _place(preset, pipe)
                if preset.is_video and hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
                    pipe.vae.enable_tiling()
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(explain_load_error(preset, e)) from None
    else:
        if preset.needs_gpu and not gpu_available():
            need, tiny = ("about 40 GB", "tiny HunyuanVideo") if preset.is_video else ("about 24 GB", "tiny FLUX")
            raise ModelError(
                f"{preset.name} needs a CUDA GPU ({need} in bfloat16) and this machine has none. "
                f"Use the bundled {tiny} preset here, or run the lab on a GPU (e.g. a Hugging Face Space)."
            )
        cls = pipeline_class(preset)
        try:
            pipe = cls.from_pretrained(preset.source, torch_dtype=getattr(torch, preset.dtype))
            pipe.to("cuda")
            if preset.is_video and hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
                pipe.vae.enable_tiling()
        except Exception as e:
            raise ModelError(explain_load_error(preset, e)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LoadedModel:
    preset: Preset
    pipe: object
    line: Line = field(default_factory=Line)
    """One run at a time per pipeline (a pipeline carries one run's hooks): runs wait here for their turn."""
    previewer: Previewer | None = None
    compiler: object = None
    """`lab.gpu.Compiled` once a run asked for compilation; None before."""

    @property
    def on_gpu(self) -> bool:
        """Whether the pipeline runs on a CUDA device (also with model CPU offload)."""
        dev = getattr(self.pipe, "_execution_device", None)
        return getattr(dev, "type", None) == "cuda"

    @property
    def size_multiple(self) -> int:
        if self.preset.size_multiple:
            return self.preset.size_multiple
        if self.is_video:  # HunyuanVideo: the VAE's spatial compression x the transformer's patch size
            patch = int(getattr(self.pipe.transformer.config, "patch_size", 2) or 1)
            return int(getattr(self.pipe, "vae_scale_factor_spatial", 8)) * patch
        return int(getattr(self.pipe, "vae_scale_factor", 8)) * 2

    @property
    def has_text_encoders(self) -> bool:
        p = self.pipe
        return getattr(p, "text_encoder", None) is not None and getattr(p, "tokenizer", None) is not None

    @property
    def is_video(self) -> bool:
        return self.preset.is_video

    @property
    def text_kwargs(self) -> dict:
        """Pipeline arguments that go with a text prompt for this preset."""
        kw = dict(max_sequence_length=self.preset.max_sequence_length)
        if self.preset.prompt_template is not None:
            kw["prompt_template"] = dict(self.preset.prompt_template)
        return kw

    @property
    def takes_guidance(self) -> bool:
        """Whether the pipeline takes `guidance_scale` (FLUX with guidance embeds; HunyuanVideo always)."""
        return self.is_video or bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))


def _warm_up(m: LoadedModel) -> None:
    """One short call so that the first timed run (often the full reference) is not a cold start."""
    try:
        size = max(m.preset.min_size, m.size_multiple * 4)
        kw = dict(height=size, width=size, num_inference_steps=2, output_type="latent")
        if m.is_video:
            kw["num_frames"] = 1
        if m.has_text_encoders:
            kw.update(prompt="warm up", **m.text_kwargs)
        else:
            return
        m.pipe(**kw)
    except Exception:
        pass


class ModelManager:
    """Loads each preset once per process and hands out the same `LoadedModel` afterwards.

    `factory(preset) -> pipeline` is injectable (tests pass a tiny random pipeline)."""

    def __init__(self, factory: Callable | None = None, presets: dict[str, Preset] | None = None):
        self.factory = factory or load_preset
        self.presets = presets or PRESETS
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def preset(self, name: str) -> Preset:
        p = self.presets.get(name)
        if p is None:
            raise ModelError(f"unknown model preset {shorten(name)}: choose one of {list(self.presets)}")
        return p

    def get(self, name: str) -> LoadedModel:
        preset = self.preset(name)
        with self._lock:
            m = self._models.get(name)
            if m is None:
                try:
                    pipe = self.factory(preset)
                except ModelError:
                    raise
                except Exception as e:
                    raise ModelError(explain_load_error(preset, e)) from None
                previewer = Previewer(pipe)
                try:
                    previewer.calibrate()
                except Exception:  # a preview is a nicety: fall back to raw channels
                    previewer.weights = None
                m = LoadedModel(preset, pipe, previewer=previewer)
                if preset.kind in ("local", "folder"):
                    _warm_up(m)
                self._models[name] = m
            return m

    def loaded(self) -> list[str]:
        return list(self._models)

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
    kind: str = "local"  # "local" | "hub" | "planned"
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
    if name is None and preset.kind == "local":
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
                if preset.kind == "local":
                    _warm_up(m)
                self._models[name] = m
            return m

    def loaded(self) -> list[str]:
        return list(self._models)

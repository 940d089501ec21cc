"""Run orchestration: controls -> accel config; one accelerated pipeline call streamed step by step;
the cache of full (reference) runs.

The pipeline runs in a worker thread; `accel`'s `Handle.on_step` and the pipeline's `callback_on_step_end`
feed a queue that `stream_run` turns into `RunUpdate`s (throttled). Hooks are always removed in `finally`,
also when the consumer stops iterating (the browser went away) or the user pressed Stop.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import torch

import accel
from accel.trace import Trace

from .models import LoadedModel
from .preview import decode, unpack
from .video import decode_video, latent_frames, strip, to_pil_frames

SpecDiffConfig = getattr(accel, "SpecDiffConfig", None)

FULL, SPECA, SPECDIFF, TAYLORSEER, FBCACHE = (
    "Full", "SpeCa", "SpecDiff", "TaylorSeerCache (diffusers)", "FirstBlockCache (diffusers)",
)
METHODS = [FULL, SPECA] + ([SPECDIFF] if SpecDiffConfig is not None else []) + [TAYLORSEER, FBCACHE]


class InputError(ValueError):
    """A control value the run cannot use; the message names it."""


def as_int(name: str, v) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}") from None
    if f != int(f):
        raise InputError(f"{name} must be a whole number, got {v!r}")
    return int(f)


def build_config(method: str, p: dict):
    """The accel config for `method` from control values `p` (keys as in `app.generate`'s parameters).
    Raises `InputError` naming the bad field (config classes validate ranges themselves)."""
    try:
        if method == FULL:
            return accel.FullConfig()
        if method == SPECA:
            return accel.SpeCaConfig(
                threshold=float(p["speca_threshold"]), decay=float(p["speca_decay"]),
                order=as_int("Taylor order", p["speca_order"]), warmup_steps=as_int("warm-up", p["speca_warmup"]),
                min_spec_steps=as_int("min speculative steps", p["speca_min_spec"]),
                max_spec_steps=as_int("max speculative steps", p["speca_max_spec"]),
                metric=str(p["speca_metric"]), on_reject=str(p["speca_on_reject"]),
            )
        if method == SPECDIFF:
            if SpecDiffConfig is None:
                raise InputError("SpecDiff is not available in this build of accel")
            return SpecDiffConfig(
                cache_rate=float(p["sd_cache_rate"]), spec_steps=as_int("speculative steps", p["sd_spec_steps"]),
                c2_share=float(p["sd_c2_share"]), history_window=as_int("history window", p["sd_history"]),
                starvation_scale=float(p["sd_starvation"]), warmup_steps=as_int("warm-up", p["sd_warmup"]),
            )
        if method == TAYLORSEER:
            return accel.TaylorSeerConfig(
                cache_interval=as_int("cache interval", p["ts_interval"]),
                disable_cache_before_step=as_int("warm-up", p["ts_warmup"]),
                max_order=as_int("Taylor order", p["ts_order"]), taylor_factors_dtype="float32",
            )
        if method == FBCACHE:
            return accel.FirstBlockConfig(threshold=float(p["fbc_threshold"]))
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{method}: {e}") from None
    except (TypeError, KeyError) as e:
        raise InputError(f"{method}: missing or invalid control value ({e})") from None
    raise InputError(f"unknown method {method!r}: choose one of {METHODS}")


@dataclass
class RunSpec:
    """What to generate (everything but the method)."""

    preset: str
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance: float
    frames: int | None = None
    """Video presets: number of frames; None for image presets."""

    def key(self) -> tuple:
        return (self.preset, self.prompt, self.seed, self.steps, self.width, self.height, round(self.guidance, 4),
                self.frames)


def validate_spec(spec: RunSpec, model: LoadedModel) -> None:
    p = model.preset
    if not spec.prompt or not spec.prompt.strip():
        raise InputError("the prompt is empty: describe the image (see the examples)")
    if not 1 <= spec.steps <= p.max_steps:
        raise InputError(f"steps={spec.steps} is out of range: {p.name} takes 1..{p.max_steps} steps")
    m = model.size_multiple
    for name, v in (("width", spec.width), ("height", spec.height)):
        if not p.min_size <= v <= p.max_size:
            raise InputError(f"{name}={v} is out of range: {p.name} takes {p.min_size}..{p.max_size} pixels")
        if v % m:
            lo, hi = v // m * m, (v // m + 1) * m
            raise InputError(f"{name}={v} is not a multiple of {m}, as {p.name} needs (vae_scale_factor x 2): "
                             f"use {lo if lo >= p.min_size else hi} or {hi}")
    if p.is_video:
        f = spec.frames
        if f is None or not 1 <= f <= p.max_frames:
            raise InputError(f"frames={f} is out of range: {p.name} takes 1..{p.max_frames} frames")
        if (f - 1) % 4:
            lo = (f - 1) // 4 * 4 + 1
            raise InputError(f"frames={f} is not 4k + 1, as {p.name} needs (its VAE packs 4 frames in one "
                             f"latent frame): use {lo} or {lo + 4}")
    if spec.seed < 0 or spec.seed >= 2**63:
        raise InputError(f"seed={spec.seed} is out of range: use 0 .. 2**63-1")


def _hashed_embeds(prompt: str, model: LoadedModel, batch: int = 1):
    """Prompt embeddings for pipelines without text encoders (test pipelines): seeded by the prompt."""
    cfg = model.pipe.transformer.config
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % (2**63)
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.pipe.transformer.parameters()).dtype
    dev = next(model.pipe.transformer.parameters()).device
    txt_dim = getattr(cfg, "joint_attention_dim", None) or cfg.text_embed_dim
    pe = torch.randn(batch, 8, txt_dim, generator=g).to(dev, dtype)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dev, dtype)
    return pe, pooled


def pipe_kwargs(spec: RunSpec, model: LoadedModel) -> dict:
    pipe = model.pipe
    kw = dict(height=spec.height, width=spec.width, num_inference_steps=spec.steps,
              generator=torch.Generator(device="cpu").manual_seed(spec.seed))
    if model.is_video:
        kw["num_frames"] = int(spec.frames)
    if model.has_guidance or model.is_video:  # HunyuanVideo always embeds its guidance
        kw["guidance_scale"] = float(spec.guidance)
    if model.has_text_encoders:
        kw.update(prompt=spec.prompt, **model.text_kwargs)
    else:
        pe, pooled = _hashed_embeds(spec.prompt, model)
        kw.update(prompt_embeds=pe, pooled_prompt_embeds=pooled)
        if model.is_video:
            kw["prompt_attention_mask"] = torch.ones(pe.shape[:2], device=pe.device)
    has_vae = getattr(pipe, "vae", None) is not None
    kw["output_type"] = ("np" if model.is_video else "pil") if has_vae else "latent"
    return kw


def _preview_image(model: LoadedModel, latents: torch.Tensor, spec: RunSpec):
    """Live preview: one image for FLUX (packed latents); a strip of the latent frames for video."""
    size = (spec.width, spec.height)
    if model.is_video:
        return strip(latent_frames(model.previewer, latents, size))
    return model.previewer.to_image(unpack(model.pipe, latents, spec.height, spec.width), size)


@dataclass
class RunUpdate:
    trace: Trace | None
    """A snapshot of the trace so far (safe to read while the run goes on)."""
    preview: object = None
    """Latest latent preview (PIL), or None."""
    step: int = -1
    num_steps: int = 0
    done: bool = False
    image: object = None
    """Final image (PIL) when done; for a video, a strip of evenly spaced frames."""
    frames: list | None = None
    """Video runs: the final video's frames (PIL) when done."""
    stopped: bool = False
    elapsed_s: float = 0.0
    config: dict = field(default_factory=dict)


def snapshot(trace: Trace | None) -> Trace | None:
    if trace is None:
        return None
    return trace.snapshot()


def _oom_message(spec: RunSpec) -> str:
    return (f"out of memory at {spec.width}x{spec.height} with {spec.steps} steps: lower the size (or the "
            "steps), close other runs on this GPU, or use a GPU with more memory")


def stream_run(model: LoadedModel, spec: RunSpec, config, stop: threading.Event | None = None,
               every_s: float = 0.25, preview: bool = True) -> Iterator[RunUpdate]:
    """Run `config` on `model` for `spec`, yielding a `RunUpdate` at most every `every_s` seconds while it
    runs, and a final one with `done=True` (also after Stop: `stopped=True`, the image of the steps done).
    Errors surface as `InputError`/`RuntimeError` with a user-facing message."""
    stop = stop or threading.Event()
    pipe = model.pipe
    kwargs = pipe_kwargs(spec, model)
    if not model.lock.acquire(timeout=600):
        raise RuntimeError(f"{model.preset.name} is busy with another run; try again in a moment")
    handle = None
    worker = None
    events: queue.Queue = queue.Queue()
    try:
        handle = accel.apply(pipe, config)
        handle.on_step = lambda rec: events.put(("step", rec.step))
        state = {"prev": None, "last_preview": 0.0, "final_latents": None, "interrupted": False, "x0_stop": None}
        size = (spec.width, spec.height)

        def x0_estimate(p, i, lat):
            """Flow matching: x0 = x_t - sigma * v, with v from the last Euler step."""
            sig = p.scheduler.sigmas
            if state["prev"] is not None and i + 1 < len(sig):
                ds = float(sig[i + 1] - sig[i])
                if ds != 0:
                    return lat - float(sig[i + 1]) * (lat - state["prev"]) / ds
            return lat

        def on_step_end(p, i, t, cb_kwargs):
            lat = cb_kwargs.get("latents")
            if stop.is_set() and not p._interrupt and i < spec.steps - 1:
                p._interrupt = True
                state["interrupted"] = True
                if lat is not None:
                    state["x0_stop"] = x0_estimate(p, i, lat).detach()
            if lat is None:
                return {}
            now = time.perf_counter()
            last = i == spec.steps - 1
            if preview and (last or p._interrupt or now - state["last_preview"] >= every_s):
                try:
                    img = _preview_image(model, x0_estimate(p, i, lat), spec)
                    events.put(("preview", i, img))
                    state["last_preview"] = now
                except Exception:  # never let a preview break the run
                    pass
            state["prev"] = lat.detach().clone()
            if last:
                state["final_latents"] = lat.detach()
            return {}

        result: dict = {}

        def work():
            try:
                out = pipe(**kwargs, callback_on_step_end=on_step_end,
                           callback_on_step_end_tensor_inputs=["latents"])
                result["images"] = out.frames if model.is_video else out.images
            except BaseException as e:  # re-raised in the consumer
                result["error"] = e
            finally:
                events.put(("end", None))

        start = time.perf_counter()
        worker = threading.Thread(target=work, name="speclab-run", daemon=True)
        worker.start()
        latest_preview, last_step, last_yield, ended = None, -1, 0.0, False
        cfg_dict = config.to_dict()
        while not ended:
            try:
                kind, *rest = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "end":
                ended = True
                continue
            if kind == "preview":
                latest_preview = rest[1]
            elif kind == "step":
                last_step = max(last_step, rest[0])
            now = time.perf_counter()
            if now - last_yield >= every_s:
                last_yield = now
                yield RunUpdate(snapshot(handle.trace), latest_preview, last_step, spec.steps,
                                elapsed_s=now - start, config=cfg_dict)
        worker.join()
        if "error" in result:
            e = result["error"]
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise RuntimeError(_oom_message(spec)) from None
            raise e
        images = result["images"]
        stopped = state["interrupted"]
        frames = None
        if model.is_video:
            lat = state["x0_stop"] if stopped and state["x0_stop"] is not None else None
            if kwargs["output_type"] == "latent":
                frames = latent_frames(model.previewer, lat if lat is not None else images, size)
            else:
                frames = decode_video(pipe, lat) if lat is not None else to_pil_frames(images)
                fl = state["final_latents"]
                if fl is not None and not stopped and model.previewer is not None:
                    try:  # the first latent frame is the first video frame alone (causal VAE)
                        model.previewer.refit(fl[:1, :, 0], frames[0])
                    except Exception:
                        pass
            image = strip(frames)
        elif stopped and state["x0_stop"] is not None:
            # Stopped: show the model's estimate of the clean image at the last step done, not the noisy latents.
            images = state["x0_stop"]
            if kwargs["output_type"] != "latent":
                images = [decode(pipe, images, spec.height, spec.width)]
        if model.is_video:
            pass
        elif kwargs["output_type"] == "latent":
            image = model.previewer.to_image(unpack(pipe, images, spec.height, spec.width), (spec.width, spec.height))
        else:
            image = images[0]
            fl = state["final_latents"]
            if fl is not None and not stopped and model.previewer is not None:
                try:
                    model.previewer.refit(unpack(pipe, fl, spec.height, spec.width), image)
                except Exception:
                    pass
        handle.remove()
        trace = handle.trace
        yield RunUpdate(snapshot(trace), latest_preview, last_step, spec.steps, done=True, image=image,
                        frames=frames, stopped=stopped, elapsed_s=time.perf_counter() - start, config=cfg_dict)
    finally:
        if worker is not None and worker.is_alive():  # consumer went away: end the run, then clean up
            stop.set()
            worker.join()
        if handle is not None:
            handle.remove()
        pipe._interrupt = False
        model.lock.release()


def run_to_end(model: LoadedModel, spec: RunSpec, config, **kw) -> RunUpdate:
    last = None
    for last in stream_run(model, spec, config, preview=False, every_s=3600, **kw):
        pass
    return last


class FullRunCache:
    """Full (reference) runs, keyed by (model, prompt, seed, steps, size, guidance): tuning pays once."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: RunSpec):
        with self._lock:
            v = self._d.get(spec.key())
            if v is not None:
                self._d.move_to_end(spec.key())
            return v

    def put(self, spec: RunSpec, image, trace: Trace, frames: list | None = None) -> None:
        with self._lock:
            self._d[spec.key()] = (image, trace, frames)
            self._d.move_to_end(spec.key())
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

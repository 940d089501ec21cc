"""Run orchestration: one accelerated pipeline call streamed step by step; the cache of full (reference) runs.

The pipeline runs in a worker thread; `accel`'s `Handle.on_step` and the pipeline's `callback_on_step_end`
feed a queue that `stream_run` turns into `RunUpdate`s (throttled). Hooks are always removed in `finally`,
also when the consumer stops iterating (the browser went away) or the user pressed Stop. The caller holds the
model's turn (`LoadedModel.line`): one run at a time per pipeline.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import torch

import accel
from accel.trace import Trace

from .errors import InputError, LabError, shorten
from .limits import Limits
from .models import LoadedModel
from .output import Output, Rendered, output_for


class RunError(LabError):
    """A run that failed for a reason the user can act on (e.g. out of memory)."""


def as_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise InputError(f"{name} must be a number, got {shorten(v)}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {shorten(v)}") from None
    if not math.isfinite(f):
        raise InputError(f"{name} must be a finite number, got {shorten(v)}")
    if f != int(f):
        raise InputError(f"{name} must be a whole number, got {shorten(v)}")
    return int(f)


def as_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{name} must be a number, got {shorten(v)}")
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {shorten(v)}")
    return float(v)


def as_text(name: str, v, limit: int) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InputError(f"{name} must be text, got {type(v).__name__}")
    if len(v) > limit:
        raise InputError(f"{name} is {len(v)} characters long: at most {limit} are accepted")
    return v


MAX_GUIDANCE = 20.0


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
    target_speedup: float = 0.0
    """> 0: the method's speed knob is calibrated to this ideal speedup first (`accel.calibrate`); not in `key`."""
    compile: bool = False
    """GPU presets: run the transformer's blocks compiled (`lab.gpu.Compiled`); not in `key`."""

    def key(self) -> tuple:
        return (self.preset, self.prompt, self.seed, self.steps, self.width, self.height, round(self.guidance, 4),
                self.frames)


def validate_spec(spec: RunSpec, model: LoadedModel, limits: Limits | None = None, compare: bool = False) -> None:
    p = model.preset
    limits = limits or Limits()
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
    if not 0 <= spec.guidance <= MAX_GUIDANCE:
        raise InputError(f"guidance={spec.guidance:g} is out of range: use 0..{MAX_GUIDANCE:g}")
    work = limits.work(spec.steps, spec.width, spec.height, spec.frames, compare)
    if work > limits.max_work:
        frames = f" x {spec.frames} frames" if spec.frames else ""
        raise InputError(
            f"this request is too large for this server: {spec.steps} steps x {spec.width}x{spec.height} px{frames}"
            f"{' x 2 (compare also runs the full run)' if compare else ''} = {work:.0f} M pixel-steps; it takes "
            f"at most {limits.max_work:g} M per request. Lower the steps, the size or the frames"
            f"{', or untick compare' if compare else ''}.")


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


def pipe_kwargs(spec: RunSpec, model: LoadedModel, output: Output | None = None) -> dict:
    output = output or output_for(model, spec)
    kw = dict(height=spec.height, width=spec.width, num_inference_steps=spec.steps,
              generator=torch.Generator(device="cpu").manual_seed(spec.seed), **output.call_kwargs())
    if model.takes_guidance:
        kw["guidance_scale"] = float(spec.guidance)
    if model.has_text_encoders:
        kw.update(prompt=spec.prompt, **model.text_kwargs)
    else:
        pe, pooled = _hashed_embeds(spec.prompt, model)
        kw.update(prompt_embeds=pe, pooled_prompt_embeds=pooled)
        if model.is_video:  # HunyuanVideo needs the mask along with given embeddings
            kw["prompt_attention_mask"] = torch.ones(pe.shape[:2], device=pe.device)
    return kw


@dataclass
class RunUpdate:
    trace: Trace | None
    """A snapshot of the trace so far (safe to read while the run goes on)."""
    preview: object = None
    """Latest latent preview (PIL), or None."""
    step: int = -1
    num_steps: int = 0
    done: bool = False
    result: Rendered | None = None
    """The finished run's pictures (when done)."""
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


def _set_interrupt(pipe, value: bool) -> None:
    """diffusers reads `pipe.interrupt` in its denoising loop, but that is a read-only property over the private
    `_interrupt` (FLUX, HunyuanVideo); its documented way to stop a run is setting `_interrupt` from
    `callback_on_step_end`. Each `__call__` resets it to False at its start; after a stopped run we reset it too,
    so the pipeline reads as not interrupted between runs."""
    pipe._interrupt = value


class _Run:
    """One pipeline call in a worker thread; its callbacks put ("step" | "preview" | "end", ...) events in
    `events`. Stop interrupts the pipeline after the current step and keeps the clean-image estimate."""

    def __init__(self, model: LoadedModel, spec: RunSpec, stop: threading.Event, every_s: float, preview: bool):
        self.model, self.spec, self.stop, self.every_s, self.want_preview = model, spec, stop, every_s, preview
        self.output = output_for(model, spec)
        self.kwargs = pipe_kwargs(spec, model, self.output)
        self.events: queue.Queue = queue.Queue()
        self.prev_latents = None
        self.last_preview_at = 0.0
        self.final_latents = None
        self.stop_latents = None
        self.stopped = False
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="speclab-run", daemon=True)

    def _x0_estimate(self, pipe, i, lat):
        """Flow matching: x0 = x_t - sigma * v, with v from the last Euler step. Device arithmetic only: the
        scheduler's sigmas live on the device, and reading one would make the pipeline's thread wait for it."""
        sig = pipe.scheduler.sigmas
        if self.prev_latents is None or i + 1 >= len(sig):
            return lat
        s_next, ds = sig[i + 1], sig[i + 1] - sig[i]
        if not isinstance(ds, torch.Tensor):
            return lat - s_next * (lat - self.prev_latents) / ds if ds != 0 else lat
        ds = ds.to(lat.device, torch.float32)
        v = (lat.float() - self.prev_latents.float()) / torch.where(ds == 0, torch.ones_like(ds), ds)
        return torch.where(ds == 0, lat.float(), lat.float() - s_next.to(lat.device, torch.float32) * v).to(lat.dtype)

    def _to_host(self, estimate):
        """(host tensor, event or None): the estimate copied to pinned memory without waiting (the consumer waits
        for the event before drawing it); on the CPU, the estimate itself."""
        est = estimate.detach()
        if not est.is_cuda:
            return est, None
        host = est.to("cpu", non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return host, ev

    def _on_step_end(self, pipe, i, t, cb_kwargs):
        lat = cb_kwargs.get("latents")
        last = i == self.spec.steps - 1
        if self.stop.is_set() and not pipe.interrupt and not last:
            _set_interrupt(pipe, True)
            self.stopped = True
            if lat is not None:
                self.stop_latents = self._x0_estimate(pipe, i, lat).detach()
        if lat is None:
            return {}
        now = time.perf_counter()
        if self.want_preview and (last or pipe.interrupt or now - self.last_preview_at >= self.every_s):
            try:  # no host sync in the denoising loop: the consumer waits for the copy and draws it
                self.events.put(("preview", self._to_host(self._x0_estimate(pipe, i, lat))))
                self.last_preview_at = now
            except Exception:  # never let a preview break the run
                pass
        self.prev_latents = lat.detach().clone()
        if last:
            self.final_latents = lat.detach()
        return {}

    def _work(self):
        try:
            out = self.model.pipe(**self.kwargs, callback_on_step_end=self._on_step_end,
                                  callback_on_step_end_tensor_inputs=["latents"])
            self.result = out.frames if hasattr(out, "frames") else out.images
        except BaseException as e:  # re-raised in the consumer
            self.error = e
        finally:
            self.events.put(("end", None))

    def draw(self, pending):
        """The preview image of a clean-image estimate (`_to_host`'s (host tensor, event)), drawn in the
        consumer's thread once its copy has run. None if it cannot be drawn."""
        try:
            host, ev = pending
            if ev is not None:
                ev.synchronize()  # this copy only; the pipeline's thread goes on issuing work
            return self.output.preview(host)
        except Exception:  # never let a preview break the run
            return None

    def raise_error(self) -> None:
        e = self.error
        if e is None:
            return
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RunError(_oom_message(self.spec)) from None
        raise e

    def rendered(self) -> Rendered:
        if self.stopped and self.stop_latents is not None:
            return self.output.finalize(self.result, stop_latents=self.stop_latents)
        return self.output.finalize(self.result, final_latents=None if self.stopped else self.final_latents)


def stream_run(model: LoadedModel, spec: RunSpec, config, stop: threading.Event | None = None,
               every_s: float = 0.25, preview: bool = True) -> Iterator[RunUpdate]:
    """Run `config` on `model` for `spec`, yielding a `RunUpdate` at most every `every_s` seconds while it
    runs, and a final one with `done=True` (also after Stop: `stopped=True`, the picture of the steps done).
    The caller holds the model's turn. Errors the user can act on surface as `RunError`."""
    run = _Run(model, spec, stop or threading.Event(), every_s, preview)
    handle = None
    cfg = config.to_dict()
    try:
        handle = accel.apply(model.pipe, config)
        handle.on_step = lambda rec: run.events.put(("step", rec.step))
        cuda = torch.cuda.is_available() and model.on_gpu
        if cuda:  # the run's peak (one run at a time per model; other models' runs on this GPU would count too)
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run.thread.start()
        pending, latest_preview, last_step, last_yield, ended = None, None, -1, 0.0, False
        first_preview_by = start + 4 * max(every_s, 0.1)
        while not ended:
            try:
                events = [run.events.get(timeout=0.1)]
            except queue.Empty:
                continue
            # everything that came while the caller handled the last update: one update shows the newest of it, and
            # a run that ended meanwhile goes straight to its result (no stale updates before the image)
            while True:
                try:
                    events.append(run.events.get_nowait())
                except queue.Empty:
                    break
            for kind, value in events:
                if kind == "end":
                    ended = True
                elif kind == "preview":
                    pending = value
                else:
                    last_step = max(last_step, value)
            if ended:
                break
            now = time.perf_counter()
            # the first update waits for the first preview (it follows its step's event within the same step)
            awaiting_preview = (run.want_preview and pending is None and latest_preview is None
                                and now < first_preview_by)
            if now - last_yield >= every_s and not awaiting_preview:
                last_yield = now
                pending, latest_preview = None, run.draw(pending) if pending is not None else latest_preview
                yield RunUpdate(snapshot(handle.trace), latest_preview, last_step, spec.steps,
                                elapsed_s=now - start, config=cfg)
        run.thread.join()
        run.raise_error()
        if pending is not None:
            latest_preview = run.draw(pending)
        result = run.rendered()
        handle.remove()
        if cuda:
            handle.trace.meta["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        yield RunUpdate(snapshot(handle.trace), latest_preview, last_step, spec.steps, done=True, result=result,
                        stopped=run.stopped, elapsed_s=time.perf_counter() - start, config=cfg)
    finally:
        if run.thread.is_alive():  # the consumer went away: end the run, then clean up
            run.stop.set()
            run.thread.join()
        if handle is not None:
            handle.remove()
        _set_interrupt(model.pipe, False)


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

    def get(self, spec: RunSpec) -> tuple[Rendered, Trace] | None:
        with self._lock:
            v = self._d.get(spec.key())
            if v is not None:
                self._d.move_to_end(spec.key())
            return v

    def put(self, spec: RunSpec, result: Rendered, trace: Trace) -> None:
        with self._lock:
            self._d[spec.key()] = (result, trace)
            self._d.move_to_end(spec.key())
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

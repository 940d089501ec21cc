"""What every method shares: a model-level hook that knows which step a call is, keeps one state per cache
context, times the call and writes the trace; and the handle that `apply` returns.

State lives in a diffusers `StateManager`, keyed by the `cache_context` name ("cond"/"uncond"), so true-CFG
branches never see each other's caches. A run ends when the pipeline resets stateful hooks (end of its
`__call__`); a step index that goes backwards also starts a new run, so an interrupted run never leaks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters import Adapter, TokenLayout
from .trace import StepRecord, Trace


@dataclass
class StepInfo:
    step: int
    num_steps: int
    context: str
    timestep: float | None
    sigma: float | None


class RunState(BaseState):
    """Per-context state of one run. Methods subclass it and add their caches."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.last_step: int | None = None
        self.layout: TokenLayout | None = None
        self.blocks_computed = 0.0


class StepDriverHook(ModelHook):
    """Model-level hook: locates the step, keeps the per-context state, times and traces the call.
    Subclasses implement `run_step` (the method's decision and compute)."""

    _is_stateful = True
    method = "base"

    def __init__(self, pipe, adapter: Adapter, config, state_cls: type[RunState], handle: "Handle"):
        super().__init__()
        self.pipe = pipe
        self.adapter = adapter
        self.config = config
        self.states = StateManager(state_cls)
        self.handle = handle
        self.n_blocks = len(adapter.blocks())
        self._busy = threading.Lock()
        self._timesteps_cpu: torch.Tensor | None = None

    # ---- step location -------------------------------------------------------------------
    def _locate(self, state: RunState, args, kwargs) -> StepInfo:
        sched = self.pipe.scheduler
        timesteps = getattr(sched, "timesteps", None)
        n = int(len(timesteps)) if timesteps is not None else 0
        idx = getattr(sched, "step_index", None)
        if idx is None:
            idx = getattr(sched, "begin_index", None)
        if idx is None:  # scheduler without an index: count calls
            idx = 0 if state.last_step is None else state.last_step + 1
        idx = int(idx)
        if n and (self._timesteps_cpu is None or len(self._timesteps_cpu) != n or idx == 0):
            self._timesteps_cpu = timesteps.detach().float().cpu()
        t = float(self._timesteps_cpu[idx]) if n and idx < n else None
        sigmas = getattr(sched, "sigmas", None)
        sigma = float(sigmas[idx]) if sigmas is not None and idx < len(sigmas) else None
        name = self.states.context.name
        return StepInfo(step=idx, num_steps=max(n, idx + 1), context=name, timestep=t, sigma=sigma)

    # ---- diffusers hook API ----------------------------------------------------------------
    def new_forward(self, module, *args, **kwargs):
        if self.states._context is None:
            # Called outside a pipeline's `cache_context` (e.g. directly): give it one.
            with module.cache_context("default"):
                return self.new_forward(module, *args, **kwargs)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this pipeline is already inside an accelerated call (another thread?). SpecLab keeps one run's "
                "caches per pipeline: give each concurrent run its own pipeline."
            )
        try:
            return self._call(module, args, kwargs)
        finally:
            self._busy.release()

    def _call(self, module, args, kwargs):
        state = self.states.get_state()
        info = self._locate(state, args, kwargs)
        if state.last_step is not None and info.step <= state.last_step:
            state.reset()  # a new run in this context (the last one ended without a reset)
        if state.layout is None:
            state.layout = self.adapter.token_layout(args, kwargs)
        trace = self.handle._trace_for(info, state.layout)
        rec = StepRecord(
            step=info.step, num_steps=info.num_steps, context=info.context, timestep=info.timestep,
            sigma=info.sigma, blocks_total=self.n_blocks,
        )
        on_cuda = self.config.sync_timing and torch.cuda.is_available() and self._device(module).type == "cuda"
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        state.blocks_computed = 0.0
        out = self.run_step(module, args, kwargs, info, state, rec)
        if on_cuda:
            torch.cuda.synchronize()
        rec.time_ms = (time.perf_counter() - start) * 1000.0
        rec.blocks_computed = state.blocks_computed
        state.last_step = info.step
        trace.append(rec)
        if self.handle.on_step is not None:
            self.handle.on_step(rec)
        return out

    @staticmethod
    def _device(module) -> torch.device:
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def run_step(self, module, args, kwargs, info: StepInfo, state: RunState, rec: StepRecord):
        raise NotImplementedError

    def reset_state(self, module):
        self.states.reset()
        self.handle._end_run()
        return module


class Handle:
    """What `accel.apply` returns. `.trace` is the current (or last) run's trace, `.traces` every run's;
    `.remove()` takes every hook off and restores the pipeline's exact baseline behaviour.
    Also a context manager: `with accel.apply(pipe, cfg) as h: ...` removes on exit."""

    def __init__(self, pipe, adapter: Adapter, method: str, config, hook_name: str):
        self.pipe = pipe
        self.adapter = adapter
        self.method = method
        self.config = config
        self.hook_name = hook_name
        self.traces: list[Trace] = []
        self._current: Trace | None = None
        self.on_step = None
        """Optional callback `f(StepRecord)` called after every denoiser call (the app streams with it)."""
        self.cleanups: list = []
        """Extra callables run by `remove()` (e.g. a diffusers cache to disable), last added first."""
        self.removed = False

    @property
    def trace(self) -> Trace | None:
        return self._current if self._current is not None else (self.traces[-1] if self.traces else None)

    def _new_trace(self, info: StepInfo, layout: TokenLayout) -> Trace:
        return Trace(
            method=self.method, config=self.config.to_dict(), model=type(self.adapter.transformer).__name__,
            num_steps=info.num_steps, token_grid=list(layout.grid),
            meta={"family": self.adapter.family, "n_text_tokens": layout.n_text},
        )

    def _trace_for(self, info: StepInfo, layout: TokenLayout) -> Trace:
        cur = self._current
        if cur is not None:
            seen = [r.step for r in cur.steps if r.context == info.context]
            if seen and info.step <= seen[-1]:  # steps went backwards: a new run began without a reset
                self._end_run()
                cur = None
        if cur is None:
            cur = self._current = self._new_trace(info, layout)
        return cur

    def _end_run(self) -> None:
        if self._current is not None and (self._current.steps or self._current.overhead):
            self.traces.append(self._current)
        self._current = None

    def remove(self) -> None:
        if self.removed:
            return
        transformer = self.adapter.transformer
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.remove_hook(self.hook_name, recurse=True)
        for fn in reversed(self.cleanups):
            fn()
        registry.invalidate_child_registries_cache()
        self._end_run()
        self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register(module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)

"""What every method shares: a model-level hook that knows which step a call is, keeps one state per cache
context, times the call and writes the trace; and the handle that `apply` returns.

State lives in a diffusers `StateManager`, keyed by the `cache_context` name ("cond"/"uncond"), so true-CFG
branches never see each other's caches. A run ends when the pipeline resets stateful hooks (end of its
`__call__`); a step index that goes backwards also starts a new run, so an interrupted run never leaks.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.utils._pytree import tree_unflatten

from .adapters import Adapter, TokenLayout
from .distributed import ContextParallel, check_hook_order, context_parallel, shard_layout
from .trace import StepRecord, Trace


_CONCURRENT = (
    "this pipeline is already running an accelerated call in another thread. SpecLab keeps one run's caches "
    "per pipeline: wait for that call to finish, or give each concurrent run its own pipeline."
)


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
        """The call's token layout (under context parallelism: of the whole call, as the pipeline made it)."""
        self.block_layout: TokenLayout | None = None
        """The layout of the tokens the blocks see: `layout`, or one rank's shard under context parallelism."""
        self.blocks_computed = 0.0


def cuda_event():
    """A CUDA event that can time (a function, so that a test can stand in a fake one)."""
    return torch.cuda.Event(enable_timing=True)


class DeviceReads:
    """Values a step leaves on the device for the trace only (not for a decision): copied to host memory without
    waiting, and handed to their `fill` once the copy has run. `poll()` (each step, never waits) fills those done;
    `flush()` (end of the run) waits for the rest. On the CPU, `add` fills at once. Host buffers are pinned and
    reused once filled (allocating pinned memory can synchronise). Fills run in the thread that polls: the
    pipeline's; the traces they touched are refreshed (`Trace.refresh`)."""

    def __init__(self):
        self.pending: list[tuple] = []  # (event, host buffers, fill, trace), in stream order
        self._free: dict[tuple, list[torch.Tensor]] = {}

    @staticmethod
    def deferrable(tensors=(), on_device: bool = False) -> bool:
        """Whether reading `tensors` (or waiting for the device, `on_device`) would wait for a GPU."""
        return torch.cuda.is_available() and (on_device or any(t is not None and t.is_cuda for t in tensors))

    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        free = self._free.get((tuple(t.shape), t.dtype))
        return free.pop() if free else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)

    def add(self, fill, tensors=(), trace=None, on_device: bool = False) -> None:
        """`fill(host tensors)` once `tensors` (device tensors or None) are on the host; `on_device`: also wait
        for the device to reach this point (e.g. a timing event recorded just before). `trace`: the trace whose
        records `fill` changes (refreshed after)."""
        if not self.deferrable(tensors, on_device):
            fill([t.detach() if t is not None else None for t in tensors])
            if trace is not None:
                trace.refresh()
            return
        host = []
        for t in tensors:
            if t is None:
                host.append(None)
                continue
            buf = self._buffer(t)
            buf.copy_(t.detach(), non_blocking=True)
            host.append(buf)
        ev = cuda_event()
        ev.record()
        self.pending.append((ev, host, fill, trace))

    def _done(self, entry, touched: dict) -> None:
        ev, host, fill, trace = entry
        fill(host)
        for b in host:
            if b is not None:
                self._free.setdefault((tuple(b.shape), b.dtype), []).append(b)
        if trace is not None:
            touched[id(trace)] = trace

    def poll(self) -> None:
        """Fill what the device has finished, in order, without waiting."""
        touched = {}
        while self.pending and self.pending[0][0].query():
            self._done(self.pending.pop(0), touched)
        for trace in touched.values():
            trace.refresh()

    def flush(self) -> None:
        """Wait for and fill everything pending (the run's end: the device is done with the run anyway)."""
        touched = {}
        while self.pending:
            entry = self.pending.pop(0)
            entry[0].synchronize()
            self._done(entry, touched)
        for trace in touched.values():
            trace.refresh()


def _host_floats(values) -> list[float]:
    """A schedule (tensor on any device, array or list) as Python floats: one device read for all of it."""
    return [float(v) for v in torch.as_tensor(values).detach().float().cpu().tolist()]


def hashable(x):
    """x itself when it can be hashed, else its repr: a part of a dictionary key (e.g. a CUDA graph's, from a
    call's non-tensor arguments)."""
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def call_signature(leaves: list, spec) -> tuple:
    """What a call's structure is, for a dictionary key (a CUDA graph's, a kept output's): its pytree structure and,
    per leaf, a tensor's shape, dtype and device, or the hashable value of anything else. From `tree_flatten`'s
    (leaves, spec) of the call's (args, kwargs)."""
    return str(spec), tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else hashable(x)
                            for x in leaves)


def storage_stamp(module: torch.nn.Module) -> int:
    """A fingerprint of where `module`'s parameters and buffers live (device and address of each): it changes
    when they are moved or reallocated (`.to()` to another device and back), not when their values change."""
    return hash(tuple((t.device, t.data_ptr()) for t in (*module.parameters(), *module.buffers())))


class CallGraph:
    """One call captured as a CUDA graph: its static inputs (clones of the call's tensor leaves, plus any `statics`
    the forward reads besides its arguments) and the outputs the capture left. `replay` copies this call's leaves
    and statics into those buffers and replays; the caller reads `out` (and whatever else the forward wrote into
    buffers it keeps) afterwards. Used by SpeCa's speculative steps and SpecDiff's partial steps."""

    def __init__(self, leaves, spec, statics: tuple = ()):
        self.leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        self.spec = spec
        self.statics = tuple(t.clone() for t in statics)
        """Buffers the forward reads besides its arguments (e.g. SpecDiff's joint rows): hand them to it before
        `capture`."""
        self.graph = None
        self.out = None

    def capture(self, forward, pool=None):
        """Record `forward` over the static leaves, then run it once (capturing records kernels without running
        them). Raises what the capture raises (e.g. a host sync inside the forward)."""
        args, kwargs = tree_unflatten(self.leaves, self.spec)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = forward(*args, **kwargs)
        self.graph.replay()
        return self

    def replay(self, leaves, statics: tuple = ()) -> None:
        for dst, src in zip(self.leaves, leaves):
            if isinstance(dst, torch.Tensor) and dst is not src:
                dst.copy_(src)
        for dst, src in zip(self.statics, statics):
            dst.copy_(src)
        self.graph.replay()


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
        self._owner_lock = threading.Lock()
        self._owner: tuple[int | None, float] = (None, 0.0)
        self._slowest_step_s = 0.0
        self._schedule_ref = None
        self.current_state: RunState | None = None
        """The state of the denoiser call in progress (read by the method's inner hooks)."""
        self.run_states: dict[str, RunState] = {}
        """This run's state of every cache context seen so far (cleared when the run ends)."""
        self._timesteps_cpu: list[float] | None = None
        self._sigmas_ref = None
        self._sigmas_cpu: list[float] | None = None
        self.cp: ContextParallel | None = None
        """The transformer's context parallelism (accel/distributed.py), read at the start of every run."""
        self.reads = DeviceReads()
        """Trace values still on the device (step times by CUDA events, a method's trace-only numbers)."""
        self._graphs: dict = {}
        """A method's CUDA graphs, kept across runs: key -> `CallGraph` (with what the method keeps beside it)."""
        self._seen: set = set()
        """Graph keys called once, eagerly: a key's next call is captured."""
        self._weights_stamp: int | None = None
        self._weights_checked: Trace | None = None

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
        if n and (timesteps is not self._schedule_ref or self._timesteps_cpu is None):
            # The scheduler was set (again) since this hook's last call: a new run, or another call on this
            # pipeline reset the shared scheduler in the middle of this one.
            self._timesteps_cpu = _host_floats(timesteps)
            self._schedule_ref = timesteps
            if state.last_step is not None and idx < n:
                self._check_schedule(idx, args, kwargs)
        t = float(self._timesteps_cpu[idx]) if n and idx < n else None
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None and sigmas is not self._sigmas_ref:
            # A host copy, taken once per schedule: the sigmas live on the device after `set_timesteps(device=...)`,
            # and reading one there every step would wait for the device (the speculative step's GPU work would
            # then wait for the host to issue it, instead of the host running ahead).
            self._sigmas_cpu = _host_floats(sigmas)
            self._sigmas_ref = sigmas
        sigma = float(self._sigmas_cpu[idx]) if sigmas is not None and idx < len(self._sigmas_cpu) else None
        name = self.states.context.name
        return StepInfo(step=idx, num_steps=max(n, idx + 1), context=name, timestep=t, sigma=sigma)

    def _check_schedule(self, idx: int, args, kwargs) -> None:
        """Raise if this call's own timestep is not the scheduler's step `idx` (one host sync, only when the
        scheduler was set during a run): then another caller reset the scheduler under this run, whose
        output would be silently wrong."""
        t_call = float(self.adapter.call_timestep(args, kwargs).flatten()[0]) * self.adapter.timestep_scale
        t_sched = float(self._timesteps_cpu[idx])
        if abs(t_call - t_sched) > 1e-3 * max(1.0, abs(t_sched)):
            raise RuntimeError(
                "another call on this pipeline reset its scheduler in the middle of this run, so this run cannot "
                "go on correctly. A pipeline runs one call at a time: give each concurrent run its own pipeline, "
                "or wait for the running call to finish."
            )

    # ---- diffusers hook API ----------------------------------------------------------------
    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        try:
            self.states.context
        except ValueError:
            # Called outside a pipeline's `cache_context` (e.g. directly): give it one.
            with module.cache_context("default"):
                return self.new_forward(module, *args, **kwargs)
        self._claim()
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(_CONCURRENT)
        try:
            return self._call(module, args, kwargs)
        except BaseException:
            self._release()  # the run is abandoned: another thread may use the pipeline now
            raise
        finally:
            self.current_state = None
            self._busy.release()

    # ---- one run at a time -----------------------------------------------------------------
    def _claim(self) -> None:
        """The thread of a run's first denoiser call owns the pipeline until the run ends (the pipeline's
        reset), raises, or goes quiet for longer than `_stale_after()`. A call from another thread meanwhile
        raises at once, before touching any state, so the owner's run goes on undisturbed."""
        me = threading.get_ident()
        now = time.monotonic()
        with self._owner_lock:
            owner, last = self._owner
            if owner is not None and owner != me:
                alive = any(t.ident == owner for t in threading.enumerate())
                if alive and now - last < self._stale_after():
                    raise RuntimeError(_CONCURRENT)
            self._owner = (me, now)

    def _release(self) -> None:
        with self._owner_lock:
            self._owner = (None, 0.0)

    def _stale_after(self) -> float:
        """Seconds of silence after which an owner's run counts as abandoned (its thread raised outside the
        transformer, e.g. in a step callback): 30 s, or 10 of its slowest steps."""
        return max(30.0, 10.0 * self._slowest_step_s)

    def _call(self, module, args, kwargs):
        self.reads.poll()
        state = self.states.get_state()
        info = self._locate(state, args, kwargs)
        self.current_state = state
        restarted = state.last_step is not None and info.step <= state.last_step
        if restarted:
            state.reset()  # a new run in this context (the last one ended without a reset)
            self.run_states.clear()
        if not self.run_states:
            self._find_context_parallel()
            self.reads.flush()  # the last run's, if it ended without the pipeline's reset
            self.on_new_run()
        self.run_states[info.context] = state
        if state.layout is None:
            state.layout = self.adapter.token_layout(args, kwargs)
            state.block_layout = shard_layout(state.layout, self.cp) if self.cp is not None else state.layout
        trace = self.handle._trace_for(info, state.layout)
        if self.cp is not None:
            trace.meta["context_parallel"] = {"world": self.cp.world, "rank": self.cp.rank,
                                              "ring_degree": self.cp.ring_degree,
                                              "ulysses_degree": self.cp.ulysses_degree}
        rec = StepRecord(
            step=info.step, num_steps=info.num_steps, context=info.context, timestep=info.timestep,
            sigma=info.sigma, blocks_total=self.n_blocks,
        )
        cuda = torch.cuda.is_available() and self._device(module).type == "cuda"
        synced = cuda and self.config.sync_timing
        if synced:
            torch.cuda.synchronize()
        elif cuda:  # no host sync: the step's device time between two events, read when they have run
            ev_start = cuda_event()
            ev_start.record()
        start = time.perf_counter()
        state.blocks_computed = 0.0
        out = self.run_step(module, args, kwargs, info, state, rec)
        if synced:
            torch.cuda.synchronize()
        host_s = time.perf_counter() - start
        rec.time_ms = host_s * 1000.0
        self._slowest_step_s = max(self._slowest_step_s, host_s)
        rec.blocks_computed = state.blocks_computed
        state.last_step = info.step
        trace.append(rec)
        if cuda and not synced:
            ev_end = cuda_event()
            ev_end.record()

            def timed(_, rec=rec, a=ev_start, b=ev_end):
                rec.time_ms = float(a.elapsed_time(b))

            self.reads.add(timed, trace=trace, on_device=True)
        if self.handle.on_step is not None:
            self.handle.on_step(rec)
        return out

    def _find_context_parallel(self) -> None:
        """Read the transformer's context parallelism (diffusers' `enable_parallelism`) for this run."""
        self.cp = context_parallel(self.adapter.transformer)
        if self.cp is None:
            return
        check_hook_order(self.adapter.transformer, self.handle.hook_name)
        if not self.adapter.supports_context_parallel:
            raise NotImplementedError(
                f"SpecLab does not support context parallelism on {type(self.adapter.transformer).__name__} yet "
                "(only FLUX): run it on one GPU, or without enable_parallelism")

    def weights_moved(self) -> bool:
        """Whether the transformer's weights and buffers live at other addresses than at this check's last run (at
        most one check per run, at its first call; False the first time). CUDA graphs kept across runs read the
        weights at the addresses of their capture: `enable_model_cpu_offload` moves the transformer off the GPU
        after every pipeline call and back at the next, to new memory, so a method drops its graphs when this
        says so. Ask it once the run's first step has computed (the offload hook moves the weights in there)."""
        trace = self.handle.running_trace
        if trace is not None and trace is self._weights_checked:
            return False
        self._weights_checked = trace
        stamp = storage_stamp(self.adapter.transformer)
        moved = self._weights_stamp is not None and stamp != self._weights_stamp
        self._weights_stamp = stamp
        return moved

    def drop_graphs_if_weights_moved(self) -> None:
        """Forget the kept CUDA graphs (and the keys seen) when the weights moved since the last run: they were
        recorded against the old addresses. Call it before using a graph."""
        if self.weights_moved():
            self._graphs.clear()
            self._seen.clear()

    @staticmethod
    def _device(module) -> torch.device:
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def run_step(self, module, args, kwargs, info: StepInfo, state: RunState, rec: StepRecord):
        raise NotImplementedError

    def on_new_run(self) -> None:
        """Called at the first denoiser call of every run (before `run_step`), also when the last run ended in
        an exception without the pipeline's reset."""

    def reset_state(self, module):
        self.reads.flush()
        self.states.reset()
        self.run_states.clear()
        self._release()
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

    @property
    def running_trace(self) -> Trace | None:
        """The trace of the run in progress; None between runs."""
        return self._current

    def _new_trace(self, info: StepInfo, layout: TokenLayout) -> Trace:
        return Trace(
            method=self.method, config=self.config.to_dict(), model=type(self.adapter.transformer).__name__,
            num_steps=info.num_steps, token_grid=list(layout.grid),
            meta={"family": self.adapter.family, "n_text_tokens": layout.n_text},
        )

    def _trace_for(self, info: StepInfo, layout: TokenLayout) -> Trace:
        cur = self._current
        if cur is not None:
            # The context's last recorded step, from the newest records back (one or two under CFG). Not from
            # `cur.series()`: after a `refresh` (a step time read from the device) that rebuilds the trace's
            # columns from every record, O(steps) of host work per step in the pipeline's thread.
            seen = next((r.step for r in reversed(cur.steps) if r.context == info.context), None)
            if seen is not None and info.step <= seen:  # steps went backwards: a new run began without a reset
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
        with beneath_accelerate(transformer):
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
    with beneath_accelerate(module):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


@contextmanager
def beneath_accelerate(module):
    """Diffusers hooks registered or removed inside this block go under accelerate's forward wrapper where the
    module has one (`enable_model_cpu_offload`, `dispatch_model`). That wrapper calls `module._old_forward`, and
    model CPU offload re-installs itself after every pipeline call (`maybe_free_model_hooks`: `forward` set back to
    `_old_forward`, then wrapped again): a hook above it would be dropped there, and removing one would drop
    accelerate's wrapper. Below it, both survive in either order of `apply` and `enable_model_cpu_offload`."""
    outer = module.__dict__.get("forward")
    if outer is None or not hasattr(module, "_hf_hook") or not hasattr(module, "_old_forward"):
        yield
        return
    module.forward = module._old_forward
    try:
        yield
    finally:
        module._old_forward = module.forward
        module.forward = outer

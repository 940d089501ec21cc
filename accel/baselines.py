"""Baselines that write the same `Trace` as SpeCa: a plain run, and diffusers' built-in caches.

    accel.apply(pipe, accel.FullConfig())                          # every step full, traced
    accel.apply(pipe, accel.TaylorSeerConfig(cache_interval=5))    # diffusers TaylorSeerCache
    accel.apply(pipe, accel.FirstBlockConfig(threshold=0.05))      # diffusers FirstBlockCache

The diffusers cache is enabled with `pipe.transformer.enable_cache(...)` and disabled again by
`handle.remove()` (through `handle.cleanups`). What the cache decides is not read from its internals:
`blocks_computed` is measured by counting the real multiply-accumulates of every `nn.Linear` inside the
blocks, block by block, relative to the same block in a full step (the first step of a run is always
full for both caches). A block that is skipped counts 0, a block whose attention is forecast counts the
share of its Linear work that still ran. The counting hooks sit *inside* the cache's hooks, so a
forecast or skipped module is never counted.

FirstBlockCache also gets its decision variable traced: the relative change of the first block's
residual since the last full step (`error`, as diffusers computes it) against `threshold`, and the
per-token change as `maps["error"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import _set_cache_context

from .adapters import Adapter
from .api import register_method
from .config import ConfigBase, knob
from .runtime import Handle, RunState, StepDriverHook, StepInfo, register
from .trace import ACCEPTED, FULL, StepRecord

HOOK_NAME = "speclab_baseline"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- configs ------------------------------------------------------------------------------------------


SYNC_HELP = "Synchronise CUDA around each step so traced times are real."


@dataclass
class FullConfig(ConfigBase):
    """No acceleration: every step computes every block. Traced like the other methods (the reference run)."""

    sync_timing: bool = knob(True, SYNC_HELP, label="synchronised timing", advanced=True)


@dataclass
class TaylorSeerConfig(ConfigBase):
    """diffusers' `TaylorSeerCacheConfig` (arXiv 2503.06923): the attention outputs of every block are
    forecast with a Taylor series between full steps taken every `cache_interval` steps."""

    SPEED_KNOB: ClassVar[str] = "cache_interval"
    """The field that trades quality for speed: a larger value skips more work (`accel.calibrate`)."""

    cache_interval: int = knob(
        5, "Steps between full computations (a full step, then cache_interval - 1 forecast steps).",
        label="cache interval", minimum=1, maximum=10_000, ui_range=(1, 10))
    disable_cache_before_step: int = knob(
        3, "Steps before this index are full (they seed the Taylor factors).",
        label="warm-up steps", minimum=1, maximum=10_000, ui_range=(1, 10), advanced=True)
    disable_cache_after_step: int | None = knob(
        None, "Steps from this index on are full again; None: never.",
        label="full again from step", kind="int", minimum=0, maximum=10_000, optional=True, advanced=True)
    max_order: int = knob(1, "Taylor order of the forecast.", label="Taylor order", minimum=0, maximum=4)
    taylor_factors_dtype: str = knob(
        "bfloat16", "dtype of the stored Taylor factors (diffusers' default: bfloat16).",
        label="Taylor factors dtype", choices=tuple(_DTYPES), advanced=True)
    use_lite_mode: bool = knob(
        False, "diffusers' lite variant: skip whole blocks and forecast only the final proj_out.",
        label="lite mode", advanced=True)
    sync_timing: bool = knob(True, SYNC_HELP, label="synchronised timing", advanced=True)

    def planned_full(self, step: int) -> tuple[bool, str]:
        """diffusers' rule (TaylorSeerCacheHook._measure_should_compute), for the trace's `reason`."""
        if step < self.disable_cache_before_step:
            return True, "warmup"
        if self.disable_cache_after_step is not None and step >= self.disable_cache_after_step:
            return True, "cooldown"
        if (step - self.disable_cache_before_step - 1) % self.cache_interval == 0:
            return True, "interval"
        return False, "forecast"

    def to_diffusers(self):
        from diffusers.hooks import TaylorSeerCacheConfig as _Cfg

        return _Cfg(
            cache_interval=self.cache_interval, disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=self.disable_cache_after_step, max_order=self.max_order,
            taylor_factors_dtype=_DTYPES[self.taylor_factors_dtype], use_lite_mode=self.use_lite_mode,
        )


@dataclass
class FirstBlockConfig(ConfigBase):
    """diffusers' `FirstBlockCacheConfig` (ParaAttention's First Block Cache, after TeaCache): the first block
    always runs; if its residual changed by less than `threshold` (relative mean absolute change since the
    last full step) the other blocks are skipped and their cached residual is added instead."""

    SPEED_KNOB: ClassVar[str] = "threshold"
    """The field that trades quality for speed: a larger value skips more work (`accel.calibrate`)."""

    threshold: float = knob(
        0.05, "Relative change of the first block's residual below which the rest of the model is skipped.",
        minimum=0, maximum=1e6, ui_range=(0, 1), step=0.005)
    sync_timing: bool = knob(True, SYNC_HELP, label="synchronised timing", advanced=True)

    def to_diffusers(self):
        from diffusers.hooks import FirstBlockCacheConfig as _Cfg

        return _Cfg(threshold=float(self.threshold))


# ---- hooks --------------------------------------------------------------------------------------------


class BaselineState(RunState):
    def reset(self, *args, **kwargs) -> None:
        super().reset()
        self.block_ref: dict[int, float] = {}  # MACs of each block in a full step of this run
        self.head_ref: torch.Tensor | None = None  # FBC: first block's residual at the last full step


class _LinearCounter(ModelHook):
    """On an `nn.Linear` inside block `index`: adds the call's multiply-accumulates to the driver's tally."""

    def __init__(self, driver: "BaselineDriver", index: int):
        super().__init__()
        self.driver, self.index = driver, index

    def pre_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs.get("input")
        if x is not None and self.driver.counting:
            self.driver.macs[self.index] += x.numel() * module.out_features  # rows x in x out
        return args, kwargs


class _HeadResidual(ModelHook):
    """On the first block (inside FirstBlockCache's hook): keeps the residual it added to the image tokens."""

    def __init__(self, driver: "BaselineDriver", hidden_index: int):
        super().__init__()
        self.driver, self.hidden_index = driver, hidden_index
        self._input = None

    def pre_forward(self, module, *args, **kwargs):
        self._input = args[0] if args else kwargs.get("hidden_states")
        return args, kwargs

    def post_forward(self, module, output):
        out = output[self.hidden_index] if isinstance(output, tuple) else output
        if self._input is not None and self.driver.counting:
            self.driver.head_residual = (out - self._input).detach()
        self._input = None
        return output


class BaselineDriver(StepDriverHook):
    """Times and traces each step; measures the compute that actually ran inside the blocks."""

    method = "baseline"

    def __init__(self, *args, count: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.count = count
        self.counting = False
        self.macs: list[float] = [0.0] * self.n_blocks
        self.head_residual: torch.Tensor | None = None

    def on_new_run(self) -> None:
        """diffusers resets its cache hooks only at the end of a pipeline call: after a run that ended in an
        exception their state (forecast factors, cached residuals) would leak into this one. Reset them."""
        transformer = self.adapter.transformer
        context = self.states.context  # a reset clears the hooks' cache context too: set it again after
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        for reg in (registry, *registry._get_child_registries()):
            for name, hook in reg.hooks.items():
                if hook._is_stateful and not name.startswith("speclab_"):
                    hook.reset_state(reg._module_ref)
        _set_cache_context(transformer, context)

    def run_step(self, module, args, kwargs, info: StepInfo, state: BaselineState, rec: StepRecord):
        if not self.count:  # plain run: every block, by construction
            out = self.fn_ref.original_forward(*args, **kwargs)
            state.blocks_computed = float(self.n_blocks)
            rec.decision, rec.reason = FULL, "full"
            return out
        self.macs = [0.0] * self.n_blocks
        self.head_residual = None
        self.counting = True
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.counting = False
        done = 0.0
        for i, m in enumerate(self.macs):
            ref = state.block_ref.get(i, 0.0)
            if m > ref:
                state.block_ref[i] = ref = m
            done += min(1.0, m / ref) if ref > 0 else 0.0
        state.blocks_computed = done
        full = done >= self.n_blocks - 1e-6
        self.decide(info, state, rec, full)
        return out

    def decide(self, info: StepInfo, state: BaselineState, rec: StepRecord, full: bool) -> None:
        rec.decision, rec.reason = (FULL, "full") if full else (ACCEPTED, "cached")


class TaylorSeerDriver(BaselineDriver):
    method = "taylorseer"

    def decide(self, info, state, rec, full):
        planned, reason = self.config.planned_full(info.step)
        rec.decision = FULL if full else ACCEPTED
        rec.reason = reason if full == planned else ("measured_full" if full else "measured_partial")


class FirstBlockDriver(BaselineDriver):
    method = "fbcache"

    def decide(self, info, state, rec, full):
        rec.threshold = float(self.config.threshold)
        res, ref = self.head_residual, state.head_ref
        if res is not None and ref is not None and res.shape == ref.shape:
            diff = (res - ref).abs()
            scale = ref.abs().mean()
            rec.error = float(diff.mean() / scale)
            rec.errors = [rec.error]
            if state.layout is not None and res.shape[1] == _prod(state.layout.grid):
                per_token = diff.float().mean(dim=(0, 2)) / scale.float().clamp_min(1e-12)
                rec.set_map("error", per_token.reshape(state.layout.grid))
        if full:
            rec.decision, rec.reason = FULL, "first_step" if ref is None else "changed"
            if res is not None:
                state.head_ref = res
        else:
            rec.decision, rec.reason = ACCEPTED, "cache_hit"


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


# ---- attach -------------------------------------------------------------------------------------------


def _register_counters(adapter: Adapter, driver: BaselineDriver) -> None:
    for block in adapter.blocks():
        for m in block.module.modules():
            if isinstance(m, torch.nn.Linear):
                register(m, _LinearCounter(driver, block.index), HOOK_NAME)


def _enable_cache(handle: Handle, transformer, diffusers_config) -> None:
    try:
        transformer.enable_cache(diffusers_config)
    except Exception:
        handle.remove()
        raise
    handle.cleanups.append(transformer.disable_cache)


@register_method("full", FullConfig)
def attach_full(pipe, adapter: Adapter, config: FullConfig) -> Handle:
    handle = Handle(pipe, adapter, "full", config, HOOK_NAME)
    driver = BaselineDriver(pipe, adapter, config, BaselineState, handle, count=False)
    register(adapter.transformer, driver, HOOK_NAME)
    return handle


@register_method("taylorseer", TaylorSeerConfig)
def attach_taylorseer(pipe, adapter: Adapter, config: TaylorSeerConfig) -> Handle:
    handle = Handle(pipe, adapter, "taylorseer", config, HOOK_NAME)
    driver = TaylorSeerDriver(pipe, adapter, config, BaselineState, handle)
    _register_counters(adapter, driver)  # before the cache: inside its hooks
    register(adapter.transformer, driver, HOOK_NAME)
    _enable_cache(handle, adapter.transformer, config.to_diffusers())
    return handle


@register_method("fbcache", FirstBlockConfig)
def attach_first_block(pipe, adapter: Adapter, config: FirstBlockConfig) -> Handle:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    handle = Handle(pipe, adapter, "fbcache", config, HOOK_NAME)
    driver = FirstBlockDriver(pipe, adapter, config, BaselineState, handle)
    _register_counters(adapter, driver)
    head = adapter.blocks()[0].module
    try:
        hidden_index = TransformerBlockRegistry.get(type(head)).return_hidden_states_index
    except ValueError:
        hidden_index = 0
    register(head, _HeadResidual(driver, hidden_index), HOOK_NAME)
    register(adapter.transformer, driver, HOOK_NAME)
    _enable_cache(handle, adapter.transformer, config.to_diffusers())
    return handle


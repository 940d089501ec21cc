"""SpeCa: forecast the blocks' features with a Taylor series, verify on one real block, accept or fall back.

How a step runs. The transformer's forward iterates its block lists (`Adapter.block_containers`); for the
length of one call the model-level hook (`SpeCaModelHook`) puts a *view* of the blocks there, built once at
attach time, and puts the model's own lists back afterwards:
- a full step's view is the model's own blocks, with stand-ins (`_BlockCall`, a small module around a block)
  where something must be recorded; every block runs as is, so a full step is bit-identical to a plain one.
- a speculative step's view holds only the verify block's stand-in: it adds the forecast of every block before
  the verify block to the streams it receives, runs the verify block for real, measures its feature's forecast
  error, and adds the forecast of every block after it. No other block is called.
Inside the blocks nothing of SpeCa runs, except that a block whose features are forecast runs with a tap
(`_Tap`) in place of each feature's sub-module, for that call only, which hands the output over. So blocks
compiled with `compile_repeated_blocks` keep their graphs (a tapped block gets one graph of its own), the
compiled code guards on no SpeCa state, and after `remove()` nothing of SpeCa is left in the model.

Three forecasts (`SpeCaConfig.forecast`):
- "stack": the blocks' summed contributions. A full step records the streams entering the first block and
  entering the verify block (and leaving it and the last block, when the verify block is not the last); the
  forecast is of their differences (the gated sum of the blocks' contributions, one tensor per stream and Taylor
  order) and of the verify block's feature. Memory: (order + 1) x (streams + the feature). When a speculative
  step may keep the verify block's forecast output (verify_in_grace=False, verify_output="forecast"), the
  streams' growth through the verify block is forecast too.
- "per_block" (the paper's): every block's features, each multiplied by this step's exact gate (from the
  modulation linears, one matrix product for all blocks) and summed by one fused kernel (`kernels.accumulate`).
  Memory: (order + 1) x every feature of every block, plus the stacked gate rows.
- "output": the model's output (the velocity), as diffusers' TaylorSeer lite forecasts it; the stack's segments
  still feed the verify block, which verifies as with "stack". Memory: the stack's, plus (order + 1) x the output.
All verify the same thing: the verify block's own feature (before its gate) against its forecast.

Batch > 1: the error is taken per sample and the step is accepted only if every sample passes (the decision
is shared because the batch runs through one forward); the trace keeps every sample's error
(`batch_error="whole_batch"`: one error over the batch, as the released code).

Context parallelism (diffusers' `enable_parallelism`): the blocks see one rank's token shard; the verification
error is formed from per-row sums all-reduced over the ranks, so every rank takes the same decision, the
single-process one (accel/distributed.py). CUDA graphs are off there.

Speculative steps never wait for the device unless a decision needs the error: with `sync_timing=False`, errors
that only go to the trace are copied to the host without waiting and filled in once the device has run the step
(`accel.runtime.DeviceReads`; `Trace.refresh` then rebuilds its series).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.hooks import ModelHook
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .adapters import Adapter, BlockSpec, FeatureSite
from .api import register_method
from .config import ConfigBase, check, knob
from .kernels import MAX_TERMS, accumulate, add_terms, forecast_error
from .runtime import CallGraph, Handle, RunState, StepDriverHook, StepInfo, call_signature, register
from .taylor import TaylorForecaster
from .trace import ACCEPTED, FULL, REJECTED, StepRecord

HOOK_NAME = "speclab_speca"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


METRICS = ("rel_l1", "rel_rms", "rel_l2", "cosine")
REJECT_POLICIES = ("recompute", "defer")
DISTANCES = ("step", "sigma")
THRESHOLD_STEPS = ("current", "next")
VERIFY_OUTPUTS = ("real", "forecast")
BATCH_ERRORS = ("worst_sample", "whole_batch")
TAYLOR_FORMS = ("newton", "reference")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
FORECASTS = ("stack", "per_block", "output")
STACK = "stack"
OUTPUT = "output"
"""Key of the one forecaster of the stack forecast in `SpeCaState.forecasters` (per_block: block indices)."""


@dataclass
class SpeCaConfig(ConfigBase):
    """SpeCa, "forecast then verify" (arXiv 2509.11628).

    On a speculative step every block's cached features are forecast by a Taylor series fitted on
    past full steps; the verify block is then computed for real from the forecast hidden state and
    its real output is compared with its forecast. Too large an error rejects the step.
    Defaults come from measurements on the trained tiny models, over 16 prompts each (the output forecast,
    the rel_l2 metric at threshold 0.3, order 1; README "SpeCa's verification vs fixed schedules", docs/speca.md);
    `SpeCaConfig.reference()` gives the behaviour of the authors' released code instead (docs/speca.md lists every difference and why the defaults differ).
    """

    SPEED_KNOB: ClassVar[str] = "threshold"
    """The field that trades quality for speed: a larger value skips more work (`accel.calibrate`)."""

    threshold: float = knob(
        0.3, """Base of the acceptance threshold. The threshold at step i of n is `threshold * decay ** (i / n)`.
        The default suits the rel_l2 metric (about 2.6x ideal on the trained tiny FLUX, 2.3x on the tiny
        HunyuanVideo); rel_l2 and cosine take values around 0.05-1, the elementwise rel_l1 around 1-7 (3.0 with
        order 1; the paper's FLUX value, 7.0, is for order 2; docs/speca.md). 0 rejects every verified step.""",
        label="threshold base", minimum=0, ui_range=(0, 5), step=0.01)
    decay: float = knob(
        0.3, "Threshold decay over the run: 1 keeps it constant, smaller tightens it toward the end.",
        label="threshold decay", minimum=0, exclusive_minimum=True, maximum=1, ui_range=(0.01, 1), step=0.01)
    threshold_floor: float = knob(
        0.0, """The threshold never goes below this value: tau = max(threshold * decay ** (i / n), floor). The released
        code uses 0.1; 0 (the default) leaves the schedule as it is.""",
        label="threshold floor", minimum=0, ui_range=(0, 1), step=0.01, advanced=True)
    threshold_step: str = knob(
        "current", """Whose threshold judges a verified step's error. current: step i's error against tau(i).
        next (the released code): step i's error decides whether step i+1 runs full, so it is compared with
        tau(i+1). The trace's threshold is the one the step's error was judged against.""",
        label="threshold of step", choices=THRESHOLD_STEPS, advanced=True)
    order: int = knob(
        1, """Taylor order of the forecast. 0 reuses the last full step's features as they are. The order actually
        used grows with the number of full steps seen (k full steps allow order k-1). Order 2 (the paper's FLUX
        setting) forecasts worse than order 1 on the trained tiny models (docs/speca.md).""",
        label="Taylor order", minimum=0, maximum=4)
    warmup_steps: int = knob(
        3, "The first warm-up steps are always full (they also seed the forecast's history).",
        label="warm-up steps", minimum=1, maximum=10_000, ui_range=(1, 10), advanced=True)
    spec_after_full: bool = knob(
        False, """True (the released code): a full step is always followed by a speculative step, which is never
        verified, warm-up included: the warm-up runs F s F (step 1 reuses step 0's features) instead of F F F.
        Past the warm-up the rules already give a speculative step after a full one; what changes there is only
        that the first speculative step is never verified, even with min speculative steps 0.""",
        label="speculative after full", advanced=True)
    min_spec_steps: int = knob(
        2, """The first speculative steps after a full step are accepted whatever the error (their error is still
        measured and traced, unless verify during grace is off); verification can reject only after them.""",
        label="min speculative steps", minimum=0, maximum=10_000, ui_range=(0, 10), advanced=True)
    max_spec_steps: int = knob(
        8, "After this many consecutive speculative steps the next step is forced full (>= min speculative steps).",
        label="max speculative steps", minimum=1, maximum=10_000, ui_range=(1, 16), advanced=True)
    metric: str = knob(
        "rel_l2", """Verification error (per sample, see batch error). rel_l1: elementwise mean(|pred-real| /
        (|real|+eps)), as the reference code; rel_rms: the root mean square of the same ratio (the reference code's
        "relative L2"); rel_l2 (the default): ||pred-real|| / ||real||, a ratio of norms, which a few near-zero
        elements cannot dominate; cosine: 1 - cos(pred, real).""",
        label="error metric", choices=METRICS, advanced=True)
    batch_error: str = knob(
        "worst_sample", """worst_sample: one error per sample, the step passes only if every sample does (the trace
        keeps them all). whole_batch (the released code): one error over the whole batch (rel_l1, rel_rms, rel_l2
        over every element; cosine as 1 - the samples' mean cosine). Identical for batch 1.""",
        label="batch error", choices=BATCH_ERRORS, advanced=True)
    on_reject: str = knob(
        "recompute", """recompute (the paper): a rejected step is computed again fully, so its output is exact.
        defer (the released code): keep the rejected forecast and make the next step full.""",
        label="on reject", choices=REJECT_POLICIES, advanced=True)
    verify_block: int = knob(
        -1, """Which block verifies, as an index into the model's blocks in execution order (FLUX: 19 double then
        38 single blocks); negative counts from the end. Default: the last block.""",
        label="verify block", minimum=-100_000, maximum=100_000, ui_range=(-8, -1), advanced=True)
    verify_in_grace: bool = knob(
        True, """Compute the verify block on the grace steps too (the first min speculative steps, which are accepted
        whatever the error): their error is traced. False (the released code): on those steps the verify block is
        forecast like every other block, and its error is neither computed nor traced. (A schedule replay
        verifies every speculative step, so it reproduces such a run exactly only with verify output forecast.)""",
        label="verify during grace", advanced=True)
    verify_output: str = knob(
        "real", """What a verified step keeps as the verify block's output. real: its real output (computed anyway,
        and closer to a full step). forecast (the released code): its forecast, like every other block, so the
        verification only measures.""",
        label="verify block output", choices=VERIFY_OUTPUTS, advanced=True)
    forecast: str = knob(
        "output", """What a speculative step forecasts. stack: the sum of the blocks' gated contributions before
        the verify block (and after it), one tensor per stream and Taylor order, and the verify block's feature;
        little memory, and a speculative step costs about one block. per_block (the paper, and the released
        code): every block's features, each multiplied by this step's exact gate; (order + 1) tensors per feature
        of every block. output: the model's output itself (as diffusers' TaylorSeer lite forecasts it), one tensor
        per Taylor order; the verify block still runs on the stack forecast's input and verifies as with stack.
        The default: on the trained tiny models the output is the smoothest thing to forecast (2-5 dB above the
        stack at equal compute, docs/speca.md); on random weights it is the roughest, so random-weight
        benchmarks flatter the other two.""",
        label="forecast", choices=FORECASTS)
    schedule: list[bool] | None = knob(
        None, """Forced schedule replay: one bool per step, True = full step, False = speculative (accepted). When
        set, the warm-up/min/max/threshold rules are not used; verification still runs on speculative steps (its
        error is traced, nothing is rejected). `Trace.schedule()` gives one from an earlier run.""",
        kind="other", optional=True)
    distance: str = knob(
        "step", """Coordinate of the Taylor series: step (step indices, as the reference) or sigma (the
        scheduler's noise level, for non-uniform schedules).""",
        choices=DISTANCES, advanced=True)
    taylor_form: str = knob(
        "newton", """newton: Newton divided differences over the last order+1 full steps, exact for feature
        trajectories that are polynomials of degree <= order. reference: the recursive differences of the
        TaylorSeer/SpeCa code, D[i+1] = (D[i]_new - D[i]_prev) / N, exact only up to order 1.""",
        label="Taylor form", choices=TAYLOR_FORMS, advanced=True)
    warmup_restarts_taylor: bool = knob(
        False, """True (the released code's `step > first_enhance - 2` rule): a full step before step
        warmup_steps - 1 restarts its blocks' Taylor terms at order 0 (no differences with earlier full steps);
        from step warmup_steps - 1 on, full steps build the higher orders. False: every full step does.""",
        label="warm-up restarts Taylor", advanced=True)
    eps: float = knob(
        1e-6, "Added to |real| in the rel_l1 denominator (and to norms) to avoid division by zero.",
        minimum=0, exclusive_minimum=True, advanced=True)
    cache_dtype: str | None = knob(
        None, "dtype of the cached Taylor terms; None keeps the features' dtype.",
        label="cache dtype", choices=CACHE_DTYPES, optional=True, advanced=True)
    record_maps: bool = knob(
        True, "Store the per-token verification error map (image tokens, on the token grid) in the trace.",
        label="record token maps", advanced=True)
    sync_timing: bool = knob(
        True, """Synchronise CUDA around each step so traced times are host wall times (costs a little overlap).
        When off, step times come from CUDA events and errors no decision needs are read once the device has run
        the step, so that only the decisions wait for the device.""",
        label="synchronised timing", advanced=True)
    cuda_graphs: bool = knob(
        True, """On CUDA with the stack or output forecast, replay each speculative step's transformer call as a CUDA graph
        (captured the second time a call of that shape is seen; its inputs, the step's Taylor coefficients and the
        Taylor terms live in fixed buffers). A speculative step is a block's work and many small launches: the
        graph removes the launches' host time, which would otherwise bound the step.""",
        label="CUDA graphs for speculative steps", advanced=True)

    def check_relations(self) -> None:
        check(self.max_spec_steps >= max(1, self.min_spec_steps), "max_spec_steps",
              f"an integer >= max(1, min_spec_steps={self.min_spec_steps})", self.max_spec_steps)
        if self.schedule is not None:
            check(isinstance(self.schedule, (list, tuple)) and 0 < len(self.schedule) <= 100_000
                  and all(isinstance(b, bool) for b in self.schedule),
                  "schedule", "None or a non-empty list of bools (True = full step)", self.schedule)
            check(self.schedule[0], "schedule", "a list whose first entry is True (step 0 must be full)",
                  self.schedule)
            self.schedule = list(self.schedule)

    def threshold_at(self, step: int, num_steps: int) -> float:
        """tau(step) = max(threshold * decay ** (step / num_steps), threshold_floor)."""
        tau = float(self.threshold) * float(self.decay) ** (step / max(1, num_steps))
        return max(tau, float(self.threshold_floor))

    @classmethod
    def reference(cls, **overrides) -> "SpeCaConfig":
        """The behaviour of the authors' released FLUX code (Shenyi-Z/Cache4Diffusion, flux/speca-flux: cal_type,
        taylor_utils, cache_init and the sampling script's defaults), with `overrides` on top. Unknown
        field names raise ValueError. See docs/speca.md, "Library defaults vs the released code"."""
        preset = dict(
            threshold=7.0, decay=0.3, threshold_floor=0.1, threshold_step="next",
            order=2, warmup_steps=3, spec_after_full=True, warmup_restarts_taylor=True, taylor_form="reference",
            distance="step", min_spec_steps=2, max_spec_steps=8,
            metric="rel_l1", eps=1e-10, batch_error="whole_batch",
            on_reject="defer", verify_block=-1, verify_in_grace=False, verify_output="forecast",
            forecast="per_block",
        )
        return cls.from_dict({**preset, **overrides})


class SpeCaState(RunState):
    def reset(self, *args, **kwargs) -> None:
        super().reset()
        self.x = 0.0  # Taylor position of the current step
        self.forecasters: dict[int | str, TaylorForecaster] = {}
        self.consecutive_spec = 0
        self.force_full_next = False
        self.last_full = False  # the previous step of this run was full
        self.verify_now = True  # this speculative step computes the verify block
        self.restart_taylor = False  # this full step restarts the Taylor terms at order 0
        self.verify_errors: torch.Tensor | None = None
        self.verify_map: torch.Tensor | None = None
        self.recorded: dict[str, dict[str, torch.Tensor]] = {}
        """Streams a full step's stand-ins recorded (stack forecast)."""
        self.gate_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None
        """Every gate row of every modulation linear, stacked once per run (per_block forecast)."""
        self.graphs: bool | None = None  # speculative steps replay CUDA graphs (decided at the run's first step)
        self.coef_dev: torch.Tensor | None = None
        """This speculative step's Taylor coefficients in a device buffer, when a CUDA graph reads them."""
        self.rotary: dict[tuple, object] = {}
        """Outputs of the rotary modules (`Adapter.rotary_modules`) kept from this run's full steps, by call."""


def _read_errors(entries, appended: bool = True) -> None:
    """Fill step records with their verification errors (and maps), read from the device. `appended`: the
    records are already in their traces, whose series are then rebuilt."""
    traces = {}
    for trace, rec, errors, emap, grid in entries:
        rec.errors = errors.tolist()
        rec.error = max(rec.errors)
        if emap is not None:
            rec.set_map("error", emap.reshape(grid))
        if appended and trace is not None:
            traces[id(trace)] = trace
    for trace in traces.values():
        trace.refresh()


class _Tap(nn.Module):
    """Stands in for a feature's sub-module (e.g. a single block's `proj_out`) while its block runs in a taped
    call: runs the sub-module and puts its output on the tape. A module rather than a forward hook, because a
    compiled block guards on its sub-modules' types but not on their hooks: a block with taps compiles to a
    graph of its own, and the graphs of the blocks without taps stay the plain ones."""

    def __init__(self, inner: nn.Module, site: FeatureSite, tape: dict):
        super().__init__()
        self.inner = inner
        self.names, self.index, self.tape = site.names, site.index, tape

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if self.index is None:
            self.tape[self.names[0]] = out
        else:
            for name, i in zip(self.names, self.index):
                self.tape[name] = out[i]
        return out


def _slot(root: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute name) of `module` inside `root`."""
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is module:
                return parent, name
    raise ValueError(f"{type(module).__name__} is not a sub-module of {type(root).__name__}")


class _RotaryHook(ModelHook):
    """On a rotary position module (`Adapter.rotary_modules`): hands its calls to the SpeCa driver, which
    lets speculative steps reuse the output of the run's last full step."""

    def __init__(self, driver: "SpeCaModelHook"):
        super().__init__()
        self.driver = driver

    def new_forward(self, module, *args, **kwargs):
        return self.driver._rotary(module, self.fn_ref.original_forward, args, kwargs)


class _BlockCall(nn.Module):
    """Stands in for one block in a step's view of the model: calls `run(block, args, kwargs)`, which calls the
    block itself. The block is held as a plain attribute, not a sub-module: a view adds no parameters."""

    def __init__(self, block: BlockSpec, run):
        super().__init__()
        self.block = block
        self.run = run

    def forward(self, *args, **kwargs):
        return self.run(self.block, args, kwargs)


class _PinnedRing:
    """Rows of pinned host memory handed out in turn, for host-to-device copies that do not wait: a row is
    reused only once the copy that read it has run (an event per row)."""

    def __init__(self, rows: int, width: int):
        self.buf = torch.zeros(rows, width, dtype=torch.float32, pin_memory=True)
        self.events: list = [None] * rows
        self.i = 0

    def copy_to(self, dst: torch.Tensor, values) -> None:
        """dst[:] = values (zero-padded), queued on the current stream without waiting for the device."""
        i = self.i = (self.i + 1) % len(self.events)
        if self.events[i] is not None:
            self.events[i].synchronize()  # long done in practice: the copy that read this row was queued 64 ago
        row = self.buf[i]
        row.zero_()
        row[:len(values)] = torch.tensor(values, dtype=torch.float32)
        dst.copy_(row, non_blocking=True)
        ev = self.events[i] = torch.cuda.Event()
        ev.record()


class SpeCaModelHook(StepDriverHook):
    method = "speca"

    def __init__(self, *a, verify_index: int, **kw):
        super().__init__(*a, **kw)
        cfg: SpeCaConfig = self.config
        self.stack = cfg.forecast in (STACK, OUTPUT)
        """The blocks are forecast by the stack's segments (forecast "output" uses them to feed the verify block)."""
        self.output_forecast = cfg.forecast == OUTPUT
        self.forecast_verify_block = not cfg.verify_in_grace or cfg.verify_output == "forecast"
        """Some speculative steps keep the verify block's forecast output (stack: its growth is forecast too)."""
        self.blocks = self.adapter.blocks()
        self.verify = self.blocks[verify_index]
        self.last = self.n_blocks - 1
        self.verify_key = self.adapter.verify_feature(self.verify)
        self.tape: dict[str, torch.Tensor] = {}
        # Taps for the features the forecast reads: every block's (per_block), or the verify block's verified
        # feature only (stack). block index -> [(parent, attribute, sub-module, tap)]
        self.taps: dict[int, list] = {}
        for b in self.blocks if not self.stack else [self.verify]:
            for site in self.adapter.feature_sites(b):
                if self.stack and self.verify_key not in site.names:
                    continue
                parent, name = _slot(b.module, site.module)
                self.taps.setdefault(b.index, []).append((parent, name, site.module, _Tap(site.module, site, self.tape)))
        self.gate_sites = [(b.index, g) for b in self.blocks for g in self.adapter.gate_sites(b)]
        self.gate_index = {(bi, g.feature): i for i, (bi, g) in enumerate(self.gate_sites)}
        self.containers = self.adapter.block_containers()
        self.full_view, self.spec_view = self._views()
        # CUDA graphs of speculative steps (stack forecast): kept across runs, like the buffers they read
        self._graphable = True
        self._term_store: dict[str, dict] = {}  # cache context -> the stack forecaster's persistent terms
        self._coef_dev: dict[str, torch.Tensor] = {}  # cache context -> [MAX_TERMS] float32 on the device
        self._coef_ring: _PinnedRing | None = None
        self._pool = None
        self._in_spec = False  # a speculative step's forward is running (eagerly or being captured)
        self._rotary_store: dict[tuple, object] = {}  # call key -> kept rotary output, read by CUDA graphs

    # ---- views ---------------------------------------------------------------------------------
    def _views(self) -> tuple[list[nn.ModuleList], list[nn.ModuleList]]:
        """(full step's lists, speculative step's lists), one per block container."""
        v, own = self.verify.index, [list(getattr(owner, name)) for owner, name in self.containers]
        if self.stack:
            marks = {0, v, self.last}
            full_fn = self._full_stack_block
        else:
            marks = set(range(self.n_blocks))
            full_fn = self._full_per_block
        full, spec, i = [], [], 0
        for blocks in own:
            full.append(nn.ModuleList([_BlockCall(self.blocks[i + j], full_fn) if i + j in marks else b
                                       for j, b in enumerate(blocks)]))
            spec.append(nn.ModuleList([_BlockCall(self.verify, self._spec_block)] if i <= v < i + len(blocks) else []))
            i += len(blocks)
        return full, spec

    @contextmanager
    def _view(self, lists: list[nn.ModuleList]):
        """The model iterates `lists` instead of its own block lists for the length of one call."""
        saved = [owner._modules[name] for owner, name in self.containers]
        for (owner, name), blocks in zip(self.containers, lists):
            owner._modules[name] = blocks
        try:
            yield
        finally:
            for (owner, name), blocks in zip(self.containers, saved):
                owner._modules[name] = blocks

    def _run_taped(self, block: BlockSpec, args, kwargs):
        """Run a block with taps on its feature sites; (its output, the features)."""
        taps = self.taps[block.index]
        self.tape.clear()
        for parent, name, _, tap in taps:
            parent._modules[name] = tap
        try:
            out = block.module(*args, **kwargs)
        finally:
            for parent, name, inner, _ in taps:
                parent._modules[name] = inner
        feats = dict(self.tape)
        self.tape.clear()
        return out, feats

    # ---- full steps ----------------------------------------------------------------------------
    def _forecaster(self, state: SpeCaState, key) -> TaylorForecaster:
        f = state.forecasters.get(key)
        if f is None:
            cfg = self.config
            store = self._term_store.setdefault(self.states.context.name, {}) if state.graphs else None
            f = state.forecasters[key] = TaylorForecaster(cfg.order, cfg.taylor_form, _DTYPES.get(cfg.cache_dtype),
                                                          store=store)
        return f

    def _full_per_block(self, block: BlockSpec, args, kwargs):
        state: SpeCaState = self.current_state
        out, feats = self._run_taped(block, args, kwargs)
        self._forecaster(state, block.index).update(state.x, feats, restart=state.restart_taylor)
        return out

    def _full_stack_block(self, block: BlockSpec, args, kwargs):
        state: SpeCaState = self.current_state
        rec, v, adapter = state.recorded, self.verify.index, self.adapter
        if block.index == 0 and v > 0:
            rec["first_in"] = adapter.block_streams(args, kwargs)
        if block.index == v:
            rec["verify_in"] = adapter.block_streams(args, kwargs)
            out, feats = self._run_taped(block, args, kwargs)
            rec["feature"] = {"verify": feats[self.verify_key]}
            rec["verify_out"] = adapter.output_streams(block, out)
        else:
            out = block.module(*args, **kwargs)
        if block.index == self.last and v < self.last:
            rec["last_out"] = adapter.output_streams(block, out)
        return out

    def _update_stack(self, state: SpeCaState) -> None:
        """The stack forecast's new point: the streams' growth before the verify block, through it (only when a
        speculative step may keep its forecast output) and after it, and the verify block's feature."""
        rec, dtype = state.recorded, _DTYPES.get(self.config.cache_dtype)
        feats = dict(rec["feature"])
        segments = [("before", "first_in", "verify_in"), ("after", "verify_out", "last_out")]
        if self.forecast_verify_block:
            segments.append(("block", "verify_in", "verify_out"))
        for name, a, b in segments:
            if a in rec and b in rec:
                for s, x in rec[b].items():
                    y = rec[a][s]
                    feats[f"{name}.{s}"] = x.to(dtype) - y.to(dtype) if dtype is not None else x - y
        state.recorded = {}
        self._forecaster(state, STACK).update(state.x, feats, restart=state.restart_taylor)

    # ---- speculative steps ---------------------------------------------------------------------
    def _spec_block(self, block: BlockSpec, args, kwargs):
        """The verify block's place on a speculative step: the forecast of the blocks before it, then the block
        for real when this step verifies (its error measured), then the forecast of the blocks after it. The
        block's own output is its real one, or its forecast (`verify_output="forecast"`, or a step that does not
        verify)."""
        state: SpeCaState = self.current_state
        adapter, cfg, v = self.adapter, self.config, block.index
        streams = adapter.block_streams(args, kwargs)
        if self.stack:
            forecaster = state.forecasters[STACK]
            coefs = state.coef_dev if state.coef_dev is not None else forecaster.coefficients(state.x)
            terms = forecaster.terms

            def add(streams, segment):
                return {s: add_terms(x, terms[f"{segment}.{s}"], coefs) for s, x in streams.items()}
        else:
            gates = self.all_gates(adapter.block_temb(args, kwargs), state)
            coefs = state.forecasters[v].coefficients(state.x)
            entries = self._entries(state)

            def add(streams, segment):
                return {s: accumulate(x, entries[segment].get(s, []), gates, coefs) for s, x in streams.items()}
        if v > 0:
            streams = add(streams, "before")
        out = None
        if state.verify_now:
            args, kwargs = adapter.with_block_streams(args, kwargs, streams)
            out, real = self._run_taped(block, args, kwargs)
            state.blocks_computed += 1
            verify_terms = terms["verify"] if self.stack else state.forecasters[v].terms[self.verify_key]
            img = adapter.image_tokens(block, self.verify_key, state.block_layout) if cfg.record_maps else None
            # under context parallelism the sums are all-reduced: every rank gets the error of all the tokens
            state.verify_errors, state.verify_map = forecast_error(
                verify_terms, coefs, real[self.verify_key], cfg.metric, cfg.eps, img,
                whole_batch=cfg.batch_error == "whole_batch", cp=self.cp)
        if out is not None and cfg.verify_output == "real":
            if v == self.last:
                return out  # the real output: it is computed anyway and closer to a full step than its forecast
            streams = adapter.output_streams(block, out)
        else:  # the block's output from its forecast, like every other block's
            streams = add(streams, "block")
        if v < self.last:
            streams = add(streams, "after")
        return adapter.block_output(self.blocks[self.last], streams)

    def _entries(self, state: SpeCaState) -> dict[str, dict[str, list]]:
        """Per-block forecast, for `kernels.accumulate`: segment ("before", "block", "after" the verify block) ->
        stream -> [(terms, gate index, row start)]."""
        out: dict[str, dict[str, list]] = {"before": {}, "block": {}, "after": {}}
        v = self.verify.index
        for b in self.blocks:
            side = out["before" if b.index < v else "block" if b.index == v else "after"]
            terms = state.forecasters[b.index].terms
            for c in self.adapter.contributions(b, state.block_layout):
                side.setdefault(c.stream, []).append((terms[c.feature], self.gate_index[(b.index, c.feature)],
                                                      c.row_start))
        return out

    def all_gates(self, temb: torch.Tensor, state: SpeCaState) -> torch.Tensor:
        """Every gate of every block at this step, [G, B, C], from one matrix product: the gate rows of all
        modulation linears, stacked once per run (dropped with the run's state, so weights edited between
        runs are picked up)."""
        if state.gate_weights is None:
            ws, bs = [], []
            for _, g in self.gate_sites:
                d = g.linear.out_features // g.n_chunks
                ws.append(g.linear.weight[g.chunk * d:(g.chunk + 1) * d])
                b = g.linear.bias
                bs.append(ws[-1].new_zeros(d) if b is None else b[g.chunk * d:(g.chunk + 1) * d])
            # a bias-free linear's rows get zeros, so that the others keep theirs
            has_bias = any(g.linear.bias is not None for _, g in self.gate_sites)
            state.gate_weights = (torch.cat(ws), torch.cat(bs) if has_bias else None)
        w, b = state.gate_weights
        x = self.adapter.gate_input(temb).to(w.dtype)
        return torch.nn.functional.linear(x, w, b).unflatten(1, (len(self.gate_sites), -1)).transpose(0, 1).contiguous()

    # ---- decisions -----------------------------------------------------------------------------
    def _plan(self, info: StepInfo, state: SpeCaState) -> tuple[bool, str]:
        """(full?, reason) before the step runs."""
        cfg: SpeCaConfig = self.config
        if cfg.schedule is not None:
            return (cfg.schedule[info.step] if info.step < len(cfg.schedule) else True), "schedule"
        if cfg.spec_after_full and state.last_full:
            return False, ""
        if info.step < cfg.warmup_steps:
            return True, "warmup"
        if not state.forecasters:
            return True, "no_history"
        if state.force_full_next:
            return True, "after_reject"
        if state.consecutive_spec >= cfg.max_spec_steps:
            return True, "max_spec"
        return False, ""

    def _full(self, args, kwargs, state: SpeCaState):
        with self._view(self.full_view):
            out = self.fn_ref.original_forward(*args, **kwargs)
        state.blocks_computed += self.n_blocks
        if self.stack:
            if self.output_forecast:
                state.recorded["feature"]["output"] = self.adapter.output_sample(out)
            self._update_stack(state)
        state.consecutive_spec = 0
        state.force_full_next = False
        state.last_full = True
        return out

    def run_step(self, module, args, kwargs, info: StepInfo, state: SpeCaState, rec: StepRecord):
        cfg: SpeCaConfig = self.config
        if state.graphs is None:  # decided before the first full step: its forecaster keeps persistent terms
            state.graphs = self._graphs_on(module)
        state.x = float(info.step) if cfg.distance == "step" or info.sigma is None else info.sigma
        rec.threshold = cfg.threshold_at(info.step + (cfg.threshold_step == "next"), info.num_steps)
        state.restart_taylor = cfg.warmup_restarts_taylor and info.step < cfg.warmup_steps - 1
        full, reason = self._plan(info, state)
        if full:
            rec.decision, rec.reason = FULL, reason
            return self._full(args, kwargs, state)

        if any(k.startswith("controlnet_") and k.endswith("_samples") and v is not None for k, v in kwargs.items()):
            raise NotImplementedError(
                "SpeCa's speculative steps do not take ControlNet residuals (controlnet_*_samples): a speculative "
                "step runs only the verify block. Use a schedule of full steps, or no ControlNet, with SpeCa.")
        n_spec = state.consecutive_spec + 1
        # Judged by the threshold after the grace steps; the released code never verifies the step right
        # after a full one.
        judged = n_spec > cfg.min_spec_steps and not (cfg.spec_after_full and state.last_full)
        state.last_full = False
        state.verify_now = cfg.schedule is not None or judged or cfg.verify_in_grace
        state.verify_errors = state.verify_map = None
        if state.graphs and self._graphable:
            out = self._graph_spec(args, kwargs, state, info)
        else:
            out = self._spec_forward(*args, **kwargs)
        if self.output_forecast:  # the step's output is the forecast of the model's output
            sample = self.adapter.output_sample(out)
            forecast = state.forecasters[STACK].predict(state.x)["output"]
            out = self.adapter.with_output_sample(out, forecast.to(sample.dtype, copy=True))
        if state.verify_errors is not None:
            entry = (self.handle.running_trace, rec, state.verify_errors, state.verify_map, state.layout.grid)
            decides = judged and cfg.schedule is None  # a fixed schedule decides without the error
            if decides or cfg.sync_timing:
                _read_errors([entry], appended=False)  # the decision needs it now: one host sync
            else:  # for the trace only: copied without waiting, filled in once the device has run the step
                self.reads.add(lambda host, e=entry: _read_errors([(None, e[1], host[0], host[1], e[4])], False),
                               (entry[2], entry[3]), trace=entry[0])
        if cfg.schedule is not None:
            verdict, reason = True, "schedule"
        elif not judged:
            verdict, reason = True, "grace"
        else:
            verdict, reason = (rec.error is None or rec.error <= rec.threshold), "verified"
        if verdict:
            rec.decision, rec.reason = ACCEPTED, reason
            state.consecutive_spec = n_spec
            return out
        rec.decision = REJECTED
        if cfg.on_reject == "recompute":
            rec.reason = "recomputed"
            return self._full(args, kwargs, state)
        rec.reason = "deferred"
        state.consecutive_spec = n_spec
        state.force_full_next = True
        return out

    # ---- CUDA graphs of speculative steps ---------------------------------------------------------------
    def _graphs_on(self, module) -> bool:
        # not under context parallelism: the verification's all-reduce would be captured too (not tried)
        return (bool(self.config.cuda_graphs) and self.stack and self._graphable and self.cp is None
                and self._device(module).type == "cuda")

    def _graph_spec(self, args, kwargs, state: SpeCaState, info: StepInfo):
        """A speculative step's transformer call as a CUDA graph replay. What the recorded kernels read lives in
        fixed buffers: the call's tensor arguments (copied into the graph's own), the step's Taylor coefficients
        (`_coef_dev`, filled from pinned host memory without waiting) and the Taylor terms (the forecaster's
        persistent store). The graph is keyed by everything else they depend on: the cache context, whether the
        step verifies, the number of terms and their addresses, and the call's structure (non-tensor arguments,
        tensor shapes and dtypes). A key's first call runs eagerly (warming up kernels and compilation), its
        second is captured, later ones replay. Outputs are copied out of the graph's buffers. All are dropped when
        the transformer's weights moved since the last run (`weights_moved`: model CPU offload)."""
        self.drop_graphs_if_weights_moved()  # e.g. model CPU offload put the transformer back elsewhere
        forecaster = state.forecasters[STACK]
        coefs = forecaster.coefficients(state.x)
        I = len(coefs)
        context = info.context
        leaves, spec = tree_flatten((args, kwargs))
        device = next(x.device for x in leaves if isinstance(x, torch.Tensor))
        dev = self._coef_dev.get(context)
        if dev is None or dev.device != device:
            dev = self._coef_dev[context] = torch.zeros(MAX_TERMS, device=device, dtype=torch.float32)
        if self._coef_ring is None:
            self._coef_ring = _PinnedRing(64, MAX_TERMS)
        self._coef_ring.copy_to(dev, coefs)
        state.coef_dev = dev[:I]
        terms = tuple(t.data_ptr() for name in sorted(forecaster.terms) for t in forecaster.terms[name][:I])
        key = (context, state.verify_now, bool(self.config.record_maps), I, terms, call_signature(leaves, spec))
        blocks = state.blocks_computed + (1 if state.verify_now else 0)
        try:
            g = self._graphs.get(key)
            if g is not None:
                g.replay(leaves)
            elif key not in self._seen:
                self._seen.add(key)
                return self._spec_forward(*args, **kwargs)
            else:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                try:
                    g = CallGraph(leaves, spec).capture(self._spec_forward, self._pool)
                    g.errors, g.emap = state.verify_errors, state.verify_map  # buffers the graph writes
                except RuntimeError as e:  # e.g. a host sync inside the model's forward: run eagerly from now on
                    self._graphable = False
                    warnings.warn(f"SpeCa: CUDA graph capture failed, speculative steps run eagerly ({e})",
                                  stacklevel=2)
                    state.verify_errors = state.verify_map = None
                    state.blocks_computed = blocks - (1 if state.verify_now else 0)
                    return self._spec_forward(*args, **kwargs)
                self._graphs[key] = g
        finally:
            state.coef_dev = None
        state.blocks_computed = blocks
        state.verify_errors = g.errors.clone() if g.errors is not None else None
        state.verify_map = g.emap.clone() if g.emap is not None else None
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, g.out)

    def _spec_forward(self, *args, **kwargs):
        """The model's forward over the speculative step's view of the blocks (eagerly, or being captured)."""
        self._in_spec = True
        try:
            with self._view(self.spec_view):
                return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._in_spec = False

    # ---- rotary position embeddings ----------------------------------------------------------------
    def _rotary(self, module, forward, args, kwargs):
        """A rotary module's call (`Adapter.rotary_modules`). Full steps compute it and keep the output for this
        run; a speculative step of the same run and cache context, with inputs of the same shapes, takes the
        kept output instead of recomputing it: token positions are set once per pipeline call, and the module
        is tens of small kernels, a measurable share of a step that computes one block. With CUDA graphs the
        output is kept in buffers that live as long as the graphs reading them, updated in place by every full
        step. Not under context parallelism, whose hooks split this module's output."""
        state: SpeCaState | None = self.current_state
        if state is None or self.cp is not None:
            return forward(*args, **kwargs)
        key = (self.states.context.name, id(module), call_signature(*tree_flatten((args, kwargs))))
        if self._in_spec and key in state.rotary:
            return state.rotary[key]
        out = forward(*args, **kwargs)
        kept = out
        if state.graphs:
            kept = self._rotary_store.get(key)
            if kept is None:
                kept = self._rotary_store[key] = tree_map(
                    lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, out)
            else:
                for dst, src in zip(tree_flatten(kept)[0], tree_flatten(out)[0]):
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(src)
        state.rotary[key] = kept
        return out

    def reset_state(self, module):
        # The run is over: read the errors left on the device, and note what SpeCa held between steps (the
        # forecast terms, and the stacked gate rows of the per-block forecast) before the states go.
        self.reads.flush()
        trace = self.handle.running_trace
        if trace is not None:
            terms = sum(f.nbytes() for st in self.run_states.values() for f in st.forecasters.values())
            gates = sum(t.numel() * t.element_size() for st in self.run_states.values()
                        for t in (st.gate_weights or ()) if t is not None)
            rotary = sum(x.numel() * x.element_size() for st in self.run_states.values()
                         for x in tree_flatten(list(st.rotary.values()))[0] if isinstance(x, torch.Tensor))
            trace.meta["cache_bytes"] = terms + gates + rotary
            trace.meta["cache_bytes_terms"] = terms
        return super().reset_state(module)


@register_method("speca", SpeCaConfig)
def attach_speca(pipe, adapter: Adapter, config: SpeCaConfig) -> Handle:
    blocks = adapter.blocks()
    n = len(blocks)
    if not -n <= config.verify_block < n:
        raise ValueError(
            f"verify_block={config.verify_block} is out of range: this model has {n} blocks, "
            f"so verify_block must be in [{-n}, {n - 1}]"
        )
    verify_index = config.verify_block % n
    handle = Handle(pipe, adapter, "speca", config, HOOK_NAME)
    driver = SpeCaModelHook(pipe, adapter, config, SpeCaState, handle, verify_index=verify_index)
    register(adapter.transformer, driver, HOOK_NAME)
    for module in adapter.rotary_modules():
        register(module, _RotaryHook(driver), HOOK_NAME)
    return handle


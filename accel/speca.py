"""SpeCa: forecast every block's features with a Taylor series, verify on one real block, accept or fall back.

Hooks (all registered under one name, so `Handle.remove` takes them all off):
- `SpeCaModelHook` on the transformer decides, per step and per cache context, full or speculative, and after a
  speculative pass reads the verification error and accepts, or rejects (recompute now / full next step).
- `SpeCaBlockHook` on every block: on a full step runs the block as is and records its features into the
  block's forecaster; on a speculative step rebuilds the block's output from forecast features, except the
  verify block, which is computed for real and compared with its forecast.
- `_CaptureHook` on the sub-modules that produce the features (attention, MLP, ...): copies their outputs out
  while the block runs, leaving the computation untouched (so full steps stay bit-exact).

Batch > 1: the error is taken per sample and the step is accepted only if every sample passes (the decision
is shared because the batch runs through one forward); the trace keeps every sample's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.hooks import ModelHook

from .adapters import Adapter, BlockSpec, FeatureSite
from .api import register_method
from .config import ConfigBase, check, knob
from .kernels import accumulate
from .metrics import verification_errors
from .runtime import Handle, RunState, StepDriverHook, StepInfo, register
from .taylor import TaylorForecaster
from .trace import ACCEPTED, FULL, REJECTED, StepRecord

HOOK_NAME = "speclab_speca"
FULL_MODE, SPEC_MODE = "full", "spec"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


METRICS = ("rel_l1", "rel_rms", "rel_l2", "cosine")
REJECT_POLICIES = ("recompute", "defer")
DISTANCES = ("step", "sigma")
THRESHOLD_STEPS = ("current", "next")
VERIFY_OUTPUTS = ("real", "forecast")
BATCH_ERRORS = ("worst_sample", "whole_batch")
TAYLOR_FORMS = ("newton", "reference")
CACHE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SpeCaConfig(ConfigBase):
    """SpeCa, "forecast then verify" (arXiv 2509.11628).

    On a speculative step every block's cached features are forecast by a Taylor series fitted on
    past full steps; the verify block is then computed for real from the forecast hidden state and
    its real output is compared with its forecast. Too large an error rejects the step.
    Defaults are the paper's FLUX settings; `SpeCaConfig.reference()` gives the behaviour of the authors'
    released code instead (docs/speca.md lists every difference and why the defaults differ).
    """

    SPEED_KNOB: ClassVar[str] = "threshold"
    """The field that trades quality for speed: a larger value skips more work (`accel.calibrate`)."""

    threshold: float = knob(
        7.0, """Base of the acceptance threshold. The threshold at step i of n is `threshold * decay ** (i / n)`.
        The default suits the elementwise rel_l1 metric (the paper's FLUX value); for rel_l2 and cosine use values
        around 0.05-0.3. 0 rejects every verified step.""",
        label="threshold base", minimum=0, ui_range=(0, 20), step=0.01)
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
        2, """Taylor order of the forecast. 0 reuses the last full step's features as they are. The order actually
        used grows with the number of full steps seen (k full steps allow order k-1).""",
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
        "rel_l1", """Verification error (per sample, see batch error). rel_l1: elementwise mean(|pred-real| /
        (|real|+eps)), as the reference code; rel_rms: the root mean square of the same ratio (the reference code's
        "relative L2"); rel_l2: ||pred-real|| / ||real||, a ratio of norms; cosine: 1 - cos(pred, real).""",
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
        True, "Synchronise CUDA around each step so traced times are real (costs a little overlap).",
        label="synchronised timing", advanced=True)

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
        )
        return cls.from_dict({**preset, **overrides})


class SpeCaState(RunState):
    def reset(self, *args, **kwargs) -> None:
        super().reset()
        self.mode = FULL_MODE
        self.x = 0.0  # Taylor position of the current step
        self.forecasters: dict[int, TaylorForecaster] = {}
        self.consecutive_spec = 0
        self.force_full_next = False
        self.last_full = False  # the previous step of this run was full
        self.verify_now = True  # this speculative step computes the verify block
        self.restart_taylor = False  # this full step restarts the Taylor terms at order 0
        self.verify_errors: torch.Tensor | None = None
        self.verify_map: torch.Tensor | None = None
        # Speculative step in flight: every gate of the model at this step ([G, B, C]) and the forecast
        # contributions not yet added to the streams (stream -> [(terms, gate index, row start)]).
        self.gates: torch.Tensor | None = None
        self.pending: dict[str, list] = {}
        self.coefs: list[float] = []
        self.gate_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None


class _FeatureSink:
    """Where capture hooks drop the features of the block that is running."""

    def __init__(self):
        self.active = False
        self.feats: dict[str, torch.Tensor] = {}

    def begin(self) -> None:
        self.active, self.feats = True, {}

    def end(self) -> dict[str, torch.Tensor]:
        self.active = False
        feats, self.feats = self.feats, {}
        return feats


class _CaptureHook(ModelHook):
    def __init__(self, site: FeatureSite, sink: _FeatureSink):
        super().__init__()
        self.site, self.sink = site, sink

    def post_forward(self, module, output):
        if self.sink.active:
            if self.site.index is None:
                self.sink.feats[self.site.names[0]] = output
            else:
                for name, i in zip(self.site.names, self.site.index):
                    self.sink.feats[name] = output[i]
        return output


class SpeCaBlockHook(ModelHook):
    def __init__(self, block: BlockSpec, driver: "SpeCaModelHook", is_verify: bool):
        super().__init__()
        self.block = block
        self.driver = driver
        self.is_verify = is_verify
        self.sink = _FeatureSink()

    def _forecaster(self, state: SpeCaState) -> TaylorForecaster:
        f = state.forecasters.get(self.block.index)
        if f is None:
            cfg = self.driver.config
            f = TaylorForecaster(cfg.order, cfg.taylor_form, _DTYPES.get(cfg.cache_dtype))
            state.forecasters[self.block.index] = f
        return f

    def _real(self, args, kwargs, state: SpeCaState):
        self.sink.begin()
        out = self.fn_ref.original_forward(*args, **kwargs)
        feats = self.sink.end()
        state.blocks_computed += 1
        return out, feats

    def new_forward(self, module, *args, **kwargs):
        state: SpeCaState = self.driver.current_state
        forecaster = self._forecaster(state)
        if state.mode == FULL_MODE:
            out, feats = self._real(args, kwargs, state)
            forecaster.update(state.x, feats, restart=state.restart_taylor)
            return out
        driver, adapter = self.driver, self.driver.adapter
        pred = forecaster.predict(state.x)
        if state.gates is None:
            state.gates = driver.all_gates(adapter.block_temb(args, kwargs), state)
        if not (self.is_verify and state.verify_now):
            return self._forecast(args, kwargs, state, pred)
        # Verification: this block for real, from the hidden state the forecast blocks produced.
        args, kwargs = adapter.with_block_streams(args, kwargs, driver.flush(adapter.block_streams(args, kwargs), state))
        out, real = self._real(args, kwargs, state)
        key = adapter.verify_feature(self.block)
        cfg = driver.config
        forecast = pred[key]
        img = adapter.image_tokens(self.block, key, state.layout) if cfg.record_maps else None
        state.verify_errors, state.verify_map = verification_errors(
            forecast, real[key], cfg.metric, cfg.eps, img, whole_batch=cfg.batch_error == "whole_batch")
        if cfg.verify_output == "forecast":  # the released code: the verification only measures
            return self._forecast(args, kwargs, state, pred)
        return out  # the real output: it is computed anyway and strictly better than its forecast

    def _forecast(self, args, kwargs, state: SpeCaState, pred):
        """The block's output on a speculative step, from its forecast features.
        A forecast block only queues gate * forecast; the queue is added to the streams in one pass before the
        next real block (or after the last block): the blocks' sum is all that is needed."""
        driver, adapter = self.driver, self.driver.adapter
        state.coefs = pred.coefs
        for c in adapter.contributions(self.block, state.layout):
            gi = driver.gate_index[(self.block.index, c.feature)]
            state.pending.setdefault(c.stream, []).append((pred.terms[c.feature], gi, c.row_start))
        streams = adapter.block_streams(args, kwargs)
        if self.block.index == driver.n_blocks - 1:
            streams = driver.flush(streams, state)
        return adapter.block_output(self.block, streams)


class SpeCaModelHook(StepDriverHook):
    method = "speca"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate_sites = [(b.index, g) for b in self.adapter.blocks() for g in self.adapter.gate_sites(b)]
        self.gate_index = {(bi, g.feature): i for i, (bi, g) in enumerate(self.gate_sites)}

    def all_gates(self, temb: torch.Tensor, state: SpeCaState) -> torch.Tensor:
        """Every gate of every block at this step, [G, B, C], from one matrix product: the gate rows of all
        modulation linears, stacked once per run (dropped with the run's state, so weights edited between
        runs are picked up)."""
        if state.gate_weights is None:
            ws, bs = [], []
            for _, g in self.gate_sites:
                d = g.linear.out_features // g.n_chunks
                ws.append(g.linear.weight[g.chunk * d:(g.chunk + 1) * d])
                if g.linear.bias is not None:
                    bs.append(g.linear.bias[g.chunk * d:(g.chunk + 1) * d])
            state.gate_weights = (torch.cat(ws), torch.cat(bs) if len(bs) == len(ws) else None)
        w, b = state.gate_weights
        x = self.adapter.gate_input(temb).to(w.dtype)
        return torch.nn.functional.linear(x, w, b).unflatten(1, (len(self.gate_sites), -1)).transpose(0, 1).contiguous()

    def flush(self, streams: dict[str, torch.Tensor], state: SpeCaState) -> dict[str, torch.Tensor]:
        """Add the queued forecast contributions to the streams."""
        if state.pending:
            streams = dict(streams)
            for name, entries in state.pending.items():
                streams[name] = accumulate(streams[name], entries, state.gates, state.coefs)
            state.pending = {}
        return streams

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
        state.mode = FULL_MODE
        out = self.fn_ref.original_forward(*args, **kwargs)
        state.consecutive_spec = 0
        state.force_full_next = False
        state.last_full = True
        return out

    def run_step(self, module, args, kwargs, info: StepInfo, state: SpeCaState, rec: StepRecord):
        cfg: SpeCaConfig = self.config
        state.x = float(info.step) if cfg.distance == "step" or info.sigma is None else info.sigma
        rec.threshold = cfg.threshold_at(info.step + (cfg.threshold_step == "next"), info.num_steps)
        state.restart_taylor = cfg.warmup_restarts_taylor and info.step < cfg.warmup_steps - 1
        full, reason = self._plan(info, state)
        if full:
            rec.decision, rec.reason = FULL, reason
            return self._full(args, kwargs, state)

        n_spec = state.consecutive_spec + 1
        # Judged by the threshold after the grace steps; the released code never verifies the step right
        # after a full one.
        judged = n_spec > cfg.min_spec_steps and not (cfg.spec_after_full and state.last_full)
        state.mode = SPEC_MODE
        state.last_full = False
        state.verify_now = cfg.schedule is not None or judged or cfg.verify_in_grace
        state.verify_errors = state.verify_map = state.gates = None
        state.pending = {}
        out = self.fn_ref.original_forward(*args, **kwargs)
        if state.verify_errors is not None:
            errors = state.verify_errors.tolist()  # one sync: the decision needs the value
            rec.errors, rec.error = errors, max(errors)
        if state.verify_map is not None:
            rec.set_map("error", state.verify_map.reshape(state.layout.grid))
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


    def reset_state(self, module):
        # The run is over: note how much the forecast caches held, before the state goes.
        trace = self.handle.running_trace
        if trace is not None:
            trace.meta["cache_bytes"] = sum(
                f.nbytes() for st in self.run_states.values() for f in st.forecasters.values()
            )
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
    driver = SpeCaModelHook(pipe, adapter, config, SpeCaState, handle)
    for block in blocks:
        hook = SpeCaBlockHook(block, driver, is_verify=block.index == verify_index)
        register(block.module, hook, HOOK_NAME)
        for site in adapter.feature_sites(block):
            register(site.module, _CaptureHook(site, hook.sink), HOOK_NAME)
    register(adapter.transformer, driver, HOOK_NAME)
    return handle

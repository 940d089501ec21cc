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

import torch
from diffusers.hooks import ModelHook

from .adapters import Adapter, BlockSpec, FeatureSite
from .config import SpeCaConfig
from .kernels import accumulate
from .metrics import verification_errors
from .runtime import Handle, RunState, StepDriverHook, StepInfo, register
from .taylor import TaylorForecaster
from .trace import ACCEPTED, FULL, REJECTED, StepRecord

HOOK_NAME = "speclab_speca"
FULL_MODE, SPEC_MODE = "full", "spec"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SpeCaState(RunState):
    def reset(self, *args, **kwargs) -> None:
        super().reset()
        self.mode = FULL_MODE
        self.x = 0.0  # Taylor position of the current step
        self.forecasters: dict[int, TaylorForecaster] = {}
        self.consecutive_spec = 0
        self.force_full_next = False
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
        state: SpeCaState = self.driver.states.get_state()
        forecaster = self._forecaster(state)
        if state.mode == FULL_MODE:
            out, feats = self._real(args, kwargs, state)
            forecaster.update(state.x, feats)
            return out
        driver, adapter = self.driver, self.driver.adapter
        pred = forecaster.predict(state.x)
        if state.gates is None:
            state.gates = driver.all_gates(adapter.block_temb(args, kwargs), state)
        if not self.is_verify:
            # A forecast block only queues gate * forecast; the queue is added to the streams in one pass
            # before the next real block (or after the last block): the blocks' sum is all that is needed.
            state.coefs = pred.coefs
            for c in adapter.contributions(self.block, state.layout):
                gi = driver.gate_index[(self.block.index, c.feature)]
                state.pending.setdefault(c.stream, []).append((pred.terms[c.feature], gi, c.row_start))
            streams = adapter.block_streams(args, kwargs)
            if self.block.index == driver.n_blocks - 1:
                streams = driver.flush(streams, state)
            return adapter.block_output(self.block, streams)
        # Verification: this block for real, from the hidden state the forecast blocks produced.
        args, kwargs = adapter.with_block_streams(args, kwargs, driver.flush(adapter.block_streams(args, kwargs), state))
        out, real = self._real(args, kwargs, state)
        key = adapter.verify_feature(self.block)
        cfg = driver.config
        forecast = pred[key]
        img = adapter.image_tokens(self.block, key, state.layout) if cfg.record_maps else None
        state.verify_errors, state.verify_map = verification_errors(forecast, real[key], cfg.metric, cfg.eps, img)
        return out  # the real output: it is computed anyway and strictly better than its forecast


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
        return out

    def run_step(self, module, args, kwargs, info: StepInfo, state: SpeCaState, rec: StepRecord):
        cfg: SpeCaConfig = self.config
        state.x = float(info.step) if cfg.distance == "step" or info.sigma is None else info.sigma
        rec.threshold = cfg.threshold_at(info.step, info.num_steps)
        full, reason = self._plan(info, state)
        if full:
            rec.decision, rec.reason = FULL, reason
            return self._full(args, kwargs, state)

        state.mode = SPEC_MODE
        state.verify_errors = state.verify_map = state.gates = None
        state.pending = {}
        out = self.fn_ref.original_forward(*args, **kwargs)
        n_spec = state.consecutive_spec + 1
        if state.verify_errors is not None:
            errors = state.verify_errors.tolist()  # one sync: the decision needs the value
            rec.errors, rec.error = errors, max(errors)
        if state.verify_map is not None:
            rec.set_map("error", state.verify_map.reshape(state.layout.grid))
        if cfg.schedule is not None:
            verdict, reason = True, "schedule"
        elif n_spec <= cfg.min_spec_steps:
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
        trace = self.handle._current
        if trace is not None:
            trace.meta["cache_bytes"] = sum(
                f.nbytes() for st in self.states._state_cache.values() for f in st.forecasters.values()
            )
        return super().reset_state(module)


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

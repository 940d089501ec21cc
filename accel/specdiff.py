"""SpecDiff: self-speculative, multi-level token caching (arXiv 2509.13848; see docs/specdiff.md).

Per cache context ("cond"/"uncond" under true CFG, each with its own state):

1. Warm-up: the first `warmup_steps` steps run fully. Each layer's K/V (all tokens) is kept when the next
   step is partial, and the attention every image token receives is scored (chunked, on the side).
2. Speculative pre-run, right after the first step: the same model, `spec_steps` Euler steps
   `x += (sigma_next - sigma) * v` over sigmas picked across the main schedule, from the same initial latents
   and conditioning; at each of its timesteps the attention received per image token is recorded ("future").
   Its first call is the main run's first step (same input, same timestep), so by default that step is
   reused (`share_first_step`). Calls are recorded in `Trace.overhead` with their block cost.
3. Partial steps: importance = history (attention received at the previous step) x future (at the nearest
   speculative sigma) x exp(starvation_scale x consecutive steps cached). C1 = top tokens (computed), C2 =
   bottom `c2_share` of importance mass (last output reused), C3 = the rest (weighted history of outputs).
   Only text + C1 image tokens enter the model (latents and img_ids restricted; RoPE follows the ids); every
   attention layer overwrites its K/V cache rows of those tokens and attends over the whole cache. With
   `text_tokens="cache"` (FLUX) only the C1 image tokens enter: the text rows of the caches stay those of the
   last full step.

"Value" = the model's output (velocity) per image token; a per-token history of the last `history_window`
computed values is kept on the device ([window, batch, tokens, channels], newest first).

Hooks: `SpecDiffModelHook` (a `StepDriverHook`) on the transformer; the attention processors of every
attention module are replaced (`adapter.kv_cache_processor`) and restored by `Handle.remove`.
One host sync per step, for the trace (level counts and maps); the compute path has none.

Context parallelism (diffusers' `enable_parallelism`, Ulysses only): the processors gather the whole sequence
for their share of the heads (accel/distributed.py), the scores are all-reduced once per call, so importance,
C1 and the levels are the same on every rank and the single-process ones; C1's size is rounded up to a multiple
of the ranks (the transformer splits the subset call's tokens equally). CUDA graphs are off there.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.utils._pytree import tree_flatten

from .adapters import Adapter
from .adapters.kv_attention import AttnControl, AttnMode
from .api import register_method
from .config import ConfigBase, check, knob
from .distributed import all_reduce_sum
from .runtime import CallGraph, Handle, RunState, StepDriverHook, StepInfo, call_signature, register
from .trace import FULL, PARTIAL, StepRecord

HOOK_NAME = "speclab_specdiff"
MODULATION_HOOK = "speclab_specdiff_modulation"
_TINY = 1e-12


@dataclass
class SpecDiffConfig(ConfigBase):
    """SpecDiff, self-speculative multi-level token caching (arXiv 2509.13848).

    A short speculative pre-run of the same model (`spec_steps` Euler steps over the same noise range, from
    the same initial latents) records how much attention every image token receives at those timesteps
    ("future"). Each later step ranks the image tokens by
    `importance = history * future * exp(starvation_scale * times_cached)` and splits them in three levels:
    C1 (the top `1 - cache_rate` share, computed through the model), C2 (the lowest-importance tokens holding
    the bottom `c2_share` of the total importance: their last output is reused) and C3 (the rest: a weighted
    average of their last `history_window` computed outputs). See docs/specdiff.md.
    """

    SPEED_KNOB: ClassVar[str] = "cache_rate"
    """The field that trades quality for speed: a larger value skips more work (`accel.calibrate`)."""

    cache_rate: float = knob(
        0.85, """Share of the image tokens NOT computed on a partial step. C1 holds
        max(1, round((1 - cache_rate) * image tokens)) tokens. 0 computes every step fully (bit-identical to the
        plain pipeline, no pre-run). The paper's FLUX settings: 0.85 and 0.95.""",
        label="cache rate", minimum=0, maximum=1, exclusive_maximum=True, ui_range=(0, 0.99), step=0.01)
    spec_steps: int = knob(
        2, """Model calls of the speculative pre-run (paper: 2). Its sigmas are picked evenly (by index) across the
        main schedule's remaining sigmas; every call costs a full step and counts in every speedup.""",
        label="speculative steps", minimum=1, maximum=16, ui_range=(1, 8), advanced=True)
    share_first_step: bool = knob(
        True, """The pre-run's first call is the main run's first (full) step, bit for bit. True reuses that step
        (its output and attention) instead of computing it twice, so the pre-run costs spec_steps - 1 calls;
        False computes it again (the literal pre-run cost).""",
        label="share first step", advanced=True)
    c2_share: float = knob(
        0.1, """C2 = the lowest-importance tokens whose summed importance stays within this share of the total
        (paper: 10%). They reuse their last computed output as is. C1 takes precedence where the two overlap.""",
        label="C2 share (reused)", minimum=0, maximum=1, exclusive_maximum=True, ui_range=(0, 0.9), step=0.01,
        advanced=True)
    history_window: int = knob(
        3, """How many of a token's last computed outputs are kept for C3 (paper: 3). With c3_mode "history" C3
        averages them, with weights e^-i for the i-th most recent, over the outputs that exist, normalised to
        sum 1.""",
        label="history window", minimum=1, maximum=8, advanced=True)
    c3_mode: str = knob(
        "history", """How a C3 token's output is estimated from its last computed outputs. "history": the paper's
        weighted average (weights e^-i). "taylor": a Taylor forecast in the step index, as TaylorSeer's but per
        token, through the token's newest c3_order + 1 computed outputs at the steps they were computed
        (Newton's interpolating polynomial evaluated at this step; order 1 = linear extrapolation).""",
        label="C3 estimate", choices=("history", "taylor"), advanced=True)
    c3_order: int = knob(
        1, """Order of the C3 Taylor forecast (c3_mode "taylor"): 1 extrapolates linearly from the last two computed
        outputs; needs history_window > c3_order. Tokens with fewer outputs use a lower order.""",
        label="C3 Taylor order", minimum=0, maximum=4, advanced=True)
    starvation_scale: float = knob(
        0.1, """Importance grows by exp(starvation_scale * k) for a token not computed for k consecutive steps (as
        in RAS), so no token stays cached forever. 0 turns it off.""",
        label="starvation scale", minimum=0, maximum=50, ui_range=(0, 2), step=0.01)
    warmup_steps: int = knob(
        4, "The first warm-up steps are computed fully (RAS: 4); partial steps need a computed history.",
        label="warm-up steps", minimum=1, maximum=10_000, ui_range=(1, 10), advanced=True)
    refresh_every: int = knob(
        0, """After this many consecutive partial steps the next step is computed fully (every token refreshed).
        0 never refreshes (the paper's speedups count no refresh).""",
        label="refresh every", minimum=0, maximum=10_000, ui_range=(0, 10), advanced=True)
    score_chunk: int = knob(
        1024, """Queries per chunk when computing the attention each token receives: the softmax is materialised
        for this many queries x all keys x heads at a time, never the full N x N map.""",
        label="score chunk", minimum=1, maximum=1 << 20, advanced=True)
    score_every: int = knob(
        4, """Attention received is summed over every score_every-th attention layer (layers in execution order).
        1 uses all layers as the paper; larger values make the side computation proportionally cheaper (measured
        choice of the default: docs/specdiff.md). On partial steps only the computed queries are scored.""",
        label="score every n-th layer", minimum=1, maximum=10_000, ui_range=(1, 16), advanced=True)
    score_query_stride: int = knob(
        2, """Score every k-th query only (attention received = column means over those queries). 1 scores every
        query the step computes (the paper's definition); larger values make scoring proportionally cheaper
        (measured choice: docs/specdiff.md).""",
        label="score every n-th query", minimum=1, maximum=1 << 16, ui_range=(1, 16), advanced=True)
    text_tokens: str = knob(
        "auto", """What a partial step does with the text tokens. "compute": every text token goes through the
        model with the C1 image tokens (the paper; a cost the cache rate does not shrink). "cache": only the C1
        image tokens go through the model; every attention layer takes the text keys and values from its K/V
        cache, i.e. from the last full step (the text tokens' own stream, which reaches the image only through
        those keys and values, is not advanced); FLUX only, refused elsewhere and under context parallelism.
        "auto" (the default): "cache" where it is supported, else "compute" (docs/specdiff.md, "Text tokens on
        partial steps": as close to the full run on the trained tiny FLUX, and 2.58x -> 3.41x ideal at 0.85 on
        FLUX.1-dev's shape). The trace's meta["text_tokens"] says which ran.""",
        label="text tokens on partial steps", choices=("auto", "compute", "cache"), advanced=True)
    cuda_graphs: bool = knob(
        True, """On CUDA, replay each partial step's transformer call as a CUDA graph (captured the second time a
        call of that shape is seen; its inputs are copied into the graph's buffers), which removes the per-layer
        Python and launch cost of a step that computes few tokens. The K/V caches then live in buffers kept
        between runs (freed by remove()). Only for model families whose subset call is a plain call (FLUX);
        others run eagerly.""",
        label="CUDA graphs for partial steps", advanced=True)
    hoist_modulation: bool = knob(
        True, """On partial steps, take every block's adaLN modulation (a linear of the step embedding: the same
        for all tokens, so its cost does not shrink with the tokens computed) from a table computed once per run
        for all remaining steps, one matrix product per linear, instead of once per step. Same values up to the
        rounding of a batched product. Eager only (off under torch.compile) and for families that can tell
        the step embeddings ahead (FLUX).""",
        label="hoist modulation", advanced=True)
    record_maps: bool = knob(
        True, "Store per-step importance and level maps (image-token grid) in the trace.",
        label="record token maps", advanced=True)
    sync_timing: bool = knob(
        True, """Synchronise CUDA around each step so traced times are host wall times (costs a little overlap).
        When off, no step waits for the device: step times come from CUDA events, and partial steps' level counts
        and maps reach the trace once the device has run the step (a step or two later).""",
        label="synchronised timing", advanced=True)

    def check_relations(self) -> None:
        if self.c3_mode == "taylor":
            check(self.history_window > self.c3_order, "history_window",
                  f"an integer > c3_order={self.c3_order} when c3_mode='taylor'", self.history_window)

    def computes_text(self, supports_cache: bool) -> bool:
        """Partial steps compute the text tokens: "compute", or "auto" where caching them is not supported."""
        return self.text_tokens == "compute" or (self.text_tokens == "auto" and not supports_cache)

    def n_computed(self, n_image: int) -> int:
        """C1 size for `n_image` image tokens."""
        return min(n_image, max(1, int(round((1.0 - float(self.cache_rate)) * n_image))))


def history_weights(window: int, available: torch.Tensor) -> torch.Tensor:
    """C3 weights, [window, tokens] float32: e^-i for the i-th most recent computed output (i = 1..window),
    zero where a token has fewer than i outputs (`available` [tokens]), normalised to sum 1 per token."""
    i = torch.arange(1, window + 1, device=available.device, dtype=torch.float32)
    w = torch.exp(-i)[:, None] * (i[:, None] <= available[None, :].float())
    return w / w.sum(0, keepdim=True).clamp_min(_TINY)


def taylor_weights(order: int, positions: torch.Tensor, available: torch.Tensor, x: float) -> torch.Tensor:
    """C3 weights of the "taylor" mode, [W, tokens] float32: the Lagrange weights that evaluate, at step `x`,
    the polynomial through each token's newest m + 1 computed outputs (m = min(order, available - 1, W - 1)),
    at their steps `positions` [W, tokens] (newest first). The same forecast as the Newton form of
    `accel.taylor.TaylorForecaster`, per token (tokens are computed at different steps); m = 0 repeats the
    newest output, m = 1 extrapolates the line through the last two."""
    window, n = positions.shape
    pos = positions.float()
    m = (available.clamp(min=1) - 1).clamp(max=min(order, window - 1))
    w = torch.zeros(window, n, dtype=torch.float32, device=positions.device)
    for k in range(int(min(order, window - 1)) + 1):
        sel = (m == k).float()
        for i in range(k + 1):
            li = torch.ones(n, dtype=torch.float32, device=positions.device)
            for j in range(k + 1):
                if j != i:
                    li = li * (x - pos[j]) / (pos[i] - pos[j]).where(sel > 0, torch.ones_like(pos[i]))
            w[i] += sel * li
    return w


def normalise_scores(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] attention received -> [N]: each sample scaled to mean 1, then averaged over the batch
    (C1 is shared by the batch: the model runs one token subset)."""
    s = scores.float()
    return (s / s.mean(dim=-1, keepdim=True).clamp_min(_TINY)).mean(dim=0)


def assign_levels(score: torch.Tensor, n_c1: int, c2_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(C1 indices sorted ascending [n_c1], level per token [N] in {1, 2, 3}) from importance `score` [N] >= 0.

    C1: the `n_c1` highest scores. C2: the lowest scores whose cumulative sum (ascending) stays within
    `c2_share` of the total score. C3: the rest. C1 wins over C2 where they overlap."""
    c1 = torch.topk(score, n_c1, sorted=False).indices.sort().values
    vals, order = score.sort()
    csum = vals.cumsum(0)
    low = csum <= c2_share * csum[-1]
    level = torch.empty_like(order)
    level.scatter_(0, order, torch.where(low, 2, 3))
    level.index_fill_(0, c1, 1)
    return c1, level


class _Modulation:
    """The modulation linears' outputs of the step in flight, one buffer [B, sum of their widths]: the
    step's row of the run's table is copied in before the call (CUDA graphs read this buffer)."""

    def __init__(self, cur: torch.Tensor, offsets: list[int], sizes: list[int]):
        self.cur, self.offsets, self.sizes = cur, offsets, sizes

    def row(self, i: int) -> torch.Tensor:
        return self.cur[:, self.offsets[i]:self.offsets[i] + self.sizes[i]]


class _ModulationHook(ModelHook):
    """On a modulation linear: its output from `control.modulation` when set (partial steps), else the
    linear itself."""

    def __init__(self, control: AttnControl, index: int):
        super().__init__()
        self.control = control
        self.index = index

    def new_forward(self, module, *args, **kwargs):
        mod = self.control.modulation
        if mod is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return mod.row(self.index)


class SpecDiffState(RunState):
    def reset(self, *args, **kwargs) -> None:
        super().reset()
        self.first_step: int | None = None
        self.graphs = False  # partial steps replay CUDA graphs (persistent K/V buffers)
        self.any_partial = False
        self.kv: dict = {}
        self.kv_ready = False  # the K/V caches hold this run's last full step (a partial step may follow)
        self.hist: torch.Tensor | None = None  # [W, B, N, C] outputs per image token, newest first
        self.hist_count: torch.Tensor | None = None  # [N] how many history entries exist
        self.hist_pos: torch.Tensor | None = None  # [W, N] the step index of each history entry
        self.cached_for: torch.Tensor | None = None  # [N] consecutive steps not computed
        self.his: torch.Tensor | None = None  # [N] attention received at the last step (normalised)
        self.fut: torch.Tensor | None = None  # [S, N] attention received at the speculative sigmas
        self.fut_sigmas: list[float] = []
        self.prerun: dict | None = None  # inputs of the first step, while the pre-run is pending
        self.consecutive_partial = 0
        self.mod_table: torch.Tensor | None = None  # [steps, B, width] modulation outputs from mod_step0 on
        self.mod_step0 = 0


class SpecDiffModelHook(StepDriverHook):
    method = "specdiff"

    def __init__(self, pipe, adapter: Adapter, config: SpecDiffConfig, state_cls, handle: Handle):
        super().__init__(pipe, adapter, config, state_cls, handle)
        self.control = AttnControl(config.score_every, config.score_chunk, config.score_query_stride)
        self.attn_modules = adapter.attention_modules()
        self._graphable = type(adapter).run_subset is Adapter.run_subset  # the subset call is a plain call
        self._kv_store: dict[str, dict] = {}  # context -> layer -> (K, V): persistent buffers (CUDA graphs)
        self.mod_linears = adapter.modulation_linears() if config.hoist_modulation else []
        self._mod_cur: dict[str, _Modulation] = {}  # context -> the step's modulation buffer (kept across runs)
        self._mod_hooked = False

    @property
    def computes_text(self) -> bool:
        """Partial steps compute the text tokens: `text_tokens` resolved for this family and this run's context
        parallelism ("auto" caches them where the family supports it, but not under context parallelism)."""
        return self.config.computes_text(self.adapter.supports_text_cache and self.cp is None)

    # ---- schedule ------------------------------------------------------------------------
    def _scheduled_partial(self, step: int, num_steps: int, state: SpecDiffState) -> bool:
        """Partial by the schedule alone (warm-up, refresh, cache rate); readiness is checked separately."""
        cfg: SpecDiffConfig = self.config
        n = state.layout.n_image
        if step >= num_steps or cfg.n_computed(n) >= n:
            return False
        p = step - state.first_step - cfg.warmup_steps
        if p < 0:
            return False
        return not (cfg.refresh_every and (p + 1) % (cfg.refresh_every + 1) == 0)

    def _plan(self, info: StepInfo, state: SpecDiffState) -> tuple[bool, str]:
        cfg: SpecDiffConfig = self.config
        if cfg.n_computed(state.layout.n_image) >= state.layout.n_image:
            return False, "no_cache"
        if info.step - state.first_step < cfg.warmup_steps:
            return False, "warmup"
        if not self._scheduled_partial(info.step, info.num_steps, state):
            return False, "refresh"
        if state.his is None or state.fut is None or state.hist is None or not state.kv_ready:
            return False, "no_history"
        return True, "partial"

    def on_new_run(self) -> None:
        cp = self.cp
        if cp is not None and self.config.text_tokens == "cache":
            raise NotImplementedError(
                "SpecDiff's text_tokens='cache' is not supported under context parallelism (the plan splits the "
                "text tokens across ranks); use text_tokens='compute'")
        if cp is not None and cp.ulysses_group is None:
            raise NotImplementedError(
                "SpecDiff under context parallelism needs Ulysses attention "
                "(ContextParallelConfig(ulysses_degree=N)); ring attention is not supported: its K/V cache and "
                "attention scores would need the ring's key exchange. Use ulysses_degree, or SpeCa.")
        self.control.cp = cp

    def _scores(self) -> torch.Tensor | None:
        """This call's attention received per image token, normalised (`normalise_scores`), or None. Under
        context parallelism each rank scored its share of the heads: the sum over ranks / ranks is the mean
        over all heads, the same on every rank."""
        s = self.control.scores
        if s is None:
            return None
        if self.cp is not None:
            s = all_reduce_sum(s, self.cp) / self.cp.world
        return normalise_scores(s)

    def _n_c1(self, n_img: int) -> int:
        """C1 size; under context parallelism rounded up to a multiple of the ranks."""
        n = self.config.n_computed(n_img)
        if self.cp is not None:
            n = min(n_img, -(-n // self.cp.world) * self.cp.world)
        return n

    # ---- main step -------------------------------------------------------------------------
    def run_step(self, module, args, kwargs, info: StepInfo, state: SpecDiffState, rec: StepRecord):
        cfg: SpecDiffConfig = self.config
        layout = state.layout
        self.control.cp_text = state.block_layout.n_text
        n_img = layout.n_image
        if state.first_step is None:
            state.first_step = info.step
            trace = self.handle.running_trace
            if trace is not None:
                trace.meta["text_tokens"] = "compute" if self.computes_text else "cache"
            state.any_partial = cfg.n_computed(n_img) < n_img and info.step + cfg.warmup_steps < info.num_steps
            state.graphs = self._graphs_on(module)
            if state.graphs:  # graphs read fixed K/V buffers: keep them across runs, per cache context
                state.kv = self._kv_store.setdefault(info.context, {})
        partial, reason = self._plan(info, state)
        next_partial = self._scheduled_partial(info.step + 1, info.num_steps, state)
        prerun_here = state.any_partial and state.first_step == info.step
        rec.reason = reason
        rec.tokens_total = n_img
        ctl = self.control
        try:
            if partial:
                out = self._partial_step(args, kwargs, info, state, rec, next_partial)
            else:
                score = next_partial or (prerun_here and cfg.share_first_step)
                ctl.begin(AttnMode.DENSE, state.kv, store_kv=next_partial, score=score,
                          key_start=self.adapter.image_key_start(layout))
                ctl.persistent_kv = state.graphs
                state.kv_ready = next_partial
                if not next_partial and not state.graphs:
                    state.kv.clear()
                out = self.fn_ref.original_forward(*args, **kwargs)
                sample = self.adapter.output_sample(out)
                self._after_full(state, self.adapter.sample_tokens(sample), rec, info.step)
                if prerun_here:  # the step's scores are in state.his (`_after_full`)
                    state.prerun = {"args": args, "kwargs": kwargs, "sample": sample,
                                    "scores": None if ctl.scores is None else state.his}
        finally:
            ctl.end()
        return out

    def _after_full(self, state: SpecDiffState, sample: torch.Tensor, rec: StepRecord, step: int) -> None:
        cfg: SpecDiffConfig = self.config
        ctl = self.control
        n_img = state.layout.n_image
        rec.decision = FULL
        rec.tokens_computed = n_img
        state.blocks_computed = float(self.n_blocks)
        state.consecutive_partial = 0
        state.his = self._scores()
        if state.any_partial:
            w = cfg.history_window
            if state.hist is None:
                state.hist = sample.new_zeros((w, *sample.shape))
                state.hist_count = torch.zeros(n_img, dtype=torch.long, device=sample.device)
                state.cached_for = torch.zeros(n_img, dtype=torch.float32, device=sample.device)
                state.hist_pos = torch.zeros(w, n_img, dtype=torch.float32, device=sample.device)
            state.hist = torch.roll(state.hist, 1, dims=0)
            state.hist[0] = sample
            state.hist_pos = torch.roll(state.hist_pos, 1, dims=0)
            state.hist_pos[0] = float(step)
            state.hist_count.add_(1).clamp_(max=w)
            state.cached_for.zero_()
        rec.extra = {"c1": n_img, "c2": 0, "c3": 0, "score_pairs": ctl.score_pairs, "score_layers": ctl.score_layers,
                     "attn_pairs": ctl.attn_pairs}
        if cfg.record_maps:
            h = state.layout.grid
            rec.set_map("level", torch.ones(h, dtype=torch.int8))

    def _partial_step(self, args, kwargs, info: StepInfo, state: SpecDiffState, rec: StepRecord, next_partial: bool):
        cfg: SpecDiffConfig = self.config
        adapter, ctl, layout = self.adapter, self.control, state.layout
        n_img, n_text = layout.n_image, layout.n_text
        n_c1 = self._n_c1(n_img)
        text = self.computes_text
        n_text_computed = n_text if text else 0

        # importance = his * fut * exp(s * cached), in log space (no overflow), scaled to max 1
        j = min(range(len(state.fut_sigmas)), key=lambda k: abs(state.fut_sigmas[k] - (info.sigma or 0.0)))
        logs = (torch.log(state.his + _TINY) + torch.log(state.fut[j] + _TINY)
                + float(cfg.starvation_scale) * state.cached_for)
        score = torch.exp(logs - logs.max())
        c1, level = assign_levels(score, n_c1, float(cfg.c2_share))

        # the model on text + C1 only (C1 only with text_tokens="cache"); attention over every token through the
        # K/V caches
        rows = adapter.joint_rows(layout, c1, text=text)
        ctl.begin(AttnMode.SUBSET, state.kv, store_kv=False, score=next_partial, rows=rows,
                  key_start=adapter.image_key_start(layout))
        ctl.modulation = self._modulation(args, kwargs, info, state)
        if state.graphs:
            out, new = self._graph_subset(args, kwargs, c1, rows, info.context)
        else:
            out, new = adapter.run_subset(self.fn_ref.original_forward, args, kwargs, c1, text=text)  # [B, n_c1, C]
        state.his = self._scores()

        # assemble: C2 = last value, C3 = weighted history or Taylor forecast, C1 = new
        hist = state.hist
        if cfg.c3_mode == "taylor":
            w = taylor_weights(cfg.c3_order, state.hist_pos, state.hist_count, float(info.step))  # [W, N]
        else:
            w = history_weights(cfg.history_window, state.hist_count)  # [W, N]
        weighted = torch.einsum("wn,wbnc->bnc", w, hist.float()).to(hist.dtype)
        full = torch.where((level == 2)[None, :, None], hist[0], weighted)
        full.index_copy_(1, c1, new.to(full.dtype))

        # history of C1 tokens shifts by one; the others keep theirs
        sub = hist.index_select(2, c1)
        hist.index_copy_(2, c1, torch.cat([new.to(hist.dtype).unsqueeze(0), sub[:-1]], dim=0))
        pos = state.hist_pos.index_select(1, c1)
        state.hist_pos.index_copy_(1, c1, torch.cat([pos.new_full((1, n_c1), float(info.step)), pos[:-1]], dim=0))
        state.hist_count.index_add_(0, c1, torch.ones_like(c1)).clamp_(max=cfg.history_window)
        state.cached_for.add_(1.0).index_fill_(0, c1, 0.0)
        state.consecutive_partial += 1

        rec.decision = PARTIAL
        rec.tokens_computed = n_c1
        state.blocks_computed = self.n_blocks * (n_text_computed + n_c1) / (n_text + n_img)
        counts = torch.stack([(level == k).sum() for k in (1, 2, 3)]).float()
        packed = torch.cat([counts, score.float(), level.float()]) if cfg.record_maps else counts
        rec.extra = {"c1": n_c1, "c2": None, "c3": None, "score_pairs": ctl.score_pairs,
                     "score_layers": ctl.score_layers, "attn_pairs": ctl.attn_pairs, "spec_sigma": state.fut_sigmas[j]}
        self._defer(rec, packed, layout.grid)
        return adapter.with_output_sample(out, adapter.tokens_sample(full.to(new.dtype), layout))

    # ---- modulation hoisting ----------------------------------------------------------------------
    def _blocks_compiled(self) -> bool:
        return any(getattr(b.module, "_compiled_call_impl", None) is not None for b in self.adapter.blocks())

    def _install_modulation_hooks(self) -> None:
        """Hooks on the modulation linears, for one run (eager only: a hook replaces a module's `forward`
        attribute, which compiled blocks would guard on per module)."""
        if not self._mod_hooked:
            for i, lin in enumerate(self.mod_linears):
                register(lin, _ModulationHook(self.control, i), MODULATION_HOOK)
            self._mod_hooked = True

    def remove_modulation_hooks(self) -> None:
        """Take the modulation hooks off and leave the linears as they were (no `forward` instance attribute,
        no hook registry)."""
        if not self._mod_hooked:
            return
        for lin in self.mod_linears:
            registry = getattr(lin, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(MODULATION_HOOK, recurse=False)
                if not registry.hooks:
                    lin.__dict__.pop("forward", None)
                    del lin._diffusers_hook
        self._mod_hooked = False

    @torch.no_grad()
    def _modulation(self, args, kwargs, info: StepInfo, state: SpecDiffState) -> _Modulation | None:
        """This step's modulation buffer (its row of the run's table copied in), or None (not hoisted)."""
        if not self.mod_linears or self._blocks_compiled():
            return None
        if state.mod_table is None or not 0 <= info.step - state.mod_step0 < state.mod_table.shape[0]:
            sched_t = self.pipe.scheduler.timesteps[info.step:info.num_steps]
            temb = self.adapter.step_embeddings(args, kwargs, sched_t)
            if temb is None:  # the family cannot tell its step embeddings ahead: no hoisting
                self.remove_modulation_hooks()
                self.mod_linears = []
                return None
            x = F.silu(temb)
            state.mod_table = torch.cat([F.linear(x.to(m.weight.dtype), m.weight, m.bias) for m in self.mod_linears],
                                        dim=-1)
            state.mod_step0 = info.step
        row = state.mod_table[info.step - state.mod_step0]
        mod = self._mod_cur.get(info.context)
        if mod is None or mod.cur.shape != row.shape or mod.cur.dtype != row.dtype or mod.cur.device != row.device:
            sizes = [m.out_features for m in self.mod_linears]
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            mod = self._mod_cur[info.context] = _Modulation(torch.empty_like(row), offsets, sizes)
            self.control.kv_generation += 1  # graphs recorded against an older buffer are stale
        mod.cur.copy_(row)
        self._install_modulation_hooks()
        return mod

    # ---- CUDA graphs of partial steps -------------------------------------------------------------
    def _graphs_on(self, module) -> bool:
        # not under context parallelism: its all-to-alls would be captured too (not tried)
        return (bool(self.config.cuda_graphs) and self._graphable and self.cp is None
                and self._device(module).type == "cuda")

    def _graph_subset(self, args, kwargs, c1: torch.Tensor, rows: torch.Tensor, context: str):
        """`adapter.run_subset` as a CUDA graph replay. The graph is keyed by everything the recorded kernels
        depend on: the cache context (its K/V buffers), the K/V buffers' generation, whether layers score, and
        the call's structure (non-tensor arguments, tensor shapes and dtypes). A key's first call runs
        eagerly (warming up kernels, handles and compilation), its second is captured, later ones replay with
        the tensor arguments and the rows copied into the graph's buffers; all are dropped when the transformer's
        weights moved since the last run (`weights_moved`: model CPU offload). (out, new) as run_subset."""
        adapter, ctl = self.adapter, self.control
        self.drop_graphs_if_weights_moved()  # e.g. model CPU offload put the transformer back elsewhere
        forward = self.fn_ref.original_forward
        sub_args, sub_kwargs = adapter.with_call_inputs(args, kwargs, image_index=c1, text=self.computes_text)
        leaves, spec = tree_flatten((sub_args, sub_kwargs))
        key = (context, ctl.kv_generation, ctl.score, call_signature(leaves, spec))
        g = self._graphs.get(key)
        if g is None:
            if key not in self._seen:
                self._seen.add(key)
                out = forward(*sub_args, **sub_kwargs)
                return out, adapter.output_sample(out)
            for old in [k for k in self._graphs if k[1] != ctl.kv_generation]:
                del self._graphs[old]  # recorded against K/V buffers that may no longer exist
            try:
                g = CallGraph(leaves, spec, statics=(rows,))
                ctl.rows = g.statics[0]  # the joint rows the attention reads: the graph's own buffer
                g.capture(forward)
                g.scores, g.counters = ctl.scores, (ctl.score_pairs, ctl.score_layers, ctl.attn_pairs)
            except RuntimeError as e:  # e.g. a kernel that cannot be captured: run eagerly from now on
                self._graphable = False
                warnings.warn(f"SpecDiff: CUDA graph capture failed, partial steps run eagerly ({e})", stacklevel=2)
                ctl.rows, ctl.scores, ctl.score_pairs, ctl.score_layers, ctl.attn_pairs = rows, None, 0, 0, 0
                out = forward(*sub_args, **sub_kwargs)
                return out, adapter.output_sample(out)
            self._graphs[key] = g
        else:
            g.replay(leaves, (rows,))
            ctl.scores = g.scores
            ctl.score_pairs, ctl.score_layers, ctl.attn_pairs = g.counters
        return g.out, adapter.output_sample(g.out)

    # ---- trace fields read back from the device ------------------------------------------------------
    def _defer(self, rec: StepRecord, packed: torch.Tensor, grid) -> None:
        """A partial step's level counts (and maps) for the trace, packed in one tensor. Read now when the
        step waits for the device anyway (`sync_timing`, or on the CPU): the runtime synchronises right after
        this step. Else copied to pinned memory without waiting and filled in once the device has run the step
        (`accel.runtime.DeviceReads`, polled at each step), so that no step waits for the device."""
        if self.config.sync_timing or not self.reads.deferrable((packed,)):
            self._fill(rec, packed.cpu(), grid)
            return
        self.reads.add(lambda host: self._fill(rec, host[0], grid), (packed,), trace=self.handle.running_trace)

    @staticmethod
    def _fill(rec: StepRecord, packed: torch.Tensor, grid) -> None:
        c = [int(x) for x in packed[:3].tolist()]
        rec.extra["c1"], rec.extra["c2"], rec.extra["c3"] = c
        if packed.numel() > 3:
            n_img = (packed.numel() - 3) // 2
            rec.set_map("importance", packed[3:3 + n_img].reshape(grid))
            rec.set_map("level", packed[3 + n_img:].to(torch.int8).reshape(grid))

    # ---- speculative pre-run -------------------------------------------------------------------
    def _call(self, module, args, kwargs):
        out = super()._call(module, args, kwargs)
        state: SpecDiffState = self.states.get_state()
        if state.prerun is not None:
            try:
                self._prerun(module, state)
            finally:
                state.prerun = None
                self.control.end()
        return out

    def _prerun(self, module, state: SpecDiffState) -> None:
        cfg: SpecDiffConfig = self.config
        adapter, ctl, layout = self.adapter, self.control, state.layout
        sched = self.pipe.scheduler
        pre = state.prerun
        args, kwargs = pre["args"], pre["kwargs"]
        sigmas = [float(s) for s in sched.sigmas.detach().float().cpu()[state.first_step:]]
        total = len(sigmas) - 1  # the last entry is the terminal sigma
        picks = [int(round(j * total / cfg.spec_steps)) for j in range(cfg.spec_steps + 1)]
        x = adapter.call_latents(args, kwargs)
        n_train = float(getattr(sched.config, "num_train_timesteps", 1000))
        trace = self.handle.running_trace
        context = self.states.context.name
        on_cuda = cfg.sync_timing and torch.cuda.is_available() and x.device.type == "cuda"
        fut, fut_sigmas = [], []
        for j in range(cfg.spec_steps):
            s, s_next = sigmas[picks[j]], sigmas[picks[j + 1]]
            if j == 0 and cfg.share_first_step and pre["scores"] is not None:
                v, scores = pre["sample"], pre["scores"]
            else:
                if on_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                ctl.begin(AttnMode.DENSE, None, store_kv=False, score=True, key_start=adapter.image_key_start(layout))
                if j == 0:  # the first step's own call (same latents, same timestep tensor)
                    a, k = args, kwargs
                else:
                    a, k = adapter.with_call_inputs(args, kwargs, latents=x,
                                                    timestep=adapter.model_timestep(s, sched, args, kwargs))
                v = adapter.output_sample(self.fn_ref.original_forward(*a, **k))
                scores = self._scores()
                rec = StepRecord(step=j, num_steps=cfg.spec_steps, context=context, timestep=s * n_train, sigma=s,
                                 decision=FULL, reason="prerun", blocks_computed=float(self.n_blocks),
                                 blocks_total=self.n_blocks, tokens_computed=layout.n_image,
                                 tokens_total=layout.n_image,
                                 extra={"score_pairs": ctl.score_pairs, "score_layers": ctl.score_layers,
                                        "attn_pairs": ctl.attn_pairs})
                ctl.end()
                if on_cuda:
                    torch.cuda.synchronize()
                rec.time_ms = (time.perf_counter() - start) * 1000.0
                if trace is not None:
                    trace.overhead.append(rec)
            fut.append(scores)
            fut_sigmas.append(s)
            if j + 1 < cfg.spec_steps:
                x = (x.float() + (s_next - s) * v.float()).to(x.dtype)
        state.fut = torch.stack(fut)
        state.fut_sigmas = fut_sigmas
        if trace is not None:
            trace.meta.setdefault("prerun", {})[context] = {
                "sigmas": fut_sigmas, "calls": sum(1 for r in trace.overhead if r.context == context),
                "shared_first_step": bool(cfg.share_first_step),
            }

    def reset_state(self, module):
        self.control.end()
        self.remove_modulation_hooks()
        return super().reset_state(module)


@register_method("specdiff", SpecDiffConfig)
def attach_specdiff(pipe, adapter: Adapter, config: SpecDiffConfig) -> Handle:
    if getattr(pipe.scheduler, "sigmas", None) is None:
        raise ValueError(
            f"SpecDiff needs a flow-matching scheduler with `sigmas` (e.g. FlowMatchEulerDiscreteScheduler) for its "
            f"speculative pre-run; {type(pipe.scheduler).__name__} has none"
        )
    if config.text_tokens == "cache" and not adapter.supports_text_cache:
        raise ValueError(
            f"SpecDiff text_tokens='cache' is not supported for the {adapter.family} family (its text tokens are "
            f"not reached through attention alone, or its transformer cannot take a call without them); use "
            f"text_tokens='compute'")
    handle = Handle(pipe, adapter, "specdiff", config, HOOK_NAME)
    driver = SpecDiffModelHook(pipe, adapter, config, SpecDiffState, handle)
    modules = driver.attn_modules
    originals = [adapter.get_attention_processor(m) for m in modules]
    for layer, m in enumerate(modules):
        adapter.set_attention_processor(m, adapter.kv_cache_processor(m, layer, driver.control))

    def restore() -> None:
        for m, p in zip(modules, originals):
            adapter.set_attention_processor(m, p)

    handle.cleanups.append(restore)
    handle.cleanups.append(driver.remove_modulation_hooks)
    register(adapter.transformer, driver, HOOK_NAME)
    return handle


__all__ = ["SpecDiffConfig", "SpecDiffModelHook", "SpecDiffState", "assign_levels", "attach_specdiff", "history_weights",
           "normalise_scores", "taylor_weights"]

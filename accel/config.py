"""Configuration dataclasses: every knob of a method, documented, with defaults and validation.

`validate()` runs in `__post_init__`, so a bad value fails where it is written, with a `ValueError`
that names the field and the allowed range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METRICS = ("rel_l1", "rel_l2", "cosine")
REJECT_POLICIES = ("recompute", "defer")
DISTANCES = ("step", "sigma")
TAYLOR_FORMS = ("newton", "reference")


def _check(cond: bool, name: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is out of range: {name} must be {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _ConfigBase:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


@dataclass
class SpeCaConfig(_ConfigBase):
    """SpeCa, "forecast then verify" (arXiv 2509.11628).

    On a speculative step every block's cached features are forecast by a Taylor series fitted on
    past full steps; the verify block is then computed for real from the forecast hidden state and
    its real output is compared with its forecast. Too large an error rejects the step.
    Defaults are the paper's FLUX settings.
    """

    threshold: float = 7.0
    """Base of the acceptance threshold. The threshold at step i of n is
    `threshold * decay ** (i / n)`. The default suits the elementwise `rel_l1` metric (FLUX: 7.0);
    for `rel_l2`/`cosine` use values around 0.05-0.3. Must be >= 0 (0 rejects every verified step)."""

    decay: float = 0.3
    """Threshold decay over the run, in (0, 1]: 1 keeps it constant, smaller tightens it toward the end."""

    order: int = 2
    """Taylor order of the forecast, 0-4. 0 reuses the last full step's features as they are.
    The order actually used grows with the number of full steps seen (k full steps allow order k-1)."""

    warmup_steps: int = 3
    """The first `warmup_steps` steps are always full (they also seed the forecast's history)."""

    min_spec_steps: int = 2
    """The first `min_spec_steps` speculative steps after a full step are accepted whatever the error
    (their error is still measured and traced); verification can reject only after them."""

    max_spec_steps: int = 8
    """After this many consecutive speculative steps the next step is forced full. Must be >= min_spec_steps."""

    metric: str = "rel_l1"
    """Verification error: "rel_l1" elementwise mean(|pred-real| / (|real|+eps)) as in the reference
    code; "rel_l2" ||pred-real|| / ||real||; "cosine" 1 - cos(pred, real). Taken per sample."""

    on_reject: str = "recompute"
    """"recompute" (the paper): a rejected step is computed again fully, so its output is exact.
    "defer" (the released code): keep the rejected forecast and make the next step full."""

    verify_block: int = -1
    """Which block verifies, as an index into the model's blocks in execution order
    (FLUX: 19 double then 38 single blocks); negative counts from the end. Default: the last block."""

    schedule: list[bool] | None = None
    """Forced schedule replay: one bool per step, True = full step, False = speculative (accepted).
    When set, the warm-up/min/max/threshold rules are not used; verification still runs on speculative
    steps (its error is traced, nothing is rejected). `Trace.schedule()` gives one from an earlier run."""

    distance: str = "step"
    """Coordinate of the Taylor series: "step" (step indices, as the reference) or "sigma"
    (the scheduler's noise level, for non-uniform schedules)."""

    taylor_form: str = "newton"
    """"newton": Newton divided differences over the last order+1 full steps, exact for feature
    trajectories that are polynomials of degree <= order. "reference": the recursive differences of the
    TaylorSeer/SpeCa code, D[i+1] = (D[i]_new - D[i]_prev) / N, exact only up to order 1."""

    eps: float = 1e-6
    """Added to |real| in the rel_l1 denominator (and to norms) to avoid division by zero."""

    cache_dtype: str | None = None
    """dtype of the cached Taylor terms ("float32", "bfloat16", "float16"); None keeps the features' dtype."""

    record_maps: bool = True
    """Store the per-token verification error map (image tokens, on the token grid) in the trace."""

    sync_timing: bool = True
    """Synchronise CUDA around each step so traced times are real (costs a little overlap)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.threshold, (int, float)) and self.threshold >= 0, "threshold", "a number >= 0", self.threshold)
        _check(isinstance(self.decay, (int, float)) and 0 < self.decay <= 1, "decay", "in (0, 1]", self.decay)
        _check(_is_int(self.order) and 0 <= self.order <= 4, "order", "an integer in 0..4", self.order)
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 1, "warmup_steps", "an integer >= 1 (the first step must be full)", self.warmup_steps)
        _check(_is_int(self.min_spec_steps) and self.min_spec_steps >= 0, "min_spec_steps", "an integer >= 0", self.min_spec_steps)
        _check(_is_int(self.max_spec_steps) and self.max_spec_steps >= max(1, self.min_spec_steps),
               "max_spec_steps", f"an integer >= max(1, min_spec_steps={self.min_spec_steps})", self.max_spec_steps)
        _check(self.metric in METRICS, "metric", f"one of {METRICS}", self.metric)
        _check(self.on_reject in REJECT_POLICIES, "on_reject", f"one of {REJECT_POLICIES}", self.on_reject)
        _check(_is_int(self.verify_block), "verify_block", "an integer block index", self.verify_block)
        _check(self.distance in DISTANCES, "distance", f"one of {DISTANCES}", self.distance)
        _check(self.taylor_form in TAYLOR_FORMS, "taylor_form", f"one of {TAYLOR_FORMS}", self.taylor_form)
        _check(isinstance(self.eps, (int, float)) and self.eps > 0, "eps", "a number > 0", self.eps)
        _check(self.cache_dtype in (None, "float32", "bfloat16", "float16"), "cache_dtype",
               'None, "float32", "bfloat16" or "float16"', self.cache_dtype)
        if self.schedule is not None:
            _check(isinstance(self.schedule, (list, tuple)) and len(self.schedule) > 0
                   and all(isinstance(b, bool) for b in self.schedule),
                   "schedule", "None or a non-empty list of bools (True = full step)", self.schedule)
            _check(self.schedule[0], "schedule", "a list whose first entry is True (step 0 must be full)", self.schedule)
            self.schedule = list(self.schedule)

    def threshold_at(self, step: int, num_steps: int) -> float:
        """tau(step) = threshold * decay ** (step / num_steps)."""
        return float(self.threshold) * float(self.decay) ** (step / max(1, num_steps))


@dataclass
class SpecDiffConfig(_ConfigBase):
    """SpecDiff, self-speculative multi-level token caching (arXiv 2509.13848).

    A short speculative pre-run of the same model (`spec_steps` Euler steps over the same noise range, from
    the same initial latents) records how much attention every image token receives at those timesteps
    ("future"). Each later step ranks the image tokens by
    `importance = history * future * exp(starvation_scale * times_cached)` and splits them in three levels:
    C1 (the top `1 - cache_rate` share, computed through the model), C2 (the lowest-importance tokens holding
    the bottom `c2_share` of the total importance: their last output is reused) and C3 (the rest: a weighted
    average of their last `history_window` computed outputs). See docs/specdiff.md.
    """

    cache_rate: float = 0.85
    """Share of the image tokens NOT computed on a partial step, in [0, 1). C1 holds
    `max(1, round((1 - cache_rate) * n_image_tokens))` tokens. 0 computes every step fully (bit-identical
    to the plain pipeline, no pre-run). The paper's FLUX settings: 0.85 (2.52x) and 0.95 (3.17x)."""

    spec_steps: int = 2
    """Model calls of the speculative pre-run, 1-16 (paper default 2). The pre-run's sigmas are picked evenly
    (by index) across the main schedule's remaining sigmas; every call costs a full step and is counted in the
    trace (`Trace.overhead`) and in every speedup."""

    share_first_step: bool = True
    """The pre-run's first call is at the main run's first sigma, from the same latents with the same
    conditioning: it is the main run's first (full) step, bit for bit. True reuses that step (its output and
    attention) instead of computing it twice, so the pre-run costs `spec_steps - 1` calls; False computes it
    again (the literal pre-run cost)."""

    c2_share: float = 0.1
    """C2 = the lowest-importance tokens whose summed importance stays within this share of the total
    importance of all image tokens, in [0, 1) (paper: 10%). They reuse their last computed output as is.
    C1 takes precedence over C2 when the two overlap (small cache rates)."""

    history_window: int = 3
    """How many of a token's last computed outputs C3 averages, 1-8 (paper: 3). Weights are e^-i for the
    i-th most recent (i = 1..window), over the outputs that exist, normalised to sum 1."""

    starvation_scale: float = 0.1
    """Importance grows by exp(starvation_scale * k) for a token not computed for k consecutive steps (as in
    RAS, default 0.1), so no token stays cached forever. Must be >= 0 (0 turns it off)."""

    warmup_steps: int = 4
    """The first `warmup_steps` steps are computed fully (RAS: 4). Must be >= 1: partial steps need a history."""

    refresh_every: int = 0
    """After this many consecutive partial steps the next step is computed fully (every token refreshed and
    every output history entry renewed). 0 never refreshes (the paper's speedups count no refresh)."""

    score_chunk: int = 1024
    """Queries per chunk when computing the attention each token receives: the softmax is materialised for
    `score_chunk` queries x all keys x heads at a time, never the full N x N map. Must be >= 1."""

    score_every: int = 4
    """Attention received is summed over every `score_every`-th attention layer (layer index % score_every
    == 0, layers in execution order). 1 uses all layers as the paper; larger values make the side computation
    proportionally cheaper. Default 4: on the H100 (FLUX.1-dev size, 28 steps) it gave the same PSNR as 1
    (45.64 dB at cache rate 0.85) and 1.49x instead of 1.27x measured speedup. On partial steps only the computed queries (text + C1) are scored, which is all
    the model computes. Must be >= 1."""

    record_maps: bool = True
    """Store per-step `importance` and `level` maps (image-token grid) in the trace."""

    sync_timing: bool = True
    """Synchronise CUDA around each step so traced times are real (costs a little overlap)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        _check(num(self.cache_rate) and 0 <= self.cache_rate < 1, "cache_rate", "a number in [0, 1)", self.cache_rate)
        _check(_is_int(self.spec_steps) and 1 <= self.spec_steps <= 16, "spec_steps", "an integer in 1..16",
               self.spec_steps)
        _check(isinstance(self.share_first_step, bool), "share_first_step", "a bool", self.share_first_step)
        _check(num(self.c2_share) and 0 <= self.c2_share < 1, "c2_share", "a number in [0, 1)", self.c2_share)
        _check(_is_int(self.history_window) and 1 <= self.history_window <= 8, "history_window",
               "an integer in 1..8", self.history_window)
        _check(num(self.starvation_scale) and 0 <= self.starvation_scale <= 50, "starvation_scale",
               "a number in [0, 50]", self.starvation_scale)
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 1, "warmup_steps",
               "an integer >= 1 (partial steps need a computed history)", self.warmup_steps)
        _check(_is_int(self.refresh_every) and self.refresh_every >= 0, "refresh_every",
               "an integer >= 0 (0 = never)", self.refresh_every)
        _check(_is_int(self.score_chunk) and self.score_chunk >= 1, "score_chunk", "an integer >= 1",
               self.score_chunk)
        _check(_is_int(self.score_every) and self.score_every >= 1, "score_every", "an integer >= 1",
               self.score_every)
        _check(isinstance(self.record_maps, bool), "record_maps", "a bool", self.record_maps)
        _check(isinstance(self.sync_timing, bool), "sync_timing", "a bool", self.sync_timing)

    def n_computed(self, n_image: int) -> int:
        """C1 size for `n_image` image tokens."""
        return min(n_image, max(1, int(round((1.0 - float(self.cache_rate)) * n_image))))

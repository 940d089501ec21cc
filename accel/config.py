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

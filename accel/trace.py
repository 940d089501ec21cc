"""The trace: the one record of an accelerated run.

One `StepRecord` per denoiser call (per step and per cache context, e.g. "cond"/"uncond" under true CFG),
plus what the run was (method, config, model, step count). Visualizers read only this; it round-trips
through JSON, and flattens to CSV.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, fields

# Decisions a step can take.
FULL = "full"  # every block computed
ACCEPTED = "accepted"  # speculative step kept (SpeCa) / partial step (SpecDiff)
REJECTED = "rejected"  # speculative step failed verification (then recomputed, or kept under "defer")
PARTIAL = "partial"  # SpecDiff: only some tokens computed
DECISIONS = (FULL, ACCEPTED, REJECTED, PARTIAL)


@dataclass
class StepRecord:
    step: int
    """Step index in the denoising loop (0-based)."""
    num_steps: int
    context: str = "cond"
    """Cache context (diffusers `cache_context` name): "cond", "uncond", ..."""
    timestep: float | None = None
    """Scheduler timestep of this step (FLUX: 1000 * sigma)."""
    sigma: float | None = None
    decision: str = FULL
    reason: str = ""
    """Why: "warmup", "max_spec", "schedule", "after_reject", "verified", "grace" (before min_spec_steps), "recomputed"..."""
    error: float | None = None
    """Verification error (max over the batch); None where nothing was verified."""
    errors: list[float] | None = None
    """Per-sample verification errors."""
    threshold: float | None = None
    time_ms: float = 0.0
    """Wall time of the whole denoiser call (CUDA-synchronised when on a GPU)."""
    blocks_computed: float = 0.0
    """Real block computations in this call, in block-equivalents (a partial SpecDiff block counts its token share)."""
    blocks_total: int = 0
    """Blocks a plain step computes."""
    tokens_computed: int | None = None
    tokens_total: int | None = None
    maps: dict[str, list] = field(default_factory=dict)
    """Token maps on the image-token grid ([h][w] or [frames][h][w]): "error" (SpeCa), "importance", "level" (SpecDiff)."""
    extra: dict = field(default_factory=dict)
    """Method-specific numbers (e.g. level counts, attention-score cost)."""

    @property
    def is_full(self) -> bool:
        return self.decision == FULL


@dataclass
class Trace:
    method: str
    config: dict
    model: str = ""
    num_steps: int = 0
    token_grid: list[int] | None = None
    """Shape of the image-token grid ([h, w] or [frames, h, w])."""
    steps: list[StepRecord] = field(default_factory=list)
    overhead: list[StepRecord] = field(default_factory=list)
    """Calls that are not denoising steps but count in every speedup (SpecDiff's speculative pre-run)."""
    meta: dict = field(default_factory=dict)

    # ---- views -------------------------------------------------------------------------
    def contexts(self) -> list[str]:
        seen: list[str] = []
        for r in self.steps:
            if r.context not in seen:
                seen.append(r.context)
        return seen

    def for_context(self, context: str | None = None) -> list[StepRecord]:
        context = context or (self.contexts()[0] if self.steps else "cond")
        return [r for r in self.steps if r.context == context]

    def schedule(self, context: str | None = None) -> list[bool]:
        """Full/speculative decisions of one context, for `SpeCaConfig(schedule=...)`: True = full.
        A rejected-and-recomputed step replays as full (that is what its output was)."""
        out = []
        for r in self.for_context(context):
            full = r.decision == FULL or (r.decision == REJECTED and r.reason == "recomputed")
            out.append(full)
        return out

    def summary(self) -> dict:
        """Counts and speedups. `ideal_speedup` = block computations of a plain run / those of this run
        (pre-run included); `measured_ms` is the summed wall time of the denoiser calls."""
        recs = self.steps
        all_recs = recs + self.overhead
        blocks_plain = sum(r.blocks_total for r in recs)
        blocks_done = sum(r.blocks_computed for r in all_recs)
        count = {d: sum(1 for r in recs if r.decision == d) for d in DECISIONS}
        toks = [r for r in recs if r.tokens_computed is not None and r.tokens_total]
        return {
            "steps": len(recs),
            "full_steps": count[FULL],
            "accepted_steps": count[ACCEPTED],
            "rejected_steps": count[REJECTED],
            "partial_steps": count[PARTIAL],
            "overhead_calls": len(self.overhead),
            "blocks_plain": blocks_plain,
            "blocks_computed": round(blocks_done, 3),
            "ideal_speedup": round(blocks_plain / blocks_done, 4) if blocks_done else None,
            "measured_ms": round(sum(r.time_ms for r in all_recs), 3),
            "overhead_ms": round(sum(r.time_ms for r in self.overhead), 3),
            "token_fraction_computed": (
                round(sum(r.tokens_computed for r in toks) / sum(r.tokens_total for r in toks), 4) if toks else None
            ),
        }

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | None = None, indent: int | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        known = {f.name for f in fields(StepRecord)}
        d = dict(d)
        for key in ("steps", "overhead"):
            d[key] = [StepRecord(**{k: v for k, v in r.items() if k in known}) for r in d.get(key, [])]
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def from_json(cls, text_or_path: str) -> "Trace":
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a SpecLab trace: invalid JSON ({e})") from None
        if not isinstance(data, dict) or "steps" not in data or "method" not in data:
            raise ValueError("not a SpecLab trace: expected a JSON object with 'method' and 'steps'")
        return cls.from_dict(data)

    def to_csv(self, path: str | None = None) -> str:
        """One row per step (token maps left out; they live in the JSON)."""
        cols = [f.name for f in fields(StepRecord) if f.name not in ("maps", "extra", "errors")]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["phase"] + cols)
        for phase, recs in (("pre-run", self.overhead), ("main", self.steps)):
            for r in recs:
                w.writerow([phase] + ["" if getattr(r, c) is None else getattr(r, c) for c in cols])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(text)
        return text

"""The trace: the one record of an accelerated run.

One `StepRecord` per denoiser call (per step and per cache context, e.g. "cond"/"uncond" under true CFG),
plus what the run was (method, config, model, step count). Visualizers read only this; it round-trips
through JSON, and flattens to CSV.

Arrays inside, lists at the edge: token maps are numpy arrays (`StepRecord.set_map`), and the per-step numbers
a figure plots are kept as columns (`Trace.series`, `Trace.step_totals`) that grow by one row per `append`, so
drawing step 50 costs what drawing step 1 does. Lists (and `null` for non-finite numbers) appear only in
`to_dict` / `to_json`; `from_dict` / `from_json` / `load` turn them back into arrays.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import threading
from dataclasses import dataclass, field, fields

import numpy as np

# Decisions a step can take.
FULL = "full"  # every block computed
ACCEPTED = "accepted"  # speculative step kept (SpeCa) / partial step (SpecDiff)
REJECTED = "rejected"  # speculative step failed verification (then recomputed, or kept under "defer")
PARTIAL = "partial"  # SpecDiff: only some tokens computed
DECISIONS = (FULL, ACCEPTED, REJECTED, PARTIAL)
"""A decision's code in `Series.decision` is its index here (-1: a decision not listed)."""
_DECISION_CODE = {d: i for i, d in enumerate(DECISIONS)}

MAP_DTYPES = {"level": np.int8}
"""Token-map dtypes by name; every other map (importance, error, ...) is float32."""


def map_dtype(name: str) -> np.dtype:
    return np.dtype(MAP_DTYPES.get(name, np.float32))


def as_map(name: str, values) -> np.ndarray:
    """`values` (a torch tensor on any device, an array, or nested lists) as the CPU numpy array a trace keeps
    for map `name`: always a copy (a map never changes with the buffer it came from). Lists may hold None for a
    non-finite value (what `to_dict` writes); it comes back as NaN."""
    if hasattr(values, "detach"):  # a torch tensor: to the host; floats as float32 (numpy has no bfloat16)
        values = values.detach().cpu()
        values = (values.float() if values.dtype.is_floating_point else values).numpy()
    return np.array(values, dtype=map_dtype(name))


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
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    """Token maps on the image-token grid ([h, w] or [frames, h, w]) as CPU numpy arrays (float32; int8 for
    "level"): "error" (SpeCa, FirstBlockCache), "importance", "level" (SpecDiff). Set them with `set_map`."""
    extra: dict = field(default_factory=dict)
    """Method-specific numbers (e.g. level counts, attention-score cost)."""

    @property
    def is_full(self) -> bool:
        return self.decision == FULL

    def set_map(self, name: str, values) -> None:
        """Store token map `name` (a tensor already shaped to the token grid) as a CPU numpy array.

        The one place a map leaves the device. Why here and not "on the device until drawn": every method
        already waits for the device once per step for its decision or counts (SpeCa's errors, FirstBlockCache's
        residual change, SpecDiff's level counts, which it packs with the maps), so this copy adds no sync, only
        a few KB; the trace is read by another thread while the run goes on (the lab's stream), kept in Gradio's
        session state and written to JSON, all of which want host memory; and a trace holding device tensors
        would keep GPU memory alive for every step of every kept run."""
        self.maps = {**self.maps, name: as_map(name, values)}  # a new dict: a reader iterating the old one is safe

    def __eq__(self, other) -> bool:
        if not isinstance(other, StepRecord):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "maps":
                if a.keys() != b.keys() or not all(_same_array(a[k], b[k]) for k in a):
                    return False
            elif a != b:
                return False
        return True


def _same_array(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


# ---- columns ---------------------------------------------------------------------------------------------
_COLUMNS = {
    "index": np.int64, "step": np.int64, "decision": np.int8, "timestep": np.float64, "error": np.float64,
    "threshold": np.float64, "time_ms": np.float64, "blocks_computed": np.float64, "blocks_total": np.float64,
    "tokens_computed": np.float64, "tokens_total": np.float64, "has_maps": np.bool_, "reason": object,
}


@dataclass(frozen=True)
class Series:
    """Records of one context (or the pre-run calls) as columns, one entry per record in the order they came.
    Read-only numpy arrays; a None becomes NaN (float columns)."""

    index: np.ndarray
    """Position of the record in `trace.steps` (`trace.overhead` for `overhead_series`)."""
    step: np.ndarray
    decision: np.ndarray
    """int8: index into `DECISIONS` (-1: another decision)."""
    timestep: np.ndarray
    error: np.ndarray
    threshold: np.ndarray
    time_ms: np.ndarray
    blocks_computed: np.ndarray
    blocks_total: np.ndarray
    tokens_computed: np.ndarray
    tokens_total: np.ndarray
    has_maps: np.ndarray
    """bool: the record carries token maps."""
    reason: np.ndarray
    """object array of str."""
    share: np.ndarray
    """Share of a full step computed: main steps, all contexts of the record's step together (block
    computations / blocks of a plain step); pre-run calls, the call alone."""

    def __len__(self) -> int:
        return len(self.step)

    @property
    def token_share(self) -> np.ndarray:
        """tokens_computed / tokens_total (NaN where not recorded)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.tokens_total > 0, self.tokens_computed / self.tokens_total, np.nan)


@dataclass(frozen=True)
class StepTotals:
    """Main steps summed over their contexts (CFG's two calls of a step together), ascending by step."""

    step: np.ndarray
    calls: np.ndarray
    blocks_computed: np.ndarray
    blocks_total: np.ndarray
    time_ms: np.ndarray


class _Columns:
    """Append-only columns in numpy buffers that double when full (amortised O(1) per row)."""

    def __init__(self, columns: dict = _COLUMNS, capacity: int = 16):
        self.n = 0
        self.buf = {k: np.empty(capacity, dtype=dt) for k, dt in columns.items()}

    def append(self, row: dict) -> None:
        cap = len(next(iter(self.buf.values())))
        if self.n == cap:
            for k, b in self.buf.items():
                grown = np.empty(max(16, 2 * cap), dtype=b.dtype)
                grown[:cap] = b
                self.buf[k] = grown
        for k, v in row.items():
            self.buf[k][self.n] = v
        self.n += 1

    def views(self) -> dict:
        out = {}
        for k, b in self.buf.items():
            v = b[:self.n]
            v.flags.writeable = False
            out[k] = v
        return out

    def copy(self) -> "_Columns":
        c = _Columns.__new__(_Columns)
        c.n = self.n
        c.buf = {k: b.copy() for k, b in self.buf.items()}
        return c


def _row(i: int, r: StepRecord) -> dict:
    nan = math.nan
    return {
        "index": i, "step": r.step, "decision": _DECISION_CODE.get(r.decision, -1),
        "timestep": nan if r.timestep is None else r.timestep, "error": nan if r.error is None else r.error,
        "threshold": nan if r.threshold is None else r.threshold, "time_ms": r.time_ms,
        "blocks_computed": r.blocks_computed, "blocks_total": r.blocks_total,
        "tokens_computed": nan if r.tokens_computed is None else r.tokens_computed,
        "tokens_total": nan if r.tokens_total is None else r.tokens_total, "has_maps": bool(r.maps),
        "reason": r.reason,
    }


class _Index:
    """What `Trace` derives from its records, kept up to date one record at a time: per-context columns,
    per-step sums, the running totals of `summary()`. A cache: never serialised, rebuilt when its lists
    were replaced or shrank. Records are final once appended (the runtime fills them in before); one that
    changes later is followed by `Trace.refresh`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stale = False
        """Reset by `Trace.refresh`: the next reader rebuilds (not `Trace.append`)."""
        self._reset_steps(None)
        self._reset_overhead(None)

    def __deepcopy__(self, memo):  # a copied trace rebuilds its cache from its own records
        return _Index()

    def __reduce__(self):
        return (_Index, ())

    def _reset_steps(self, steps) -> None:
        self.steps_ref, self.n = steps, 0
        self.by_context: dict[str, _Columns] = {}
        self.per_step = {k: np.zeros(16, dtype=dt) for k, dt in
                         (("calls", np.int64), ("blocks_computed", np.float64), ("blocks_total", np.float64),
                          ("time_ms", np.float64))}
        self.full_ms = _Columns({"time_ms": np.float64})  # time_ms of FULL calls, any context (a plain step's cost estimate)
        self.counts = dict.fromkeys(DECISIONS, 0)
        self.blocks_plain = 0
        self.blocks_done = 0
        self.time_ms = 0
        self.tokens_computed = 0
        self.tokens_total = 0
        self.has_tokens = False

    def _reset_overhead(self, overhead) -> None:
        self.overhead_ref, self.n_over = overhead, 0
        self.over = _Columns()

    def sync(self, trace: "Trace") -> None:
        """Take in the records appended since the last call (caller holds `lock`)."""
        steps = trace.steps
        if steps is not self.steps_ref or len(steps) < self.n:
            self._reset_steps(steps)
        for i in range(self.n, len(steps)):
            self._add(i, steps[i])
        self.n = len(steps)
        over = trace.overhead
        if over is not self.overhead_ref or len(over) < self.n_over:
            self._reset_overhead(over)
        for i in range(self.n_over, len(over)):
            self.over.append(_row(i, over[i]))
        self.n_over = len(over)
        self.stale = False

    def _add(self, i: int, r: StepRecord) -> None:
        if r.step < 0:
            raise ValueError(f"step {r.step} of record {i} is negative")
        row = _row(i, r)
        cols = self.by_context.get(r.context)
        if cols is None:
            cols = self.by_context[r.context] = _Columns()
        cols.append(row)
        ps = self.per_step
        if r.step >= len(ps["calls"]):
            size = max(2 * len(ps["calls"]), r.step + 1)
            for k, a in ps.items():
                grown = np.zeros(size, dtype=a.dtype)
                grown[:len(a)] = a
                ps[k] = grown
        ps["calls"][r.step] += 1
        ps["blocks_computed"][r.step] += r.blocks_computed
        ps["blocks_total"][r.step] += r.blocks_total
        ps["time_ms"][r.step] += r.time_ms
        if r.decision == FULL:
            self.full_ms.append({"time_ms": r.time_ms})
        if r.decision in self.counts:
            self.counts[r.decision] += 1
        # running sums in record order, as `sum()` over the records would add them (same floats)
        self.blocks_plain += r.blocks_total
        self.blocks_done += r.blocks_computed
        self.time_ms += r.time_ms
        if r.tokens_computed is not None and r.tokens_total:
            self.tokens_computed += r.tokens_computed
            self.tokens_total += r.tokens_total
            self.has_tokens = True

    def copy(self) -> "_Index":
        c = _Index.__new__(_Index)
        c.lock = threading.Lock()
        c.__dict__.update({k: v for k, v in self.__dict__.items() if k != "lock"})
        c.by_context = {k: v.copy() for k, v in self.by_context.items()}
        c.per_step = {k: v.copy() for k, v in self.per_step.items()}
        c.full_ms, c.over, c.counts = self.full_ms.copy(), self.over.copy(), dict(self.counts)
        return c


# ---- JSON edge ---------------------------------------------------------------------------------------------
def _json_safe(v):
    """`v` with numpy values as Python ones and non-finite floats as None (JSON has no NaN/Infinity)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_json_safe(x) for x in v)
    if isinstance(v, np.ndarray):
        return _map_to_list(v)
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return v


def _map_to_list(a) -> list:
    a = np.asarray(a)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        obj = a.astype(object)
        obj[~np.isfinite(a)] = None
        return obj.tolist()
    return a.tolist()


def _record_to_dict(r: StepRecord) -> dict:
    out = {}
    for f in fields(StepRecord):
        v = getattr(r, f.name)
        out[f.name] = {k: _map_to_list(m) for k, m in v.items()} if f.name == "maps" else _json_safe(v)
    return out


def _record_from_dict(d: dict, known: set) -> StepRecord:
    r = StepRecord(**{k: v for k, v in d.items() if k in known and k != "maps"})
    for name, values in (d.get("maps") or {}).items():
        r.maps[name] = as_map(name, values)
    return r


@dataclass
class Trace:
    method: str
    config: dict
    model: str = ""
    num_steps: int = 0
    token_grid: list[int] | None = None
    """Shape of the image-token grid ([h, w] or [frames, h, w])."""
    steps: list[StepRecord] = field(default_factory=list)
    """Main steps, in the order they ran. Add with `append` (a direct `steps.append` works too: the series
    catch up on their next read)."""
    overhead: list[StepRecord] = field(default_factory=list)
    """Calls that are not denoising steps but count in every speedup (SpecDiff's speculative pre-run)."""
    meta: dict = field(default_factory=dict)
    _index: _Index = field(default_factory=_Index, init=False, repr=False, compare=False)

    # ---- growing ----------------------------------------------------------------------------------------
    def append(self, rec: StepRecord) -> None:
        """Add one main step (the runtime calls this after each denoiser call); the series take it in now,
        in O(1). Safe against a concurrent `snapshot()` from another thread. After a `refresh` the series are
        rebuilt by the next reader (`snapshot`, `summary`, ...), not here: the runtime appends from the pipeline's
        thread, which should only issue the device's work."""
        with self._index.lock:
            self.steps.append(rec)
            if not self._index.stale:
                self._index.sync(self)

    def refresh(self) -> None:
        """Records changed after they were appended (with `sync_timing=False` step times and trace-only values
        are read from the device once it has run them, `accel.runtime.DeviceReads`): the series are rebuilt by
        the next reader."""
        with self._index.lock:
            self._index._reset_steps(None)
            self._index._reset_overhead(None)
            self._index.stale = True

    def snapshot(self) -> "Trace":
        """A copy that later appends do not change (what the lab hands to the figures while a run goes on).
        Shares the records (final once appended) and copies the series, so its figures need no rebuild."""
        with self._index.lock:
            self._index.sync(self)
            steps, overhead, index = list(self.steps), list(self.overhead), self._index.copy()
        snap = dataclasses.replace(self, steps=steps, overhead=overhead)
        index.steps_ref, index.overhead_ref = steps, overhead
        snap._index = index
        return snap

    # ---- views -------------------------------------------------------------------------
    def contexts(self) -> list[str]:
        idx = self._index
        with idx.lock:
            idx.sync(self)
            return list(idx.by_context)

    def series(self, context: str | None = None) -> Series:
        """The main steps of `context` (None: the first context) as columns; O(1) in the number of steps."""
        idx = self._index
        with idx.lock:
            idx.sync(self)
            context = context or next(iter(idx.by_context), "cond")
            cols = idx.by_context.get(context)
            v = (cols or _Columns(capacity=0)).views()
            ps = idx.per_step
            share = ps["blocks_computed"][v["step"]] / np.maximum(1, ps["blocks_total"][v["step"]])
        return Series(**v, share=share)

    def overhead_series(self) -> Series:
        """The pre-run calls (`overhead`), every context, as columns."""
        idx = self._index
        with idx.lock:
            idx.sync(self)
            v = idx.over.views()
        return Series(**v, share=v["blocks_computed"] / np.maximum(1, v["blocks_total"]))

    def step_totals(self) -> StepTotals:
        """Main steps summed over their contexts, ascending by step (the steps that ran)."""
        idx = self._index
        with idx.lock:
            idx.sync(self)
            ps = idx.per_step
            present = np.flatnonzero(ps["calls"])
            return StepTotals(step=present, **{k: ps[k][present] for k in ps})

    def full_step_ms(self) -> np.ndarray:
        """time_ms of every FULL main call, any context, in order."""
        idx = self._index
        with idx.lock:
            idx.sync(self)
            return idx.full_ms.buf["time_ms"][:idx.full_ms.n].copy()

    def for_context(self, context: str | None = None) -> list[StepRecord]:
        return [self.steps[i] for i in self.series(context).index]

    def record(self, step: int, context: str | None = None) -> StepRecord | None:
        """The (first) record of `step` in `context` (None: the first context), or None."""
        s = self.series(context)
        hit = np.flatnonzero(s.step == int(step))
        return self.steps[s.index[hit[0]]] if len(hit) else None

    def schedule(self, context: str | None = None) -> list[bool]:
        """Full/speculative decisions of one context, for `SpeCaConfig(schedule=...)`: True = full.
        A rejected-and-recomputed step replays as full (that is what its output was)."""
        s = self.series(context)
        full = (s.decision == _DECISION_CODE[FULL]) | ((s.decision == _DECISION_CODE[REJECTED])
                                                       & (s.reason == "recomputed"))
        return full.tolist()

    def summary(self) -> dict:
        """Counts and speedups. `ideal_speedup` = block computations of a plain run / those of this run
        (pre-run included); `measured_ms` is the summed wall time of the denoiser calls. O(1) in the steps."""
        idx = self._index
        with idx.lock:
            idx.sync(self)
            over = self.overhead[:idx.n_over]
            blocks_plain, blocks_done, all_ms = idx.blocks_plain, idx.blocks_done, idx.time_ms
            counts, n_steps = dict(idx.counts), idx.n
            tok = (idx.tokens_computed, idx.tokens_total) if idx.has_tokens else None
        over_ms = 0
        for r in over:  # after the steps, in order: the same sums as over `steps + overhead`
            blocks_done += r.blocks_computed
            all_ms += r.time_ms
            over_ms += r.time_ms
        return {
            "steps": n_steps,
            "full_steps": counts[FULL],
            "accepted_steps": counts[ACCEPTED],
            "rejected_steps": counts[REJECTED],
            "partial_steps": counts[PARTIAL],
            "overhead_calls": len(over),
            "blocks_plain": blocks_plain,
            "blocks_computed": round(blocks_done, 3),
            "ideal_speedup": round(blocks_plain / blocks_done, 4) if blocks_done else None,
            "measured_ms": round(all_ms, 3),
            "overhead_ms": round(over_ms, 3),
            "token_fraction_computed": round(tok[0] / tok[1], 4) if tok else None,
        }

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-ready data: maps as nested lists, non-finite numbers as None."""
        out = {}
        for f in fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            out[f.name] = [_record_to_dict(r) for r in v] if f.name in ("steps", "overhead") else _json_safe(v)
        return out

    def to_json(self, path: str | None = None, indent: int | None = None) -> str:
        """Standard JSON (no NaN/Infinity: those are written as null); also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        """From `to_dict`'s data (maps as nested lists, or arrays); unknown keys are ignored, so traces
        written by older versions load."""
        known = {f.name for f in fields(StepRecord)}
        d = dict(d)
        for key in ("steps", "overhead"):
            d[key] = [_record_from_dict(r, known) for r in d.get(key, [])]
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls) if f.init}})

    @classmethod
    def from_json(cls, text: str) -> "Trace":
        """From JSON text (never a file name: see `load`)."""
        if not isinstance(text, str):
            raise TypeError(f"Trace.from_json takes JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "" if text.lstrip().startswith("{") else "; to read a file, use Trace.load(path)"
            raise ValueError(f"not a SpecLab trace: invalid JSON ({e}){hint}") from None
        if not isinstance(data, dict) or "steps" not in data or "method" not in data:
            raise ValueError("not a SpecLab trace: expected a JSON object with 'method' and 'steps'")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path) -> "Trace":
        """From a trace JSON file (as written by `to_json(path)`)."""
        with open(path) as f:
            return cls.from_json(f.read())

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

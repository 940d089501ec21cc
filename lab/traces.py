"""Reading a trace file that somebody uploaded: size, shape and type checked before anything draws it.

Token maps are kept as numpy arrays (what the figures read; a few times smaller than the JSON's nested lists).
A trace exported by the lab passes; anything else fails with a `TraceError` that says what is wrong, never
with a Python error text, a server path or the file's content echoed back.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from accel.trace import DECISIONS, StepRecord, Trace

from .errors import LabError
from .limits import Limits


class TraceError(LabError):
    """The file is not a trace the lab can show; the message says why."""


_WORD = re.compile(r"^[\w .,:;()+\-/=#'*]*$")
_TEXT_FIELDS = ("method", "model")
_RECORD_TEXT = ("context", "reason")
_RECORD_NUMBERS = ("timestep", "sigma", "error", "threshold", "time_ms", "blocks_computed")
_RECORD_INTS = ("step", "num_steps", "blocks_total", "tokens_computed", "tokens_total")


def _fail(what: str) -> TraceError:
    return TraceError(f"not a trace this lab can show: {what}")


def _number(v, where: str, integer: bool = False, optional: bool = True):
    if v is None and optional:
        return
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    if not ok or not math.isfinite(v) or abs(v) > 1e15:
        raise _fail(f"{where} must be {'an integer' if integer else 'a finite number'}")


def _text(v, where: str, limit: int = 100):
    if not isinstance(v, str) or len(v) > limit or not _WORD.match(v):
        raise _fail(f"{where} must be short plain text")


def _token_map(v, where: str, limits: Limits) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        raise _fail(f"{where} must be a grid of numbers ([h][w] or [frames][h][w])") from None
    if a.ndim not in (2, 3) or a.size == 0:
        raise _fail(f"{where} must be a grid of numbers ([h][w] or [frames][h][w])")
    if a.size > limits.max_map_cells:
        raise _fail(f"{where} has {a.size} cells; at most {limits.max_map_cells} are shown")
    if not np.isfinite(a).all():
        raise _fail(f"{where} has values that are not finite numbers")
    return a


def _record(r, where: str, limits: Limits) -> dict:
    if not isinstance(r, dict):
        raise _fail(f"{where} must be an object")
    for k in _RECORD_INTS:
        _number(r.get(k), f"{where}.{k}", integer=True, optional=k not in ("step", "num_steps"))
    for k in _RECORD_NUMBERS:
        _number(r.get(k), f"{where}.{k}")
    if r["step"] < 0 or (r.get("blocks_total") or 0) < 0 or (r.get("blocks_computed") or 0) < 0:
        raise _fail(f"{where}: step and block counts must not be negative")
    if r.get("decision", "full") not in DECISIONS:
        raise _fail(f"{where}.decision must be one of {DECISIONS}")
    for k in _RECORD_TEXT:
        if k in r:
            _text(r[k], f"{where}.{k}")
    errors = r.get("errors")
    if errors is not None:
        if not isinstance(errors, list) or len(errors) > 4096:
            raise _fail(f"{where}.errors must be a list of numbers")
        for e in errors:
            _number(e, f"{where}.errors")
    maps = r.get("maps") or {}
    if not isinstance(maps, dict) or len(maps) > 8:
        raise _fail(f"{where}.maps must be an object of at most 8 token maps")
    arrays = {}
    for name, m in maps.items():
        _text(name, f"{where}.maps key", 40)
        arrays[name] = _token_map(m, f"{where}.maps.{name}", limits)
    known = set(StepRecord.__dataclass_fields__)
    return {**{k: v for k, v in r.items() if k in known and k != "extra"}, "maps": arrays}


def validate(data, limits: Limits) -> Trace:
    if not isinstance(data, dict) or "steps" not in data or "method" not in data:
        raise _fail("expected a JSON object with 'method' and 'steps' (exported by this lab or Trace.to_json)")
    for k in _TEXT_FIELDS:
        if k in data:
            _text(data[k], k)
    _number(data.get("num_steps", 0), "num_steps", integer=True)
    grid = data.get("token_grid")
    if grid is not None and (not isinstance(grid, list) or len(grid) not in (2, 3)
                             or any(isinstance(g, bool) or not isinstance(g, int) or not 0 < g <= 4096 for g in grid)):
        raise _fail("token_grid must be [h, w] or [frames, h, w] of positive integers")
    if not isinstance(data.get("config", {}), dict):
        raise _fail("config must be an object")
    out = {"method": data["method"], "config": data.get("config", {}), "model": data.get("model", ""),
           "num_steps": data.get("num_steps", 0), "token_grid": grid}
    n = 0
    for key in ("steps", "overhead"):
        recs = data.get(key, [])
        if not isinstance(recs, list):
            raise _fail(f"{key} must be a list of step records")
        n += len(recs)
        if n > limits.max_trace_records:
            raise _fail(f"it has more than {limits.max_trace_records} step records")
        out[key] = [_record(r, f"{key}[{i}]", limits) for i, r in enumerate(recs)]
    meta = data.get("meta")
    run = meta.get("run") if isinstance(meta, dict) else None
    if isinstance(run, dict) and len(run) <= 16 and len(json.dumps(run)) <= limits.max_prompt_chars + 4000:
        out["meta"] = {"run": run}  # what restores the view (its values are checked again by the app)
    return Trace.from_dict(out)


def read_trace(path: str, limits: Limits | None = None) -> Trace:
    """The trace in the JSON file at `path` (an upload), checked against `limits`."""
    limits = limits or Limits()
    name = os.path.basename(str(path))[:80]
    try:
        size = os.path.getsize(path)
        if size > limits.max_upload_mb * 1e6:
            raise TraceError(f"{name} is {size / 1e6:.3g} MB: traces up to {limits.max_upload_mb:g} MB are read")
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except TraceError:
        raise
    except (OSError, ValueError, RecursionError):  # no path, no parser text: neither helps the user
        raise TraceError(f"could not read {name}: not a readable JSON file") from None
    return validate(data, limits)

"""accel.trace: arrays inside, lists at the JSON edge; series kept up to date one step at a time; figures whose
work does not grow with the step index."""

import json
import math
import random
import threading
from dataclasses import fields

import numpy as np
import pytest
import torch

import visualizers as V
from accel.trace import ACCEPTED, DECISIONS, FULL, PARTIAL, REJECTED, StepRecord, Trace

GRID = [4, 6]


def _record(i: int, context: str = "cond", n: int = 12, rng=None, maps=True) -> StepRecord:
    rng = rng or np.random.default_rng(i)
    d = FULL if i < 2 else (ACCEPTED, REJECTED, PARTIAL)[i % 3]
    r = StepRecord(step=i, num_steps=n, context=context, timestep=1000.0 * (1 - i / n), sigma=1 - i / n,
                   decision=d, reason="" if d == FULL else f"r{i}", error=None if d == FULL else float(rng.random()),
                   errors=None if d == FULL else [float(rng.random())], threshold=0.5 * 0.9 ** i,
                   time_ms=float(rng.random() * 10), blocks_computed=float(rng.integers(1, 6)) / 3, blocks_total=5,
                   tokens_computed=int(rng.integers(1, 24)) if d == PARTIAL else None,
                   tokens_total=24 if d == PARTIAL else None, extra={"c1": i, "spec_sigma": 0.1 * i})
    if maps and d != FULL:
        r.set_map("error", torch.rand(GRID, generator=torch.Generator().manual_seed(i)))
        r.set_map("level", torch.randint(1, 4, GRID, generator=torch.Generator().manual_seed(i)))
    return r


def _trace(n: int = 12, contexts=("cond",), prerun: int = 0) -> Trace:
    t = Trace(method="specdiff", config={"cache_rate": 0.75, "sizes": [1, 2]}, model="Synthetic", num_steps=n,
              token_grid=GRID, meta={"family": "flux"})
    for j in range(prerun):
        t.overhead.append(StepRecord(step=j, num_steps=prerun, decision=FULL, reason="prerun", time_ms=3.0 + j,
                                     blocks_computed=5.0, blocks_total=5))
    for i in range(n):
        for c in contexts:
            t.append(_record(i, c, n))
    return t


# ---- arrays inside, lists at the edge ------------------------------------------------------------------------
def test_set_map_keeps_cpu_numpy_arrays_float32_and_int8_levels():
    r = StepRecord(step=0, num_steps=1)
    r.set_map("importance", torch.rand(2, 3, dtype=torch.bfloat16))
    r.set_map("level", torch.tensor([[1.0, 2.0, 3.0]]))  # SpecDiff packs levels with floats
    r.set_map("error", [[0.5, 1.5]])
    assert all(isinstance(m, np.ndarray) for m in r.maps.values())
    assert r.maps["importance"].dtype == np.float32 and r.maps["importance"].shape == (2, 3)
    assert r.maps["level"].dtype == np.int8 and r.maps["level"].tolist() == [[1, 2, 3]]
    assert r.maps["error"].dtype == np.float32


def test_json_round_trip_is_exact_and_maps_come_back_as_arrays(tmp_path):
    t = _trace(contexts=("cond", "uncond"), prerun=2)
    t.steps[5].set_map("importance", np.random.default_rng(0).random((3, 4, 6)))  # a video map [frames, h, w]
    text = t.to_json()
    back = Trace.from_json(text)
    assert back == t  # every field; StepRecord compares maps by dtype, shape and values
    for a, b in zip(back.steps, t.steps):
        assert a.maps.keys() == b.maps.keys()
        for k in a.maps:
            assert isinstance(a.maps[k], np.ndarray) and a.maps[k].dtype == b.maps[k].dtype
            assert np.array_equal(a.maps[k], b.maps[k])
    assert Trace.from_dict(t.to_dict()) == t
    # to_dict is plain JSON data: lists, no arrays
    d = t.to_dict()
    assert isinstance(d["steps"][5]["maps"]["level"], list) and isinstance(d["steps"][5]["maps"]["level"][0][0], int)
    assert json.loads(json.dumps(d)) == json.loads(text)
    # the file edge
    t.to_json(str(tmp_path / "t.json"), indent=1)
    assert Trace.load(tmp_path / "t.json") == t
    assert back.summary() == t.summary() and back.to_csv() == t.to_csv()


def test_old_trace_json_with_nested_list_maps_still_loads():
    old = {  # as written before maps were arrays: nested lists, and a field this version does not know
        "method": "speca", "config": {"threshold": 0.5}, "model": "M", "num_steps": 2, "token_grid": [2, 2],
        "steps": [{"step": 0, "num_steps": 2, "decision": "full", "maps": {}, "retired_field": 1},
                  {"step": 1, "num_steps": 2, "decision": "accepted", "error": 0.25,
                   "maps": {"error": [[0.1, 0.2], [0.30000001192092896, 4.0]], "level": [[1, 2], [3, 1]]}}],
        "overhead": [], "meta": {},
    }
    t = Trace.from_json(json.dumps(old))
    m = t.steps[1].maps
    assert m["error"].dtype == np.float32 and m["error"].shape == (2, 2) and m["error"][1, 0] == np.float32(0.3)
    assert m["level"].dtype == np.int8 and m["level"].tolist() == [[1, 2], [3, 1]]
    assert V.map_steps(t) == [1]


def test_json_is_standard_non_finite_numbers_are_written_as_null():
    t = _trace(n=4)
    r = t.steps[3]
    r.error, r.threshold, r.errors = math.inf, math.nan, [math.inf, 0.5]
    r.set_map("error", np.array([[np.inf, np.nan, 1.0, 2.0, 3.0, 4.0]] * 4))
    t.config["cap"] = -math.inf
    t.meta["x"] = np.float32(np.nan)
    text = t.to_json()

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=refuse)
    assert data["steps"][3]["error"] is None and data["steps"][3]["threshold"] is None
    assert data["steps"][3]["errors"] == [None, 0.5] and data["config"]["cap"] is None and data["meta"]["x"] is None
    assert data["steps"][3]["maps"]["error"][0][:3] == [None, None, 1.0]
    back = Trace.from_json(text)
    assert back.steps[3].error is None
    assert np.isnan(back.steps[3].maps["error"][0, :2]).all() and back.steps[3].maps["error"][0, 2] == 1.0


def test_from_json_never_opens_a_file(tmp_path, monkeypatch):
    t = _trace(n=3)
    t.to_json(str(tmp_path / "trace.json"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"not a SpecLab trace.*Trace\.load"):
        Trace.from_json("trace.json")  # a file of that name exists: still read as (invalid) JSON text
    with pytest.raises(ValueError, match="not a SpecLab trace"):
        Trace.from_json('{"a": 1}')
    with pytest.raises(TypeError):
        Trace.from_json(tmp_path / "trace.json")
    assert Trace.load("trace.json") == t


# ---- series, kept up to date one step at a time ----------------------------------------------------------------
def _old_summary(t: Trace) -> dict:
    """summary() as it was computed from the records (the numbers must not change)."""
    recs = t.steps
    all_recs = recs + t.overhead
    blocks_plain = sum(r.blocks_total for r in recs)
    blocks_done = sum(r.blocks_computed for r in all_recs)
    count = {d: sum(1 for r in recs if r.decision == d) for d in DECISIONS}
    toks = [r for r in recs if r.tokens_computed is not None and r.tokens_total]
    return {
        "steps": len(recs), "full_steps": count[FULL], "accepted_steps": count[ACCEPTED],
        "rejected_steps": count[REJECTED], "partial_steps": count[PARTIAL], "overhead_calls": len(t.overhead),
        "blocks_plain": blocks_plain, "blocks_computed": round(blocks_done, 3),
        "ideal_speedup": round(blocks_plain / blocks_done, 4) if blocks_done else None,
        "measured_ms": round(sum(r.time_ms for r in all_recs), 3),
        "overhead_ms": round(sum(r.time_ms for r in t.overhead), 3),
        "token_fraction_computed": (
            round(sum(r.tokens_computed for r in toks) / sum(r.tokens_total for r in toks), 4) if toks else None
        ),
    }


def _check_series(t: Trace) -> None:
    for c in t.contexts():
        recs = [r for r in t.steps if r.context == c]
        s = t.series(c)
        assert s.step.tolist() == [r.step for r in recs]
        assert s.decision.tolist() == [DECISIONS.index(r.decision) for r in recs]
        assert np.array_equal(s.error, [math.nan if r.error is None else r.error for r in recs], equal_nan=True)
        assert s.time_ms.tolist() == [r.time_ms for r in recs] and s.reason.tolist() == [r.reason for r in recs]
        assert s.has_maps.tolist() == [bool(r.maps) for r in recs]
        for r, share in zip(recs, s.share):
            group = [g for g in t.steps if g.step == r.step]
            assert share == sum(g.blocks_computed for g in group) / max(1, sum(g.blocks_total for g in group))
    assert t.summary() == _old_summary(t)


def test_series_and_summary_follow_every_append_exactly():
    t = Trace(method="speca", config={}, num_steps=20)
    t.overhead.append(StepRecord(step=0, num_steps=1, decision=FULL, time_ms=0.1, blocks_computed=0.7, blocks_total=5))
    assert t.series().step.tolist() == [] and t.summary() == _old_summary(t)
    rng = random.Random(0)
    for i in range(20):
        for c in ("cond", "uncond"):
            t.append(_record(i, c, 20, np.random.default_rng(rng.randrange(1000)), maps=i % 2 == 0))
            _check_series(t)
    assert t.contexts() == ["cond", "uncond"]
    assert t.for_context("uncond") == [r for r in t.steps if r.context == "uncond"]
    assert t.record(7, "uncond") is t.steps[15] and t.record(99) is None
    assert t.schedule() == [r.decision == FULL for r in t.steps if r.context == "cond"]
    tot = t.step_totals()
    assert tot.step.tolist() == list(range(20)) and tot.calls.tolist() == [2] * 20
    # a direct steps.append (and overhead.append) is taken in on the next read
    t.steps.append(_record(20, "cond", 21))
    t.overhead.append(StepRecord(step=1, num_steps=1, time_ms=0.2, blocks_computed=1.0, blocks_total=5))
    _check_series(t)
    # a replaced list is re-read from scratch
    t.steps = t.steps[:7]
    _check_series(t)


def test_snapshot_is_isolated_from_later_appends_and_consistent_under_threads():
    t = _trace(n=5)
    snap = t.snapshot()
    t.append(_record(5, n=6))
    assert len(snap.steps) == 5 and len(snap.series()) == 5 and snap.summary()["steps"] == 5
    assert len(t.series()) == 6
    snap.append(_record(9, n=10))  # the snapshot's own series grow on their own
    assert len(snap.series()) == 6 and len(t.series()) == 6 and t.steps[-1].step == 5

    live = Trace(method="speca", config={}, num_steps=4000)
    done = threading.Event()

    def worker():
        for i in range(4000):
            live.append(_record(i, n=4000, maps=False))
        done.set()

    th = threading.Thread(target=worker)
    th.start()
    seen = 0
    while not done.is_set() or seen < 4000:
        s = live.snapshot()
        n = len(s.steps)
        assert len(s.series()) == n and s.summary()["steps"] == n and s.series().index.tolist() == list(range(n))
        seen = n
    th.join()


# ---- figures: the work per update does not grow with the step index -----------------------------------------
_FIELDS = frozenset(f.name for f in fields(StepRecord))


class _CountingRecord(StepRecord):
    """Counts reads of its dataclass fields (a figure that loops over the records reads them)."""

    reads = 0

    def __getattribute__(self, name):
        if name in _FIELDS:
            _CountingRecord.reads += 1
        return super().__getattribute__(name)


def _counting(rec: StepRecord) -> _CountingRecord:
    return _CountingRecord(**{f.name: getattr(rec, f.name) for f in fields(StepRecord)})


def _lab_update(trace: Trace) -> None:
    """What the lab does with each streamed update (lab.runner.stream_run + app.generate)."""
    snap = trace.snapshot()
    snap.summary()
    V.error_figure(snap)
    V.timeline_figure(snap)
    V.token_maps_figure(snap)
    V.map_steps(snap)
    V.map_frames(snap)


@pytest.mark.parametrize("contexts", [("cond",), ("cond", "uncond")])
def test_figure_work_per_update_does_not_grow_with_the_step_index(contexts):
    n = 40
    t = Trace(method="specdiff", config={}, model="M", num_steps=n, token_grid=GRID)
    t.overhead.append(_counting(StepRecord(step=0, num_steps=1, decision=FULL, reason="prerun", time_ms=1.0,
                                           blocks_computed=5.0, blocks_total=5)))
    reads = []
    for i in range(n):
        for c in contexts:
            t.append(_counting(_record(i, c, n)))
        _CountingRecord.reads = 0
        _lab_update(t)
        reads.append(_CountingRecord.reads)
        # and a scrub to an early step reads that one record only
        _CountingRecord.reads = 0
        V.token_maps_figure(t, step=min(i, 3))
        assert _CountingRecord.reads <= 12
    assert max(reads) <= 30, reads  # the newest record's title fields and maps, the pre-run call's sums
    assert max(reads[n // 2:]) <= max(reads[:5]), reads  # late steps read no more than the first ones

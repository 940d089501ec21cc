"""What the lab adds to a run's pipeline thread on a GPU, counted on the CPU: host syncs, blocking reads of tensors,
figure rebuilds. A sync per step lets the consumer's Python work (figures, previews: it holds the GIL) starve the
pipeline's kernel launches; the H100 run 1 of scripts/bench/gpu_lab.py measured +12.6 % on FLUX 1024² Full from
that. Counting, not timing: a regression fails here on any machine.

The fake-CUDA harness makes the runtime take its GPU paths on CPU tensors: `torch.cuda.is_available()` is True,
the transformer's device reads "cuda", CUDA events are stand-ins that complete only when waited for (a device far
behind the host), and `DeviceReads` treats every tensor as a device tensor. Every `torch.cuda.synchronize` and every
blocking read of a tensor (`item`, `tolist`, `float()`, `int()`, `bool()`, `numpy`, `cpu`) made in the pipeline's
thread is counted, step by step.
"""

from __future__ import annotations

import threading
import time

import gradio as gr
import pytest
import torch
from PIL import Image

import app
import tiny
from accel import runtime as RT
from accel.speca import SpeCaModelHook
from accel.specdiff import SpecDiffModelHook
from lab import methods as LM
from lab import models as M
from lab import runner as R
from lab.session import Session

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")
PIPE_THREAD = "speclab-run"
STEPS = 10


class FakeEvent:
    """A CUDA event of a device that runs far behind the host: done only once someone waits for it."""

    def __init__(self, *a, **k):
        self.t, self.done = None, False

    def record(self, *a):
        self.t = time.perf_counter()

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True

    def elapsed_time(self, other):
        return (other.t - self.t) * 1000.0 + 1.0


class Counts:
    def __init__(self):
        self.syncs = self.reads = 0
        self.at_step_end: list[tuple[int, int]] = []

    def mark(self):
        self.at_step_end.append((self.syncs, self.reads))

    def per_step(self) -> tuple[list[int], list[int]]:
        """(syncs, reads) in each step after the first (the first reads the run's schedule once)."""
        m = self.at_step_end
        return ([b[0] - a[0] for a, b in zip(m, m[1:])], [b[1] - a[1] for a, b in zip(m, m[1:])])


@pytest.fixture()
def fake_cuda(monkeypatch):
    counts = Counts()

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if threading.current_thread().name == PIPE_THREAD:
                counts.reads += 1
            return real(self, *a, **k)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def synchronize(*a, **k):
        if threading.current_thread().name == PIPE_THREAD:
            counts.syncs += 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(RT, "cuda_event", FakeEvent)
    monkeypatch.setattr(RT.StepDriverHook, "_device", staticmethod(lambda module: torch.device("cuda")))
    monkeypatch.setattr(RT.DeviceReads, "deferrable", staticmethod(lambda tensors=(), on_device=False: True))
    monkeypatch.setattr(RT.DeviceReads, "_buffer", lambda self, t: torch.empty(t.shape, dtype=t.dtype))
    for hook in (SpeCaModelHook, SpecDiffModelHook):  # no CUDA graphs on a CPU
        monkeypatch.setattr(hook, "_graphs_on", lambda self, module: False)
    return counts


@pytest.fixture(scope="module")
def model():
    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.0)
    return lab.manager.get(M.TINY)


def _spec():
    return R.RunSpec(M.TINY, "a red circle", 0, STEPS, 64, 64, 1.0)


def _lab_run(model, config, counts, monkeypatch):
    """The lab's streamed run (previews every step, the consumer drawing them in this thread)."""
    real = R._Run._on_step_end

    def on_step_end(self, *a):
        out = real(self, *a)
        counts.mark()
        return out

    monkeypatch.setattr(R._Run, "_on_step_end", on_step_end)
    ups = list(R.stream_run(model, _spec(), config, every_s=0.0))
    monkeypatch.setattr(R._Run, "_on_step_end", real)
    return ups[-1]


def _bare_run(model, config, counts):
    """The same accelerated call without the lab, in a thread of the same name."""
    import accel

    kwargs = R.pipe_kwargs(_spec(), model)
    out = {}

    def work():
        with accel.apply(model.pipe, config) as h:
            model.pipe(**kwargs, callback_on_step_end=lambda p, i, t, kw: counts.mark() or {},
                       callback_on_step_end_tensor_inputs=["latents"])
            out["trace"] = h.trace

    t = threading.Thread(target=work, name=PIPE_THREAD)
    t.start()
    t.join()
    return out["trace"]


CASES = {
    "Full": {},
    "SpeCa": {},  # the threshold: each judged step reads its error for the decision (the method's own sync)
    "SpeCa schedule": dict(speca_schedule=[True, True, True, False, False, True, False, False, False, True]),
    "SpecDiff": dict(specdiff_warmup_steps=2),
    "TaylorSeerCache (diffusers)": {},
}


def _config(case):
    label = case.replace(" schedule", "")
    over = CASES[case]
    cfg = LM.by_label(label).build({k: v for k, v in over.items() if k != "speca_schedule"})
    if "speca_schedule" in over:
        cfg.schedule = over["speca_schedule"]
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_the_lab_adds_no_host_sync_and_no_read_to_the_pipelines_thread(fake_cuda, model, case, monkeypatch):
    """Per step after the first: no `torch.cuda.synchronize` in the lab's run (its configs' `sync_timing` is off
    and an `on_step` viewer forces no read), and exactly the blocking reads of the bare accelerated call with the
    same config (the method's own: SpeCa's decisions), none of them the lab's (previews, step callback)."""
    config = _config(case)
    assert config.sync_timing is False
    final = _lab_run(model, config, fake_cuda, monkeypatch)
    lab_syncs, lab_reads = fake_cuda.per_step()
    assert len(lab_syncs) == STEPS - 1 and sum(lab_syncs) == 0
    bare = Counts()
    fake_cuda.__dict__.update(bare.__dict__)
    trace = _bare_run(model, _config(case), fake_cuda)
    bare_syncs, bare_reads = fake_cuda.per_step()
    assert sum(bare_syncs) == 0 and lab_reads == bare_reads
    if case == "SpeCa":
        judged = [r.step for r in trace.steps if r.reason in ("verified", "recomputed")]
        assert judged and [s + 1 for s, n in enumerate(lab_reads) if n] == judged  # reads at the decisions only
    elif case == "SpecDiff":  # its speculative pre-run reads the schedule's sigmas, once per run
        assert sum(1 for n in lab_reads if n) == 1
    else:
        assert sum(lab_reads) == 0
    # the step times came from the (fake) CUDA events once waited for at the run's end, and the series have them
    lab_trace = final.trace
    assert all(r.time_ms >= 1.0 for r in lab_trace.steps)
    assert list(lab_trace.series().time_ms) == [r.time_ms for r in lab_trace.steps]
    if case == "SpeCa schedule":  # the errors no decision needs reached the trace without a sync
        assert all(r.error is not None for r in lab_trace.steps if r.decision != "full")


def test_a_synchronised_config_is_counted(fake_cuda, model, monkeypatch):
    """The harness's counter works: `sync_timing=True` synchronises twice per step."""
    _lab_run(model, LM.by_label(LM.FULL).build({"full_sync_timing": True}), fake_cuda, monkeypatch)
    syncs, _ = fake_cuda.per_step()
    assert syncs == [2] * (STEPS - 1)


def test_device_reads_fill_when_the_device_is_done_and_refresh_the_trace(fake_cuda):
    """Polling never waits: an entry whose event has not run stays pending; once it has, its fill runs and the
    trace's series show the new value; `flush` waits for the rest."""
    from accel.trace import StepRecord, Trace

    trace = Trace(method="full", config={}, model="M", num_steps=2, token_grid=[1, 1])
    recs = [StepRecord(step=i, num_steps=2, time_ms=0.0) for i in range(2)]
    reads = RT.DeviceReads()
    for rec in recs:
        trace.append(rec)
        reads.add(lambda host, rec=rec: setattr(rec, "time_ms", float(host[0][0])), (torch.tensor([7.0 + rec.step]),),
                  trace=trace)
    assert list(trace.series().time_ms) == [0.0, 0.0]
    reads.poll()
    assert len(reads.pending) == 2 and recs[0].time_ms == 0.0
    reads.pending[0][0].synchronize()  # the device ran the first copy
    reads.poll()
    assert len(reads.pending) == 1 and list(trace.series().time_ms) == [7.0, 0.0]
    reads.flush()
    assert not reads.pending and list(trace.series().time_ms) == [7.0, 8.0]


def test_figures_are_rebuilt_at_most_once_per_update_interval(monkeypatch):
    """The consumer's figure work is throttled by wall time: a run of many fast steps rebuilds the figures at
    most once per `every_s` (plus the final update), not once per step."""
    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.25)
    builds = []
    real = app.trace_panels
    monkeypatch.setattr(app, "trace_panels", lambda trace, **k: builds.append(time.perf_counter()) or real(trace, **k))
    t0 = time.perf_counter()
    ups = list(lab.generate(Session(), model=M.TINY, prompt="p", method=LM.SPECA, steps=40, width=64, height=64,
                            compare=False))
    elapsed = time.perf_counter() - t0
    assert ups[-1][-1].num_steps == 40
    assert len(builds) <= elapsed / 0.25 + 2
    gaps = [b - a for a, b in zip(builds, builds[1:-1])]
    assert all(g >= 0.25 * 0.9 for g in gaps)


@pytest.mark.parametrize("case", ["SpeCa schedule", "SpecDiff", "Full"])
def test_the_pipelines_thread_adds_each_record_to_the_traces_columns_at_most_once(fake_cuda, model, case,
                                                                                     monkeypatch):
    """Values read back after a step (step times, SpeCa's errors for the trace) refresh the trace, whose columns are
    then rebuilt from every record by the next reader. The runtime itself must not be that reader (it once was:
    `_trace_for` read `series()` every step, O(steps) of host work per step in the pipeline's thread, quadratic
    over a run: +7-10 % on the H100 for SpeCa's few-ms speculative steps). Here the (fake) device keeps up with
    the host: every step's reads are done by the next step's poll, which fills and refreshes, the worst case."""
    from accel import trace as T

    monkeypatch.setattr(FakeEvent, "query", lambda self: True)

    counted = {"n": 0}
    real = T._Index._add

    def add(self, i, r):
        if threading.current_thread().name == PIPE_THREAD:
            counted["n"] += 1
        return real(self, i, r)

    monkeypatch.setattr(T._Index, "_add", add)
    trace = _bare_run(model, _config(case), fake_cuda)
    assert len(trace.steps) == STEPS
    assert counted["n"] <= len(trace.steps)

# ---- what one request costs the server beside the pipeline: figures rebuilt, pictures encoded, stale updates ------
def test_streamed_updates_build_only_the_figures_that_changed(monkeypatch):
    """A streamed update builds a figure only when what it shows changed: Full verifies nothing and records no token
    maps, so its error and maps figures are built once while it streams (and again for the result), not at every
    update; its timeline at each update that has new steps."""
    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.0)
    built = []
    real = app.trace_panels
    monkeypatch.setattr(app, "trace_panels",
                        lambda trace, only=app.TRACE_PANELS, **k: built.append(tuple(only)) or real(trace, only, **k))
    step_end = R._Run._on_step_end

    def slow_step_end(self, *a):  # steps slower than an update: the consumer streams several (however fast the CPU)
        out = step_end(self, *a)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(R._Run, "_on_step_end", slow_step_end)
    ups = [dict(zip(app.OUTPUTS, u)) for u in lab.generate(Session(), model=M.TINY, prompt="p", method=LM.FULL,
                                                           steps=8, width=64, height=64, compare=False)]
    streamed, final = ups[:-1], ups[-1]
    assert len(streamed) >= 3
    for u in streamed[1:]:  # after the first update: never rebuilt (the timeline only when new steps came)
        assert u["error_plot"] == gr.skip() and u["maps_plot"] == gr.skip()
        assert u["image"] == gr.skip() and u["full_image"] == gr.skip()
    # the first update clears the last run's pictures (a finished run's image beside a live preview misleads)
    assert streamed[0]["image"] is None and streamed[0]["full_image"] is None
    assert final["image"] is not None
    assert sum("error_plot" in b for b in built) == 2 and sum("maps_plot" in b for b in built) == 2
    timelines = sum(not isinstance(u["timeline_plot"], dict) for u in streamed)  # one per update with new steps
    assert sum("timeline_plot" in b for b in built) == timelines + 1 and timelines <= 8
    assert all(not isinstance(final[k], dict) for k in app.TRACE_PANELS)  # the result has every figure


def test_streamed_updates_cost_gradio_no_component_rebuilds(monkeypatch):
    """Gradio rebuilds an output's component (and its config's JSON schemas, ~2 ms) for every property update,
    `gr.skip()` included, on the event loop that shares the GIL with the pipeline's thread. Through `SteadyOutputs`
    (as `/generate` sends them), the updates streamed while a run goes on rebuild none: the run's first update
    sends every output, later ones re-send what they leave as it is. Counted through Gradio's own
    `postprocess_data`, against the same updates without it."""
    import asyncio
    import tempfile

    from gradio.state_holder import SessionState

    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.0)
    demo = app.build_app(lab)
    fn = next(f for f in demo.fns.values() if f.api_name == "generate")
    rebuilt = []
    real = SessionState._update_config
    monkeypatch.setattr(SessionState, "_update_config", lambda self, i: rebuilt.append(i) or real(self, i))
    step_end = R._Run._on_step_end

    def slow_step_end(self, *a):  # steps slower than an update: several streamed updates on any CPU
        out = step_end(self, *a)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(R._Run, "_on_step_end", slow_step_end)
    counts = {}
    for steady in (False, True):
        pictures, keep, state, n = app.PictureFiles(tempfile.mkdtemp()), app.SteadyOutputs(), SessionState(demo), []
        for values in lab.generate(Session(), model=M.TINY, prompt="p", method=LM.SPECA, steps=8, width=64,
                                   height=64, compare=False):
            values = pictures.update(values)
            if steady:
                values = keep.update(values)
            before = len(rebuilt)
            out = asyncio.run(demo.postprocess_data(fn, list(values), state))
            n.append(len(rebuilt) - before)
            assert len(out) == len(fn.outputs)
        counts[steady] = n
        if steady:
            assert keep.rebuilds == sum(n)
    streamed = counts[True][1:-1]
    assert len(streamed) >= 2 and all(k == 0 for k in streamed), counts
    assert all(k >= 6 for k in counts[False][1:-1]), counts  # skipped outputs, each rebuilt at every update
    assert counts[True][0] >= 2  # the first update: the step and frame sliders reset


def test_each_picture_is_encoded_once_per_request():
    """`/generate`'s pictures go out as files encoded once: in compare mode the method's image is sent when its run
    ends and again with the comparison, the last preview again with the result, each from one encode."""
    lab = app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe()), every_s=0.0, timing_pairs=1)
    import tempfile

    pictures = app.PictureFiles(tempfile.mkdtemp())
    raw, sent = [], []
    for values in lab.generate(Session(), model=M.TINY, prompt="p", method=LM.SPECA, steps=6, width=64, height=64,
                               compare=True):
        raw.append(dict(zip(app.OUTPUTS, values)))
        sent.append(dict(zip(app.OUTPUTS, pictures.update(values))))
    distinct = {id(u[k]) for u in raw for k in app.PICTURE_FORMATS if isinstance(u[k], Image.Image)}
    carried = sum(isinstance(u[k], Image.Image) for u in raw for k in app.PICTURE_FORMATS)
    assert carried > len(distinct) and pictures.encodes == len(distinct)
    images = [u["image"] for u in sent if isinstance(u["image"], str)]
    assert len(images) == 2 and images[0] == images[1] and images[0].endswith(".webp")
    assert sent[-1]["full_image"].endswith(".webp") and sent[-1]["preview"].endswith(".jpeg")
    assert Image.open(images[0]).size == raw[-1]["image"].size


def test_a_run_that_ended_meanwhile_goes_straight_to_its_result(model):
    """A consumer slower than the run (a figure, a send) gets the run's newest state in one update, not one update
    per queued event: a run that ended while the consumer was away yields its result next, with no stale update
    before the image. The first update carries its step's preview."""
    ups = []
    for up in R.stream_run(model, _spec(), LM.by_label(LM.FULL).build({}), every_s=0.0):
        ups.append(up)
        if len(ups) == 1:
            time.sleep(1.0)  # the 10 steps of the tiny pipe end meanwhile
    assert len(ups) == 2 and ups[1].done and ups[0].preview is not None


def test_the_served_lab_switches_threads_within_a_millisecond():
    """build_app lowers the interpreter's switch interval (app.SWITCH_INTERVAL_S, scripts/lab/gil_contention.py):
    the pipeline's thread gets the GIL back within 1 ms while the lab's other threads run Python."""
    import sys

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        app.build_app(app.Lab(M.ModelManager(factory=lambda preset: tiny.tiny_flux_pipe())))
        assert sys.getswitchinterval() == pytest.approx(app.SWITCH_INTERVAL_S) and app.SWITCH_INTERVAL_S <= 0.001
    finally:
        sys.setswitchinterval(before)

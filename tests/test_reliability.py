"""The public Space's reliability (issue 14): limits on uploads, text and work; one run at a time per model with
a visible line; Stop bound to the session; clients see our messages only; session data that does not outlive
the session. Unit tests on the lab, then a few through the real server with gradio_client."""

import json
import logging
import os
import re
import socket
import threading
import time

import gradio as gr
import pytest
from PIL import Image

import app
import tiny
import tiny_video
from accel.trace import StepRecord, Trace
from lab import methods as LM
from lab import models as M
from lab.limits import Limits
from lab.session import RunFiles, Session
from lab.traces import TraceError, read_trace


def _factory(preset):
    return tiny_video.tiny_video_pipe() if preset.is_video else tiny.tiny_flux_pipe()


def make_lab(**limits):
    return app.Lab(M.ModelManager(factory=_factory), every_s=0.05, limits=Limits(**limits))


@pytest.fixture(scope="module")
def lab():
    return make_lab()


def kw(**over):
    d = dict(model=M.TINY, prompt=app.EXAMPLES[0], seed=0, steps=4, width=64, height=64, guidance=1.0,
             method=LM.SPECA, compare=False)
    d.update(over)
    return d


def _error(lab, **over) -> str:
    with pytest.raises(gr.Error) as e:
        list(lab.generate(Session(), **kw(**over)))
    return e.value.message


def _trace(n=4, blocks_total=5, **over) -> dict:
    t = Trace("speca", {"threshold": 1.0}, "FluxTransformer2DModel", n, [2, 2],
              steps=[StepRecord(i, n, blocks_total=blocks_total, blocks_computed=blocks_total,
                                maps={"error": [[0.1, 0.2], [0.3, 0.4]]}) for i in range(n)])
    d = t.to_dict()
    d.update(over)
    return d


def _write(tmp_path, data, name="t.json") -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


# ---- 3. numbers and text ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["seed", "steps", "width", "height", "guidance"])
def test_nan_and_inf_are_refused_naming_the_field(lab, field):
    for bad in (float("nan"), float("inf")):
        msg = _error(lab, **{field: bad})
        assert msg.startswith(f"{field} must be a finite number"), msg


def test_nan_target_speedup_and_sweep_range_refused(lab):
    assert _error(lab, target_speedup=float("nan")).startswith("target speedup must be a finite number")
    with pytest.raises(gr.Error, match="sweep from must be a finite number"):
        list(lab.sweep(None, float("nan"), None, 3, **kw()))
    with pytest.raises(gr.Error, match="sweep points=9 is out of range"):
        list(lab.sweep(None, None, None, 9, **kw()))


def test_nan_frames_refused(lab):
    msg = _error(lab, model=M.TINY_VIDEO, frames=float("nan"))
    assert msg.startswith("frames must be a finite number")


def test_long_text_is_refused_not_echoed(lab):
    huge = "x" * 50_000_000
    for field in ("prompt", "method", "model"):
        msg = _error(lab, **{field: huge})
        assert "characters long" in msg and field in msg and len(msg) < 200, msg[:300]
    msg = _error(lab, prompt="a red circle " * 400)  # 5200 characters
    assert "prompt is 5200 characters long: at most 4000" in msg
    assert len(_error(lab, method="M" * 150)) < 200  # an unknown method is quoted shortened


# ---- 4. work per request -----------------------------------------------------------------------------------------
def test_work_budget_counts_compare_double():
    lab = make_lab(max_work=64 * 64 * 4 / 1e6)  # exactly one 64x64 run of 4 steps
    list(lab.generate(Session(), **kw(compare=False)))  # fits
    msg = _error(lab, compare=True)
    assert "too large for this server: 4 steps x 64x64 px x 2 (compare also runs the full run)" in msg
    assert "or untick compare" in msg
    assert "x 2" not in _error(lab, steps=5, compare=False)


def test_work_budget_is_configurable(monkeypatch):
    assert Limits.from_env({"SPECLAB_MAX_WORK": "12.5"}).max_work == 12.5
    assert Limits.from_env({"SPECLAB_RUN_FILES": "3"}).run_files == 3
    with pytest.raises(ValueError, match="SPECLAB_MAX_WORK"):
        Limits.from_env({"SPECLAB_MAX_WORK": "lots"})
    seen = {}
    monkeypatch.setattr(app, "build_app", lambda lab: seen.setdefault("lab", lab) and _FakeDemo(seen))
    app.main(["--max-work", "7", "--max-upload-mb", "3", "--trace-ttl", "60"])
    limits = seen["lab"].limits
    assert (limits.max_work, limits.max_upload_mb, limits.trace_ttl_s) == (7, 3, 60)
    assert seen["launch"]["max_file_size"] == 3_000_000 and seen["launch"]["show_error"] is False


class _FakeDemo:
    def __init__(self, seen):
        self.seen = seen

    def queue(self, **k):
        pass

    def launch(self, **k):
        self.seen["launch"] = k


# ---- 1. uploaded traces ------------------------------------------------------------------------------------------
def test_trace_upload_limits(tmp_path):
    limits = Limits(max_upload_mb=0.01, max_trace_records=10, max_map_cells=16)
    assert read_trace(_write(tmp_path, _trace()), limits).summary()["steps"] == 4
    with pytest.raises(TraceError, match=r"big.json is 0.02 MB: traces up to 0.01 MB are read"):
        read_trace(_write(tmp_path, " " * 20_000 + "{}", "big.json"), limits)
    with pytest.raises(TraceError, match="more than 10 step records"):
        read_trace(_write(tmp_path, _trace(n=11)), limits)
    big_map = _trace()
    big_map["steps"][0]["maps"]["error"] = [[0.0] * 5] * 5
    with pytest.raises(TraceError, match=r"steps\[0\].maps.error has 25 cells; at most 16"):
        read_trace(_write(tmp_path, big_map), limits)


@pytest.mark.parametrize("data, needle", [
    (_trace(steps=["x"]), r"steps\[0\] must be an object"),
    (_trace(steps={"a": 1}), "steps must be a list of step records"),
    ({"hello": 1}, "expected a JSON object with 'method' and 'steps'"),
    (_trace(method="![x](http://example.invalid/p.png)"), "method must be short plain text"),
    (_trace(method="<b>x</b>"), "method must be short plain text"),
    (_trace(token_grid=[2, 2, 2, 2]), "token_grid"),
    ("[1, 2", "could not read t.json: not a readable JSON file"),
    ("[" * 100_000 + "]" * 100_000, "could not read t.json: not a readable JSON file"),
])
def test_bad_traces_get_our_message(lab, tmp_path, data, needle):
    with pytest.raises(gr.Error, match=needle) as e:
        lab.load_trace(_write(tmp_path, data))
    assert "object has no attribute" not in e.value.message and str(tmp_path) not in e.value.message


def test_bad_step_fields(tmp_path):
    for field, value, needle in (("blocks_total", "5", "blocks_total must be an integer"),
                                 ("error", float("nan"), "error must be a finite number"),
                                 ("decision", "maybe", "decision must be one of"),
                                 ("step", -1, "must not be negative")):
        d = _trace()
        d["steps"][1][field] = value
        with pytest.raises(TraceError, match=needle):
            read_trace(_write(tmp_path, d))


def test_trace_without_blocks_loads(lab, tmp_path):
    """A trace whose steps count no blocks used to fail with 'float division by zero' (visualizers' timeline)."""
    summary, err, timeline, *_ = lab.load_trace(_write(tmp_path, _trace(blocks_total=0)))
    assert "step 4/4" in summary and len(timeline.data) > 0


def test_missing_or_relative_path_is_not_echoed_resolved(lab):
    for path in ("../../etc/passwd.json", "nowhere/t.json", "/definitely/not/here.json"):
        with pytest.raises(gr.Error) as e:
            lab.load_trace(path)
        msg = e.value.message
        assert msg == f"could not read {os.path.basename(path)}: not a readable JSON file", msg
    with pytest.raises(gr.Error, match="choose a trace JSON file"):
        lab.load_trace({"path": 3})


def test_loaded_trace_markdown_is_escaped(lab, tmp_path):
    d = _trace(model="Flux*Model_x", config={"note": "<img src=x onerror=alert(1)> `code` ![i](u) [a]|b"})
    summary = lab.load_trace(_write(tmp_path, d, "a_b*.json"))[0]
    assert "Flux\\*Model\\_x" in summary and "<img" not in summary and "&lt;img" in summary
    assert "\\[a\\]\\|b" in summary
    assert "\\`code\\`" in summary and "\\!\\[i\\]" in summary and "a\\_b\\*.json" in summary


def test_session_state_expires_and_gradio_cache_is_cleaned(lab):
    lab = make_lab(trace_ttl_s=120)
    demo = app.build_app(lab)
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    ttls = sorted(s.time_to_live for s in states)
    assert ttls[0] == 120 and demo.delete_cache == (120, 120)
    assert any(isinstance(s.value, Session) for s in states)


# ---- run files ---------------------------------------------------------------------------------------------------
def test_run_files_are_bounded_and_go_with_their_session(tmp_path):
    files = RunFiles(capacity=3)
    a, b = Session(), Session()
    dirs = [files.new(a) for _ in range(4)] + [files.new(b)]
    assert [os.path.isdir(d) for d in dirs] == [False, False, True, True, True]
    files.release(a)
    assert [os.path.isdir(d) for d in dirs] == [False, False, False, False, True] and len(files) == 1
    lab = make_lab(run_files=2)
    s = Session()
    out = list(lab.generate(s, **kw()))[-1]
    folder = os.path.dirname(out[9][0])
    assert os.path.basename(folder).startswith("speclab_") and os.path.isdir(folder)
    lab.end_session(s)  # what Gradio's delete_callback calls when the session's state goes
    assert not os.path.exists(folder)


# ---- 2. one run at a time per model, with a visible line; 6. Stop --------------------------------------------
@pytest.fixture
def slow(lab):
    pipe = lab.manager.get(M.TINY).pipe
    h = pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(0.03))
    yield
    h.remove()


def test_second_run_on_a_model_waits_its_turn_and_is_told_its_place(lab, slow):
    first = lab.generate(Session(), **kw(steps=40))
    next(first)  # running
    second = lab.generate(Session(), **kw(steps=3, seed=1))
    waiting = next(second)[2]
    assert "you are 2nd in line (1 run before yours)" in waiting and "In use by: SpeCa, 40 steps" in waiting
    t1 = list(first)[-1][-1]
    out = list(second)
    assert len(t1.steps) == 40 and len(out[-1][-1].steps) == 3
    assert lab.manager.get(M.TINY).line.idle()


def test_image_and_video_presets_do_not_wait_for_each_other(lab):
    image_model = lab.manager.get(M.TINY)
    with image_model.line.turn("held by the test"):
        out = list(lab.generate(Session(), **kw(model=M.TINY_VIDEO, frames=9, method=LM.SPECDIFF,
                                                 specdiff_warmup_steps=2)))
    assert len(out[-1][-1].steps) == 4 and not any("in line" in str(o[2]) for o in out)


def test_stop_takes_a_waiting_run_out_of_the_line(lab, slow):
    first = lab.generate(Session(), **kw(steps=30))
    next(first)
    mine = Session()
    second = lab.generate(mine, **kw(steps=3))
    assert "2nd in line" in next(second)[2]
    lab.stop(Session())  # another session's Stop: nothing happens to either
    assert "2nd in line" in next(second)[2]
    lab.stop(mine)
    rest = list(second)
    assert rest[-1][2] == "Stopped before it started: you left the line."
    assert len(lab.manager.get(M.TINY).line) == 1  # only the running one
    assert len(list(first)[-1][-1].steps) == 30  # the running one was not touched


def test_the_first_run_survives_a_second_call(lab, slow):
    """Two sessions at once on one pipeline: both runs complete (accel alone would fail one of them)."""
    results, errors = {}, []

    def run(name, steps):
        try:
            results[name] = list(lab.generate(Session(), **kw(steps=steps, seed=len(name))))[-1][-1]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", 12), ("bb", 5), ("ccc", 7))]
    for t in ts:
        t.start()
        time.sleep(0.05)
    for t in ts:
        t.join()
    assert not errors and [len(results[n].steps) for n in ("a", "bb", "ccc")] == [12, 5, 7]


# ---- 5. clients see our messages only ---------------------------------------------------------------------------
def test_unexpected_errors_are_logged_with_an_id(lab, monkeypatch, caplog):
    def boom(*a, **k):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(app.V, "error_figure", boom)
    with caplog.at_level(logging.ERROR, logger="speclab"):
        msg = _error(lab)
    m = re.fullmatch(r"internal error \(id ([0-9a-f]{8})\): the server's log has the details", msg)
    assert m, msg
    rec = next(r for r in caplog.records if m.group(1) in r.getMessage())
    assert rec.exc_info and rec.exc_info[0] is ZeroDivisionError
    assert lab.manager.get(M.TINY).line.idle()


def test_unloadable_model_message_has_no_raw_exception_text():
    msg = M.explain_load_error(M.PRESETS[M.DEV], AttributeError("'str' object has no attribute 'items'"))
    assert "AttributeError" in msg and "has no attribute" not in msg


def test_unsupported_pipeline_class_is_refused(tmp_path):
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    preset = M.Preset("sdxl", str(folder), "local")
    with pytest.raises(M.ModelError, match="cannot run a StableDiffusionXLPipeline; it runs FluxPipeline and "
                                           "HunyuanVideoPipeline"):
        M.load_preset(preset)
    assert M.pipeline_class(M.PRESETS[M.TINY_VIDEO]).__name__ == "HunyuanVideoPipeline"
    assert M.pipeline_class(M.PRESETS[M.TINY]).__name__ == "FluxPipeline"


# ---- through the real server ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    os.environ["GRADIO_HEARTBEAT_INTERVAL"] = "1"  # a closed client is noticed within a second or two
    demo = app.build_app(make_lab())
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=False,
                max_file_size=1_000_000)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()
    os.environ.pop("GRADIO_HEARTBEAT_INTERVAL", None)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    c = Client(server[1], verbose=False)
    yield c
    c.close()


def _api_error(client, api_name, **kwargs) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(api_name=api_name, **kwargs)
    return str(e.value)


def test_server_answers_with_our_messages(client, tmp_path):
    from gradio_client import handle_file

    assert "steps must be a whole number, got 2.5" in _api_error(client, "/generate", steps=2.5)
    msg = _api_error(client, "/generate", method="M" * 5_000_000)
    assert "method is 5000000 characters long" in msg and len(msg) < 300
    msg = _api_error(client, "/load_trace", file=handle_file(_write(tmp_path, _trace(steps=["x"]))))
    assert "steps[0] must be an object" in msg and "has no attribute" not in msg
    summary = client.predict(file=handle_file(_write(tmp_path, _trace(blocks_total=0))), api_name="/load_trace")[0]
    assert "step 4/4" in summary
    import httpx

    big = _write(tmp_path, " " * 1_100_000 + "{}", "big.json")  # over the server's 1 MB upload limit
    with open(big, "rb") as f:
        r = httpx.post(client.upload_url, files={"files": ("big.json", f)})
    assert r.status_code == 413, (r.status_code, r.text[:200])


def test_a_closed_session_is_forgotten_with_its_files(server, tmp_path):
    from gradio_client import Client, handle_file

    demo, url = server
    c = Client(url, verbose=False)
    before = set(demo.lab.files._dirs)
    c.predict(steps=3, width=64, height=64, compare=False, api_name="/generate")
    mine = set(demo.lab.files._dirs) - before
    assert len(mine) == 1 and all(os.path.isdir(d) for d in mine)
    c.predict(file=handle_file(_write(tmp_path, _trace())), api_name="/load_trace")
    assert c.session_hash in demo.state_holder.session_data
    c.close()
    end = time.time() + 30
    while c.session_hash in demo.state_holder.session_data and time.time() < end:
        time.sleep(0.2)
    assert c.session_hash not in demo.state_holder.session_data  # state, figures and inputs: gone
    time.sleep(0.5)
    assert not any(os.path.isdir(d) for d in mine), mine


def test_stop_has_no_client_supplied_session(server):
    info = server[0].get_api_info()["named_endpoints"]
    assert info["/stop"]["parameters"] == []


def test_api_uses_the_chosen_models_defaults(server, client):
    """Issue 12: a call with only `model` and `prompt` runs at that model's size, steps and frames; the size
    controls' API defaults are None (not the tiny FLUX's 128), and sliders do not cap another model's size."""
    params = {p["parameter_name"]: p for p in server[0].get_api_info()["named_endpoints"]["/generate"]["parameters"]}
    for name in app.SIZE_CONTROLS:
        assert params[name]["parameter_has_default"] and params[name]["parameter_default"] is None, name
    video = M.PRESETS[M.TINY_VIDEO]
    out = client.predict(model=M.TINY_VIDEO, prompt=app.VIDEO_EXAMPLES[0], compare=False, api_name="/generate")
    summary = out[2]
    assert f"step {video.steps}/{video.steps}" in summary and "tiny HunyuanVideo" in summary
    # FLUX.1-dev's own size (here a random pipe stands in for it): its 1024 is not capped at tiny FLUX's 512
    spec = server[0].lab.parse(dict(model=M.DEV, prompt="a cat", method=LM.SPECA, width=1024, height=1024))[0]
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (1024, 1024, 28, 3.5)


def test_long_prompt_is_refused_with_a_message(client):
    msg = _api_error(client, "/generate", prompt="a red circle " * 400)
    assert "prompt is 5200 characters long: at most 4000 are accepted" in msg


def test_sweep_endpoint_returns_the_curve(client):
    plot, table, pick = client.predict(method=LM.SPECDIFF, steps=4, width=64, height=64, sweep_count=3,
                                       api_name="/sweep")
    assert table.count("| cache rate") == 3 and "PSNR" in table
    assert "measured speedup (time)" in json.dumps(plot) and "ideal speedup (compute)" in json.dumps(plot)
    assert len(pick["choices"]) == 3
    msg = _api_error(client, "/sweep", method=LM.FULL, steps=4, width=64, height=64)
    assert "Full has no speed knob" in msg

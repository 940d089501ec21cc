"""visualizers: figures from synthetic traces have the expected traces, points and colours."""

import json

import numpy as np
import plotly.graph_objects as go
import pytest

import visualizers as V
from accel.trace import ACCEPTED, FULL, PARTIAL, REJECTED, StepRecord, Trace

N = 10
GRID = [4, 6]


def _speca_trace(n_done=N) -> Trace:
    """Steps 0-2 full (warm-up), then accepted/rejected speculative steps with errors and error maps."""
    t = Trace(method="speca", config={"threshold": 0.5}, model="Synthetic", num_steps=N, token_grid=GRID)
    pattern = [FULL, FULL, FULL, ACCEPTED, ACCEPTED, REJECTED, ACCEPTED, FULL, ACCEPTED, REJECTED]
    for i in range(n_done):
        d = pattern[i]
        err = None if d == FULL else (0.8 if d == REJECTED else 0.1 * i)
        blocks = 5.0 if d in (FULL, REJECTED) else 1.0
        r = StepRecord(step=i, num_steps=N, timestep=1000.0 * (1 - i / N), decision=d, reason="r%d" % i,
                       error=err, threshold=0.5 * 0.3 ** (i / N), time_ms=10.0 if blocks == 5 else 3.0,
                       blocks_computed=blocks, blocks_total=5)
        if err is not None:
            r.set_map("error", np.arange(24).reshape(GRID) * (i + 1) / 100)
        t.append(r)
    return t


def _specdiff_trace() -> Trace:
    t = Trace(method="specdiff", config={}, model="Synthetic", num_steps=6, token_grid=GRID)
    t.overhead.append(StepRecord(step=0, num_steps=6, decision=FULL, reason="prerun", time_ms=10.0,
                                 blocks_computed=5.0, blocks_total=5))
    levels = (np.arange(24) % 3 + 1).reshape(GRID)
    for i in range(6):
        d = FULL if i < 2 else PARTIAL
        r = StepRecord(step=i, num_steps=6, decision=d, time_ms=10.0 if d == FULL else 4.0,
                       blocks_computed=5.0 if d == FULL else 2.0, blocks_total=5,
                       tokens_computed=24 if d == FULL else 8, tokens_total=24)
        if d == PARTIAL:
            r.set_map("importance", np.linspace(0, 1, 24).reshape(GRID))
            r.set_map("level", levels)
        t.append(r)
    return t


def _by_name(fig):
    return {d.name: d for d in fig.data}


def test_error_figure_markers_threshold_and_colours():
    t = _speca_trace()
    fig = V.error_figure(t)
    assert isinstance(fig, go.Figure)
    d = _by_name(fig)
    assert set(d) == {"threshold", FULL, ACCEPTED, REJECTED}
    assert list(d["threshold"].x) == list(range(N))
    assert d["threshold"].y[0] == pytest.approx(0.5) and d["threshold"].y[-1] == pytest.approx(0.5 * 0.3 ** 0.9)
    assert list(d[FULL].x) == [0, 1, 2, 7] and list(d[FULL].y) == [0, 0, 0, 0]  # no verification: at 0
    assert list(d[ACCEPTED].x) == [3, 4, 6, 8]
    assert list(d[ACCEPTED].y) == pytest.approx([0.3, 0.4, 0.6, 0.8])
    assert list(d[REJECTED].x) == [5, 9] and list(d[REJECTED].y) == [0.8, 0.8]
    for dec in (FULL, ACCEPTED, REJECTED):
        assert d[dec].marker.color == V.DECISION_COLORS[dec]
        assert d[dec].mode == "markers"
    assert V.DECISION_COLORS[ACCEPTED] != V.DECISION_COLORS[REJECTED] != V.DECISION_COLORS[FULL]
    # hover: step, timestep, error, time, reason
    cd = d[REJECTED].customdata[0]
    assert cd[0] == 5 and cd[1] == "500.0" and cd[2] == "0.8" and cd[3] == 10.0 and cd[4] == "r5"
    for key in ("step", "timestep", "error", "time"):
        assert key in d[REJECTED].hovertemplate
    assert list(fig.layout.xaxis.range) == [-0.5, N - 0.5]
    json.loads(fig.to_json())


def test_error_figure_partial_trace_keeps_the_full_x_range_and_accepts_dicts():
    t = _speca_trace(n_done=4)
    fig = V.error_figure(t.to_dict())
    assert list(fig.layout.xaxis.range) == [-0.5, N - 0.5]
    assert sum(len(d.x) for d in fig.data if d.name != "threshold") == 4


def test_error_figure_of_a_method_without_verification_says_so():
    t = Trace(method="full", config={}, num_steps=3,
              steps=[StepRecord(step=i, num_steps=3, blocks_computed=5, blocks_total=5) for i in range(3)])
    fig = V.error_figure(t)
    assert [d.name for d in fig.data] == [FULL]
    assert any("verifies nothing" in a.text for a in fig.layout.annotations)


def test_timeline_bars_cumulative_compute_and_speedups():
    t = _speca_trace()
    fig = V.timeline_figure(t)
    d = _by_name(fig)
    for dec in (FULL, ACCEPTED, REJECTED):
        assert d[dec].type == "bar" and d[dec].marker.color == V.DECISION_COLORS[dec]
        assert d[dec].width == 0.8  # one step wide, however sparse the decision's steps are
    assert list(d[ACCEPTED].y) == [0.2] * 4 and list(d[FULL].y) == [1.0] * 4
    s = t.summary()
    assert d["this run (so far)"].y[-1] == pytest.approx(s["blocks_computed"] / 5)
    assert d["plain run (so far)"].y[-1] == pytest.approx(N)
    assert d["ideal speedup"].y[-1] == pytest.approx(s["ideal_speedup"], rel=1e-3)
    # measured (estimated): a plain step costs the median full-step time (10 ms)
    est = d["measured speedup (est.)"].y
    assert est[-1] == pytest.approx(10.0 * N / s["measured_ms"])
    # with a reference full run, measured speedup = its time / this run's time
    ref = Trace(method="full", config={}, num_steps=N,
                steps=[StepRecord(step=i, num_steps=N, time_ms=12.0, blocks_computed=5, blocks_total=5)
                       for i in range(N)])
    d2 = _by_name(V.timeline_figure(t, reference=ref))
    assert d2["measured speedup"].y[-1] == pytest.approx(12.0 * N / s["measured_ms"])
    json.loads(fig.to_json())


def test_timeline_shows_prerun_overhead_in_the_speedup():
    t = _specdiff_trace()
    d = _by_name(V.timeline_figure(t))
    assert list(d["pre-run"].x) == [-1] and d["pre-run"].marker.color == V.OVERHEAD_COLOR
    assert list(d[PARTIAL].y) == [0.4] * 4
    assert d["ideal speedup"].y[-1] == pytest.approx(t.summary()["ideal_speedup"], rel=1e-3)
    assert d["this run (so far)"].y[0] == pytest.approx(2.0)  # pre-run + step 0


def test_token_maps_specdiff_importance_and_levels():
    t = _specdiff_trace()
    fig = V.token_maps_figure(t, step=3)
    assert [d.type for d in fig.data] == ["heatmap", "heatmap"]
    imp, lev = fig.data
    assert np.asarray(imp.z).shape == tuple(GRID) and np.asarray(lev.z).shape == tuple(GRID)
    assert np.asarray(lev.z)[0, 0] == 1 and lev.text[0][1] == "C2 reused"
    colours = {c for _, c in lev.colorscale}
    assert colours == set(V.LEVEL_COLORS.values())
    assert "step 3" in fig.layout.title.text and "8/24 tokens" in fig.layout.title.subtitle.text
    # a step without maps says so; the default is the last step with maps
    assert any("no token maps" in a.text for a in V.token_maps_figure(t, step=0).layout.annotations)
    assert "step 5" in V.token_maps_figure(t).layout.title.text
    assert V.map_steps(t) == [2, 3, 4, 5]


def test_token_maps_speca_error_map_and_no_maps():
    t = _speca_trace()
    fig = V.token_maps_figure(t, step=5)
    assert len(fig.data) == 1 and fig.data[0].name == "error"
    assert np.asarray(fig.data[0].z)[1, 2] == pytest.approx(8 * 6 / 100)
    empty = V.token_maps_figure(Trace(method="full", config={}, steps=[StepRecord(step=0, num_steps=1)]))
    assert len(empty.data) == 0 and "no token maps" in empty.layout.annotations[0].text


def test_difference_figure():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[2, 3] = [30, 60, 90]
    fig = V.difference_figure(a, b)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (8, 8) and z[2, 3] == pytest.approx(60) and z.sum() == pytest.approx(60)
    assert "max 60" in fig.layout.title.text
    assert "differ in size" in V.difference_figure(a, np.zeros((4, 4, 3))).layout.annotations[0].text


def test_a_large_difference_map_is_drawn_as_block_means_with_the_full_size_numbers():
    """1024² (and a video's strip) would be ~3.4-11 MB of JSON per update: at most DIFF_MAX_CELLS cells, each the mean
    of its k x k block, the title's mean and max from every pixel."""
    g = np.random.default_rng(0)
    a = g.integers(0, 256, (1024, 1000, 3)).astype(np.uint8)
    b = a.copy()
    b[5, 7] = 255 - b[5, 7]
    d = np.abs(a.astype(float) - b.astype(float)).mean(axis=2)
    fig = V.difference_figure(a, b)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (256, 250) and z.size <= V.figures.DIFF_MAX_CELLS and z.dtype == np.float32
    assert z[2, 3] == pytest.approx(d[8:12, 12:16].mean(), rel=1e-6)
    assert z.astype(float).sum() * 16 == pytest.approx(d.sum(), rel=1e-6)
    assert f"max {d.max():.0f}, 4x4 block means" in fig.layout.title.text
    assert len(fig.to_json()) < 600_000  # the JSON an update carries
    odd = V.difference_figure(a[:1023], b[:1023], max_cells=1000)  # partial blocks at the edges: still a map
    assert np.asarray(odd.data[0].z).size <= 1000


VGRID = [3, 4, 6]  # [frames, h, w], as accel records HunyuanVideo token maps


def _video_specdiff_trace() -> Trace:
    """SpecDiff on a video: maps are [frames][h][w]; frame f of the importance map holds the value f + 0.5."""
    t = Trace(method="specdiff", config={}, model="SyntheticVideo", num_steps=4, token_grid=VGRID)
    levels = (np.arange(72) % 3 + 1).reshape(VGRID)
    imp = np.broadcast_to(np.arange(3)[:, None, None] + 0.5, VGRID)
    for i in range(4):
        d = FULL if i < 2 else PARTIAL
        r = StepRecord(step=i, num_steps=4, decision=d, time_ms=1.0, blocks_computed=5.0 if d == FULL else 2.0,
                       blocks_total=5, tokens_computed=72 if d == FULL else 20, tokens_total=72)
        if d == PARTIAL:
            r.set_map("importance", imp)
            r.set_map("level", levels)
        t.append(r)
    return t


def test_token_maps_of_a_video_show_one_frame_at_a_time():
    t = _video_specdiff_trace()
    assert V.map_frames(t) == 3 and V.map_frames(_specdiff_trace()) == 0
    for f in range(3):
        fig = V.token_maps_figure(t, step=3, frame=f)
        imp, lev = fig.data
        assert np.asarray(imp.z).shape == (4, 6) and np.asarray(lev.z).shape == (4, 6)
        assert np.all(np.asarray(imp.z) == f + 0.5)
        assert np.array_equal(np.asarray(lev.z), (np.arange(72) % 3 + 1).reshape(VGRID)[f])
        assert f"step 3, frame {f} (0–2)" in fig.layout.title.text
    # default: the middle frame; out-of-range frames are clamped
    assert np.all(np.asarray(V.token_maps_figure(t).data[0].z) == 1.5)
    assert "frame 1 (0–2)" in V.token_maps_figure(t).layout.title.text
    assert np.all(np.asarray(V.token_maps_figure(t, frame=99).data[0].z) == 2.5)
    assert np.all(np.asarray(V.token_maps_figure(t, frame=-4).data[0].z) == 0.5)
    # a JSON round trip (as exported by the lab) keeps the frames
    back = Trace.from_dict(json.loads(json.dumps(t.to_dict())))
    assert V.map_frames(back) == 3
    assert np.all(np.asarray(V.token_maps_figure(back, step=2, frame=2).data[0].z) == 2.5)
    # image traces ignore the frame argument and do not name a frame
    img = V.token_maps_figure(_specdiff_trace(), step=3, frame=2)
    assert "frame" not in img.layout.title.text and np.asarray(img.data[0].z).shape == tuple(GRID)


def test_map_frames_without_a_grid_reads_the_maps():
    t = _video_specdiff_trace()
    t.token_grid = None
    assert V.map_frames(t) == 3


def test_every_figure_is_valid_plotly_with_its_template():
    """The figures skip plotly's per-property validation for speed (`visualizers.figures._figure`): validate
    every kind here, so a wrong property or value still fails."""
    t, sd, video = _speca_trace(), _specdiff_trace(), _video_specdiff_trace()
    figs = [
        V.error_figure(t), V.error_figure(Trace(method="full", config={})), V.timeline_figure(t),
        V.timeline_figure(sd, reference=t), V.timeline_figure(Trace(method="full", config={})),
        V.token_maps_figure(sd, step=3), V.token_maps_figure(t, step=5), V.token_maps_figure(video, frame=1),
        V.token_maps_figure(sd, step=0), V.empty_figure("nothing yet", "title"),
        V.difference_figure(np.zeros((4, 4, 3)), np.ones((4, 4, 3))),
    ]
    for fig in figs:
        checked = go.Figure(fig.to_dict())  # raises on an unknown property or a bad value
        # plotly_white, resolved for plotly.js, with a transparent paper: the page's (light or dark) block shows
        assert checked.layout.template.layout.xaxis.gridcolor == "#EBF0F8"
        assert checked.layout.template.layout.paper_bgcolor == checked.layout.template.layout.plot_bgcolor == \
            "rgba(0,0,0,0)"
        json.loads(fig.to_json())

"""Trace -> Plotly figures. Pure functions: they read a `accel.Trace` (finished or still growing) and return a
`plotly.graph_objects.Figure`; nothing here imports Gradio or touches a model.

Cheap enough to redraw at every update of a streamed run: they read the trace's precomputed columns
(`Trace.series`, `overhead_series`, `step_totals`, `summary`) with numpy, never loop over its records, and
a token-map figure reads the one record it draws. So an update at step 50 costs what one at step 1 does.
"""

from __future__ import annotations

import copy
import functools
import math
import textwrap

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import get_colorscale
from plotly.subplots import make_subplots

from accel.trace import ACCEPTED, DECISIONS, FULL, PARTIAL, REJECTED, Series, Trace

DECISION_COLORS = {
    FULL: "#4C78A8",  # blue: every block computed
    ACCEPTED: "#54A24B",  # green: speculative / cached step kept
    REJECTED: "#E45756",  # red: speculative step failed verification
    PARTIAL: "#F58518",  # orange: SpecDiff, only some tokens computed
}
OVERHEAD_COLOR = "#B279A2"  # purple: pre-run calls (SpecDiff's speculative iteration)
THRESHOLD_COLOR = "#8c8c8c"  # mid grey: readable on a light and on a dark page
LEVEL_COLORS = {1: "#4C78A8", 2: "#BAB0AC", 3: "#F58518"}  # C1 computed, C2 reused, C3 history blend
LEVEL_NAMES = {1: "C1 computed", 2: "C2 reused", 3: "C3 history"}
MAP_TITLES = {"importance": "importance", "level": "cache level", "error": "forecast error per token"}
HEIGHT = 340
TEMPLATE = "plotly_white"
"""The figures' template, with transparent paper and plot area: the page's block shows through, light or dark
(assets/plotly_theme.js turns the text and grid light on a dark page)."""
TRANSPARENT = "rgba(0,0,0,0)"
_MARGIN = dict(l=50, r=20, t=50, b=40)


# ---- building figures ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _template_json() -> dict:
    t = pio.templates[TEMPLATE].to_plotly_json()
    t["layout"].update(paper_bgcolor=TRANSPARENT, plot_bgcolor=TRANSPARENT)
    return t


def _figure(data: list[dict], layout: dict) -> go.Figure:
    """A Figure from the plain dicts this module builds, without plotly's per-property validation.

    Why: validating a figure (and deep-copying the registered template into it) costs more than everything
    else in a streamed update together; the dicts come from this module only, and tests/test_visualizers.py
    validates every kind of figure (`go.Figure(fig.to_dict())`). `_validate=False` is the flag plotly itself
    uses to apply its templates; a plotly without it gets the same figure, validated."""
    spec = {"data": data, "layout": {"template": copy.deepcopy(_template_json()), **layout}}
    try:
        return go.Figure(spec, _validate=False)
    except TypeError:
        return go.Figure(spec)


def _axes_layout(fig: go.Figure, cells) -> tuple[dict, tuple]:
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)
    ids = []
    for row, col, secondary in cells:
        sp = fig.get_subplot(row, col, secondary_y=secondary)
        ids.append((sp.xaxis.plotly_name, sp.yaxis.plotly_name))
    return layout, tuple(ids)


@functools.lru_cache(maxsize=None)
def _timeline_axes() -> tuple[dict, tuple]:
    """The timeline's axes as `make_subplots` lays them out (computed once; callers copy the layout) and the
    (x, y) axis names of: the bars, the cumulative compute, the speedups (secondary y)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.45, 0.55],
                        specs=[[{}], [{"secondary_y": True}]])
    return _axes_layout(fig, ((1, 1, False), (2, 1, False), (2, 1, True)))


@functools.lru_cache(maxsize=None)
def _maps_axes(n: int) -> tuple[dict, tuple]:
    """`n` token maps side by side, with a title annotation each (computed once per `n`)."""
    fig = make_subplots(rows=1, cols=n, subplot_titles=["-"] * n, horizontal_spacing=0.22 if n > 1 else 0.2)
    return _axes_layout(fig, [(1, c, False) for c in range(1, n + 1)])


def _ref(axis: str) -> str:
    """Layout axis name -> a trace's axis reference: "xaxis2" -> "x2"."""
    return axis.replace("axis", "")


def _on(axes: tuple[str, str]) -> dict:
    return {"xaxis": _ref(axes[0]), "yaxis": _ref(axes[1])}


@functools.lru_cache(maxsize=None)
def _colorscale(name: str) -> tuple:
    """A named colorscale as explicit stops (plotly.js knows fewer names than plotly does, e.g. no Inferno)."""
    return tuple(tuple(stop) for stop in get_colorscale(name))


def _as_trace(trace) -> Trace:
    return Trace.from_dict(trace) if isinstance(trace, dict) else trace


def _x_range(trace: Trace) -> list[float]:
    ran = trace.step_totals().step
    n = max(trace.num_steps, int(ran[-1]) + 1 if len(ran) else 0, 1)
    return [-0.5, n - 0.5]


def _fmt_column(values: np.ndarray, spec: str = "%.4g") -> np.ndarray:
    """A float column as strings ("-" where NaN, i.e. None in the record), for hover text."""
    out = np.char.mod(spec, values).astype(object)
    out[np.isnan(values)] = "-"
    return out


def _or_dash(reason: np.ndarray) -> np.ndarray:
    return np.where((reason == "") | (reason == None), "-", reason)  # noqa: E711 (elementwise)


def _customdata(*columns) -> list:
    """Columns side by side, one row per point (what `customdata[i]` reads in a hovertemplate), as lists:
    plotly writes short and non-numeric arrays to JSON faster as lists (so do the figures' x/y, from the
    series' arrays); the token maps stay arrays (plotly sends those as typed arrays)."""
    out = np.empty((len(columns[0]), len(columns)), dtype=object)
    for i, c in enumerate(columns):
        out[:, i] = c
    return out.tolist()


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying a centred message (e.g. before a run, or a method without token maps)."""
    message = "<br>".join(textwrap.wrap(message, 56)) or message  # a long message wraps instead of being clipped
    layout = dict(
        annotations=[dict(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                          font=dict(size=14), opacity=0.7)],  # the page's text colour, dimmed
        height=HEIGHT, margin=dict(_MARGIN), xaxis=dict(visible=False), yaxis=dict(visible=False),
    )
    if title:
        layout["title"] = dict(text=title)
    return _figure([], layout)


def error_figure(trace, context: str | None = None) -> go.Figure:
    """Per-step verification error against the threshold curve.

    One marker trace per decision (named after it, coloured with `DECISION_COLORS`); steps that verified
    nothing (full steps, unverified methods) sit at y=0 as open squares. Hover: step, timestep, error, time,
    reason. A dashed "threshold" line where the method has one."""
    trace = _as_trace(trace)
    s = trace.series(context)
    data = []
    has_thr = ~np.isnan(s.threshold)
    if has_thr.any():
        data.append(dict(
            type="scatter", x=s.step[has_thr].tolist(), y=s.threshold[has_thr].tolist(), mode="lines", name="threshold",
            line=dict(color=THRESHOLD_COLOR, dash="dash", width=2), hovertemplate="threshold %{y:.4g}<extra></extra>",
        ))
    for code, decision in enumerate(DECISIONS):
        sel = s.decision == code
        if not sel.any():
            continue
        err = s.error[sel]
        verified = ~np.isnan(err)
        data.append(dict(
            type="scatter", x=s.step[sel].tolist(), y=np.where(verified, err, 0.0).tolist(), mode="markers", name=decision,
            marker=dict(color=DECISION_COLORS[decision], size=9, symbol=np.where(verified, "circle", "square-open").tolist(),
                        line=dict(width=1, color="white")),
            customdata=_customdata(s.step[sel], _fmt_column(s.timestep[sel], "%.1f"), _fmt_column(err),
                                   np.round(s.time_ms[sel], 2), _or_dash(s.reason[sel])),
            hovertemplate=("step %{customdata[0]}<br>timestep %{customdata[1]}<br>error %{customdata[2]}"
                           "<br>time %{customdata[3]} ms<br>reason %{customdata[4]}<extra>" + decision + "</extra>"),
        ))
    what = "first-block residual change" if trace.method == "fbcache" else "verification error"
    layout = dict(  # the method in a subtitle: a long name would clip the title on a narrow panel
        title=dict(text=f"{what} vs threshold", subtitle=dict(text=trace.method, font=dict(size=12))),
        height=HEIGHT, margin=dict(_MARGIN, t=70),
        xaxis=dict(title=dict(text="step"), range=_x_range(trace)),
        yaxis=dict(title=dict(text="residual change" if trace.method == "fbcache" else "error"), rangemode="tozero"),
        legend=dict(orientation="h", y=-0.2, font=dict(size=10)), hovermode="closest",
    )
    if len(s) and np.isnan(s.error).all():
        layout["annotations"] = [dict(text="this method verifies nothing: markers show the decisions only", x=0.5,
                                      y=0.95, xref="paper", yref="paper", showarrow=False, opacity=0.7)]
    return _figure(data, layout)


def _cumulative(trace: Trace, over: Series, reference: Trace | None):
    """Per step (all contexts together, ascending): x, cumulative compute of a plain run and of this run (in
    full-step equivalents), running ideal and measured speedups (NaN where undefined)."""
    tot = trace.step_totals()
    nonzero = np.flatnonzero(tot.blocks_total)
    plain_step = tot.blocks_total[nonzero[0]] if len(nonzero) else 1.0
    n_over = len(over)
    # sequential sums, pre-run first, as the run spent them
    cum_plain = np.cumsum(tot.blocks_total)
    cum_done = np.cumsum(np.concatenate([over.blocks_computed, tot.blocks_computed]))[n_over:]
    cum_ms = np.cumsum(np.concatenate([over.time_ms, tot.time_ms]))[n_over:]
    cum_calls = np.cumsum(tot.calls)
    with np.errstate(divide="ignore", invalid="ignore"):
        ideal = np.where(cum_done != 0, cum_plain / cum_done, np.nan)
        if reference is not None:
            ref = reference.step_totals()
            at = np.minimum(np.searchsorted(ref.step, tot.step), max(len(ref.step) - 1, 0))
            in_ref = (ref.step[at] == tot.step) if len(ref.step) else np.zeros(len(tot.step), bool)
            cum_ref = np.cumsum(np.where(in_ref, ref.time_ms[at] if len(ref.step) else 0.0, 0.0))
            measured = np.where(in_ref & (cum_ms != 0), cum_ref / cum_ms, np.nan)
        else:
            full_ms = trace.full_step_ms()
            est = float(np.median(full_ms)) if len(full_ms) else None
            measured = np.where(cum_ms != 0, est * cum_calls / cum_ms, np.nan) if est else \
                np.full(len(tot.step), np.nan)
    share = tot.blocks_computed / np.maximum(1, tot.blocks_total)
    return tot.step, cum_plain / plain_step, cum_done / plain_step, ideal, measured, share


def timeline_figure(trace, context: str | None = None, reference=None) -> go.Figure:
    """Compute timeline.

    Top: one bar per denoiser call, its height the share of a full step it computed, coloured by decision
    (pre-run calls, if any, at negative x in purple). Bottom: cumulative compute of this run vs a plain run
    (in full-step equivalents, left axis) and the running ideal and measured speedups (right axis).
    Measured speedup uses `reference` (a Full trace of the same settings) when given, else an estimate: the
    median time of this run's full steps stands for a plain step."""
    trace = _as_trace(trace)
    reference = _as_trace(reference) if reference is not None else None
    s, over = trace.series(context), trace.overhead_series()
    layout, (top, bottom, right) = _timeline_axes()
    layout = copy.deepcopy(layout)
    data = []
    if len(over):
        data.append(dict(
            type="bar", x=list(range(-len(over), 0)), y=over.share.tolist(), name="pre-run", width=0.8,
            marker=dict(color=OVERHEAD_COLOR), customdata=_customdata(np.round(over.time_ms, 2), over.reason),
            hovertemplate="pre-run call %{x}<br>%{y:.0%} of a step<br>%{customdata[0]} ms<extra></extra>", **_on(top),
        ))
    for code, decision in enumerate(DECISIONS):
        sel = s.decision == code
        if not sel.any():
            continue
        data.append(dict(
            type="bar", x=s.step[sel].tolist(), y=s.share[sel].tolist(), name=decision, marker=dict(color=DECISION_COLORS[decision]),
            width=0.8, customdata=_customdata(np.round(s.time_ms[sel], 2), _or_dash(s.reason[sel]),
                                              _fmt_column(s.timestep[sel], "%.1f")),
            hovertemplate=("step %{x} (t %{customdata[2]})<br>%{y:.0%} of a full step<br>%{customdata[0]} ms"
                           "<br>%{customdata[1]}<extra>" + decision + "</extra>"), **_on(top),
        ))

    # cumulative compute and speedups, over steps (all contexts of a step together)
    *lines, step_share = _cumulative(trace, over, reference)
    xs, y_plain, y_done, ideal, measured = (a.tolist() for a in lines)
    data += [
        dict(type="scatter", x=xs, y=y_plain, name="plain run (so far)", mode="lines",
             line=dict(color="#999", dash="dot"), hovertemplate="step %{x}: %{y:.1f} full steps<extra>plain</extra>",
             **_on(bottom)),
        dict(type="scatter", x=xs, y=y_done, name="this run (so far)", mode="lines", fill="tozeroy",
             line=dict(color=DECISION_COLORS[FULL]),
             hovertemplate="step %{x}: %{y:.2f} full-step equivalents<extra>this run</extra>", **_on(bottom)),
        dict(type="scatter", x=xs, y=ideal, name="ideal speedup", mode="lines",
             line=dict(color=DECISION_COLORS[ACCEPTED], width=2),
             hovertemplate="step %{x}: %{y:.2f}x ideal<extra></extra>", **_on(right)),
        dict(type="scatter", x=xs, y=measured, name="measured speedup" + ("" if reference is not None else " (est.)"),
             mode="lines", line=dict(color=DECISION_COLORS[REJECTED], width=2),
             hovertemplate="step %{x}: %{y:.2f}x measured<extra></extra>", **_on(right)),
    ]
    summary = trace.summary()
    sub = f" · ideal {summary['ideal_speedup']:.2f}x (compute)" if summary.get("ideal_speedup") else ""
    x0 = -len(over) - 0.5 if len(over) else -0.5
    top_share = max([1.0, *step_share.max(initial=0.0, keepdims=True), *over.share.max(initial=0.0, keepdims=True)])
    layout[top[0]]["range"] = [x0, _x_range(trace)[1]]
    layout[bottom[0]]["title"] = dict(text="step")
    layout[top[1]].update(title=dict(text="share of a step"), range=[0, top_share * 1.05], tickformat=".0%")
    layout[bottom[1]].update(title=dict(text="full steps"), rangemode="tozero")
    layout[right[1]].update(title=dict(text="speedup (x)"), rangemode="tozero", showgrid=False)
    layout.update(title=dict(text="compute timeline", subtitle=dict(text=f"{trace.method}{sub}", font=dict(size=12))),
                  # the legend below "step"
                  height=HEIGHT + 110, margin=dict(_MARGIN, t=70, b=110), barmode="overlay", hovermode="closest",
                  # two entries a row, however narrow the panel (one a row would not fit below the axes)
                  legend=dict(orientation="h", y=-0.2, yanchor="top", font=dict(size=10), entrywidth=0.5,
                              entrywidthmode="fraction"))
    return _figure(data, layout)


def map_steps(trace, context: str | None = None) -> list[int]:
    """Steps of `context` that carry token maps (what the app's scrub slider can show)."""
    s = _as_trace(trace).series(context)
    return s.step[s.has_maps].tolist()


def map_frames(trace, context: str | None = None) -> int:
    """Number of frames of the trace's token maps: `F` for video maps `[frames][h][w]`, 0 for image maps (or
    none). Read from `trace.token_grid` when it has 3 entries, else from the first record with maps (a
    trace's maps all share its token grid)."""
    trace = _as_trace(trace)
    grid = trace.token_grid or []
    if len(grid) == 3:
        return int(grid[0])
    s = trace.series(context)
    with_maps = s.index[s.has_maps]
    if len(with_maps):
        for v in trace.steps[with_maps[0]].maps.values():
            a = np.asarray(v)
            if a.ndim == 3:
                return int(a.shape[0])
    return 0


def _frame_index(n: int, frame: int | None) -> int:
    """`frame` clamped to 0..n-1; None: the middle frame."""
    return n // 2 if frame is None else min(max(int(frame), 0), n - 1)


def _grid2d(values, frame: int | None = None) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim == 3:  # [frames][h][w]: one frame (the middle one unless `frame` is given)
        a = a[_frame_index(a.shape[0], frame)]
    if a.ndim == 1:
        a = a[None, :]
    return a


def _level_text(z: np.ndarray) -> list:
    """Each cell's level name (`LEVEL_NAMES`), the number itself for a level without one; nested lists (see
    `_customdata`)."""
    codes = np.rint(z).astype(np.int64)
    names = np.array([LEVEL_NAMES.get(i, str(i)) for i in range(max(LEVEL_NAMES) + 1)], dtype=object)
    known = (codes >= 0) & (codes < len(names))
    return np.where(known, names[np.clip(codes, 0, len(names) - 1)], codes.astype(str).astype(object)).tolist()


def token_maps_figure(trace, step: int | None = None, context: str | None = None,
                      frame: int | None = None) -> go.Figure:
    """Token maps of one step, side by side: "importance" and "level" (SpecDiff), "error" (SpeCa's forecast
    error per token, FirstBlockCache's residual change). `step=None` shows the last step that has maps.

    Video traces (maps `[frames][h][w]`) show one latent frame at a time: `frame` (clamped to the frames there
    are; None: the middle frame); the title names it. Image traces ignore `frame`."""
    trace = _as_trace(trace)
    s = trace.series(context)
    with_maps = s.index[s.has_maps]
    if not len(with_maps):
        return empty_figure("no token maps in this trace (Full and TaylorSeer record none; "
                            "SpeCa records them on verified steps)", title="token maps")
    rec = None
    if step is not None:
        hit = np.flatnonzero(s.step == int(step))
        rec = trace.steps[s.index[hit[0]]] if len(hit) else None
        if rec is not None and not rec.maps:
            return empty_figure(f"step {rec.step} ({rec.decision}, {rec.reason or '-'}) has no token maps",
                                title=f"token maps — step {rec.step}")
    if rec is None:
        rec = trace.steps[with_maps[-1]]
    maps = {k: np.asarray(v) for k, v in rec.maps.items()}
    keys = [k for k in ("importance", "level", "error") if k in maps] + \
        [k for k in maps if k not in ("importance", "level", "error")]
    layout, axes = _maps_axes(len(keys))
    layout = copy.deepcopy(layout)
    for note, key in zip(layout["annotations"], keys):
        note["text"] = ("first-block residual change" if key == "error" and trace.method == "fbcache"
                        else MAP_TITLES.get(key, key))
    n_frames = max((m.shape[0] for m in maps.values() if m.ndim == 3), default=0)
    data = []
    for i, (key, (xa, ya)) in enumerate(zip(keys, axes), start=1):
        z = _grid2d(maps[key], frame)
        bar = dict(len=0.8, x=layout[xa]["domain"][1] + 0.005, xanchor="left", thickness=10)  # beside its map
        if key == "level":
            levels = sorted(LEVEL_COLORS)
            scale = []
            for j, lv in enumerate(levels):
                a, b = j / len(levels), (j + 1) / len(levels)
                scale += [[a, LEVEL_COLORS[lv]], [b, LEVEL_COLORS[lv]]]
            data.append(dict(
                type="heatmap", z=z, zmin=levels[0] - 0.5, zmax=levels[-1] + 0.5, colorscale=scale,
                text=_level_text(z), name="level",
                colorbar=dict(bar, tickvals=levels, ticktext=[LEVEL_NAMES[v] for v in levels]),
                hovertemplate="row %{y}, col %{x}<br>%{text}<extra></extra>", **_on((xa, ya)),
            ))
        else:
            data.append(dict(
                type="heatmap", z=z, colorscale=[list(c) for c in _colorscale("Viridis" if key == "importance" else "Inferno")],
                name=key,
                colorbar=bar, hovertemplate="row %{y}, col %{x}<br>" + key + " %{z:.4g}<extra></extra>",
                **_on((xa, ya)),
            ))
        # no grid or zero lines: they would cross the page beside the (narrower, square) map
        layout[ya].update(autorange="reversed", scaleanchor=_ref(xa), showticklabels=False, showgrid=False,
                          zeroline=False)
        layout[xa].update(showticklabels=False, showgrid=False, zeroline=False)
    extra = f", {rec.tokens_computed}/{rec.tokens_total} tokens" if rec.tokens_computed and rec.tokens_total else ""
    err = (f", {'change' if trace.method == 'fbcache' else 'error'} {rec.error:.4g}" if rec.error is not None
           else "")
    where = f", frame {_frame_index(n_frames, frame)} (0–{n_frames - 1})" if n_frames else ""  # 0-based, as the slider
    # the details in a subtitle: on one line they were clipped on a phone's width
    layout.update(title=dict(text=f"token maps — step {rec.step}{where}",
                             subtitle=dict(text=f"{rec.decision}{err}{extra}", font=dict(size=12))),
                  height=HEIGHT + 20, margin=dict(_MARGIN, l=20, r=10, t=90))  # no tick labels: narrow sides
    return _figure(data, layout)


DIFF_MAX_CELLS = 256 * 256
"""A difference map larger than this is drawn as the mean of k x k blocks (1024²: 4 x 4; a video strip too), sent
as float32: a 1024² float64 heatmap is ~11 MB of JSON as lists and ~3.4 MB as Plotly's base64 arrays, and the
panel shows ~300 pixels anyway (256² float32: ~0.35 MB). The title's mean and max are the full-size map's."""


def _block_mean(d: np.ndarray, max_cells: int) -> tuple[np.ndarray, int]:
    h, w = d.shape
    k = max(1, math.ceil(math.sqrt(d.size / max_cells)))
    while -(-h // k) * -(-w // k) > max_cells:  # partial blocks at the edges count as cells too
        k += 1
    if k == 1:
        return d, 1
    hp, wp = -h % k, -w % k
    if hp or wp:  # pad with the edge's values: the last partial block averages what is there
        d = np.pad(d, ((0, hp), (0, wp)), mode="edge")
    return d.reshape(d.shape[0] // k, k, d.shape[1] // k, k).mean(axis=(1, 3)), k


def difference_figure(a, b, title: str = "|accelerated - full|", max_cells: int = DIFF_MAX_CELLS) -> go.Figure:
    """Heatmap of the per-pixel absolute difference of two images (HxWxC arrays or PIL images, same size),
    averaged over channels, in 0-255 units; over `max_cells` pixels, the mean of k x k blocks (the title says so)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        return empty_figure(f"images differ in size: {x.shape} vs {y.shape}", title=title)
    d = np.abs(x - y)
    if d.ndim == 3:
        d = d.mean(axis=2)
    z, k = _block_mean(d, max_cells)
    blocks = f", {k}x{k} block means" if k > 1 else ""
    fig = go.Figure(go.Heatmap(z=z.astype(np.float32), colorscale="Magma", zmin=0, zmax=max(float(z.max()), 1.0),
                               name="difference", hovertemplate="x %{x}, y %{y}<br>|diff| %{z:.1f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False, showgrid=False, zeroline=False)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    identical = " — identical" if not d.any() else ""  # a flat map: 0..1 on the bar, not an autoscaled ±0.5
    fig.update_layout(title=f"{title} (mean {d.mean():.2f}, max {d.max():.0f}{blocks}){identical}", height=HEIGHT,
                      margin=_MARGIN, template=copy.deepcopy(_template_json()))
    return fig


def _point_text(p: dict) -> str:
    """A sweep point's text on the curve: its knob value (the title names the knob), else its label."""
    return f"{p['value']:.3g}" if isinstance(p.get("value"), (int, float)) else p["label"]


def sweep_figure(points: list[dict], others: list[dict] = (), title: str = "speedup vs quality") -> go.Figure:
    """A method's Pareto curve for one prompt: measured and ideal speedup against PSNR vs the full run, one point
    per setting (`points`: dicts with `value`, `psnr`, `ssim`, `measured`, `ideal`, `label`), and other methods'
    runs of the same prompt beside it (`others`: dicts with `label`, `psnr`, `ssim`, `measured`, `ideal`)."""
    if not points and not others:
        return empty_figure("press Sweep: the method runs at several settings", title=title)

    def px(p):  # an identical image has an infinite PSNR: drawn at 60 dB
        return 60.0 if p["psnr"] is None or not np.isfinite(p["psnr"]) else p["psnr"]

    pts = sorted(points, key=px)
    data = []
    for key, name, dash, sym in (("measured", "measured speedup (time)", "solid", "circle"),
                                 ("ideal", "ideal speedup (compute)", "dot", "diamond-open")):
        data.append(dict(type="scatter", mode="lines+markers+text", name=name, x=[px(p) for p in pts],
                         y=[p[key] for p in pts], text=[_point_text(p) if key == "ideal" else "" for p in pts],
                         textposition="top center", line=dict(dash=dash, color=DECISION_COLORS[ACCEPTED]),
                         marker=dict(symbol=sym, size=9),
                         customdata=[[p["label"], p["ssim"]] for p in pts],
                         hovertemplate="%{customdata[0]}<br>PSNR %{x:.2f} dB<br>SSIM %{customdata[1]:.4f}<br>"
                                       f"{key} %{{y:.2f}}x<extra></extra>"))
    for o in others:
        data.append(dict(type="scatter", mode="markers", name=f"{o['label']} (measured)", x=[px(o)],
                         y=[o["measured"]], marker=dict(symbol="square", size=11),
                         hovertemplate=f"{o['label']}<br>PSNR %{{x:.2f}} dB<br>measured %{{y:.2f}}x<extra></extra>"))
    layout = dict(title=dict(text=title), height=HEIGHT, margin=dict(_MARGIN, b=90),
                  xaxis=dict(title=dict(text="PSNR vs the full run (dB; identical = 60)")),
                  yaxis=dict(title=dict(text="speedup (x)"), rangemode="tozero"),
                  legend=dict(orientation="h", y=-0.3, x=0))
    return _figure(data, layout)

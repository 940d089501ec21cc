"""Trace -> Plotly figures. Pure functions: they read a `accel.Trace` (finished or still growing) and return a
`plotly.graph_objects.Figure`; nothing here imports Gradio or touches a model."""

from __future__ import annotations

import statistics

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from accel.trace import ACCEPTED, FULL, PARTIAL, REJECTED, StepRecord, Trace

DECISION_COLORS = {
    FULL: "#4C78A8",  # blue: every block computed
    ACCEPTED: "#54A24B",  # green: speculative / cached step kept
    REJECTED: "#E45756",  # red: speculative step failed verification
    PARTIAL: "#F58518",  # orange: SpecDiff, only some tokens computed
}
OVERHEAD_COLOR = "#B279A2"  # purple: pre-run calls (SpecDiff's speculative iteration)
THRESHOLD_COLOR = "#333333"
LEVEL_COLORS = {1: "#4C78A8", 2: "#BAB0AC", 3: "#F58518"}  # C1 computed, C2 reused, C3 history blend
LEVEL_NAMES = {1: "C1 computed", 2: "C2 reused", 3: "C3 history"}
MAP_TITLES = {"importance": "token importance", "level": "cache level", "error": "forecast error per token"}
HEIGHT = 340
_MARGIN = dict(l=50, r=20, t=50, b=40)


def _as_trace(trace) -> Trace:
    return Trace.from_dict(trace) if isinstance(trace, dict) else trace


def _x_range(trace: Trace) -> list[float]:
    n = max(trace.num_steps, max((r.step for r in trace.steps), default=-1) + 1, 1)
    return [-0.5, n - 0.5]


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A blank figure carrying a centred message (e.g. before a run, or a method without token maps)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_layout(title=title or None, height=HEIGHT, margin=_MARGIN, template="plotly_white",
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def _records(trace: Trace, context: str | None) -> list[StepRecord]:
    return trace.for_context(context) if trace.steps else []


def error_figure(trace, context: str | None = None) -> go.Figure:
    """Per-step verification error against the threshold curve.

    One marker trace per decision (named after it, coloured with `DECISION_COLORS`); steps that verified
    nothing (full steps, unverified methods) sit at y=0 as open squares. Hover: step, timestep, error, time,
    reason. A dashed "threshold" line where the method has one."""
    trace = _as_trace(trace)
    recs = _records(trace, context)
    fig = go.Figure()
    thr = [(r.step, r.threshold) for r in recs if r.threshold is not None]
    if thr:
        fig.add_trace(go.Scatter(
            x=[s for s, _ in thr], y=[t for _, t in thr], mode="lines", name="threshold",
            line=dict(color=THRESHOLD_COLOR, dash="dash", width=2), hovertemplate="threshold %{y:.4g}<extra></extra>",
        ))
    for decision in (FULL, ACCEPTED, REJECTED, PARTIAL):
        sel = [r for r in recs if r.decision == decision]
        if not sel:
            continue
        y = [r.error if r.error is not None else 0.0 for r in sel]
        symbols = ["circle" if r.error is not None else "square-open" for r in sel]
        custom = [[r.step, _fmt(r.timestep, ".1f"), _fmt(r.error), round(r.time_ms, 2), r.reason or "-"] for r in sel]
        fig.add_trace(go.Scatter(
            x=[r.step for r in sel], y=y, mode="markers", name=decision,
            marker=dict(color=DECISION_COLORS[decision], size=9, symbol=symbols, line=dict(width=1, color="white")),
            customdata=custom,
            hovertemplate=("step %{customdata[0]}<br>timestep %{customdata[1]}<br>error %{customdata[2]}"
                           "<br>time %{customdata[3]} ms<br>reason %{customdata[4]}<extra>" + decision + "</extra>"),
        ))
    title = f"{trace.method}: verification error vs threshold"
    if recs and not any(r.error is not None for r in recs):
        fig.add_annotation(text="this method verifies nothing: markers show the decisions only", x=0.5, y=0.95,
                           xref="paper", yref="paper", showarrow=False, font=dict(color="#666"))
    fig.update_layout(
        title=title, height=HEIGHT, margin=_MARGIN, template="plotly_white",
        xaxis=dict(title="step", range=_x_range(trace)), yaxis=dict(title="error", rangemode="tozero"),
        legend=dict(orientation="h", y=-0.2, font=dict(size=10)), hovermode="closest",
    )
    return fig


def _per_step(trace: Trace, context: str | None):
    """Main steps of `context` with their compute summed over all contexts of the same step."""
    recs = _records(trace, context)
    by_step: dict[int, list[StepRecord]] = {}
    for r in trace.steps:
        by_step.setdefault(r.step, []).append(r)
    return recs, by_step


def timeline_figure(trace, context: str | None = None, reference=None) -> go.Figure:
    """Compute timeline.

    Top: one bar per denoiser call, its height the share of a full step it computed, coloured by decision
    (pre-run calls, if any, at negative x in purple). Bottom: cumulative compute of this run vs a plain run
    (in full-step equivalents, left axis) and the running ideal and measured speedups (right axis).
    Measured speedup uses `reference` (a Full trace of the same settings) when given, else an estimate: the
    median time of this run's full steps stands for a plain step."""
    trace = _as_trace(trace)
    reference = _as_trace(reference) if reference is not None else None
    recs, by_step = _per_step(trace, context)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.45, 0.55],
                        specs=[[{}], [{"secondary_y": True}]])
    over = trace.overhead
    if over:
        xs = list(range(-len(over), 0))
        fig.add_trace(go.Bar(
            x=xs, y=[r.blocks_computed / max(1, r.blocks_total) for r in over], name="pre-run", width=0.8,
            marker_color=OVERHEAD_COLOR, customdata=[[round(r.time_ms, 2), r.reason] for r in over],
            hovertemplate="pre-run call %{x}<br>%{y:.0%} of a step<br>%{customdata[0]} ms<extra></extra>",
        ), row=1, col=1)
    for decision in (FULL, ACCEPTED, REJECTED, PARTIAL):
        sel = [r for r in recs if r.decision == decision]
        if not sel:
            continue
        frac = []
        for r in sel:
            group = by_step[r.step]
            frac.append(sum(g.blocks_computed for g in group) / max(1, sum(g.blocks_total for g in group)))
        fig.add_trace(go.Bar(
            x=[r.step for r in sel], y=frac, name=decision, marker_color=DECISION_COLORS[decision], width=0.8,
            customdata=[[round(r.time_ms, 2), r.reason or "-", _fmt(r.timestep, ".1f")] for r in sel],
            hovertemplate=("step %{x} (t %{customdata[2]})<br>%{y:.0%} of a full step<br>%{customdata[0]} ms"
                           "<br>%{customdata[1]}<extra>" + decision + "</extra>"),
        ), row=1, col=1)

    # cumulative compute and speedups, over steps (all contexts of a step together)
    steps = sorted(by_step)
    over_blocks = sum(r.blocks_computed for r in over)
    over_ms = sum(r.time_ms for r in over)
    cum_plain, cum_done, cum_ms = 0.0, over_blocks, over_ms
    plain_step_blocks = None
    xs, y_plain, y_done, ideal, measured = [], [], [], [], []
    full_ms = [r.time_ms for r in trace.steps if r.decision == FULL]
    est_step_ms = statistics.median(full_ms) if full_ms else None
    ref_ms: dict[int, float] = {}
    if reference is not None:
        for r in reference.steps:
            ref_ms[r.step] = ref_ms.get(r.step, 0.0) + r.time_ms
    cum_ref = 0.0
    cum_calls = 0
    for s in steps:
        group = by_step[s]
        total = sum(g.blocks_total for g in group)
        plain_step_blocks = plain_step_blocks or total
        cum_plain += total
        cum_done += sum(g.blocks_computed for g in group)
        cum_ms += sum(g.time_ms for g in group)
        cum_calls += len(group)
        xs.append(s)
        unit = plain_step_blocks or 1  # a trace whose steps count no blocks (hand-made, or empty) still draws
        y_plain.append(cum_plain / unit)
        y_done.append(cum_done / unit)
        ideal.append(cum_plain / cum_done if cum_done else None)
        if reference is not None and s in ref_ms:
            cum_ref += ref_ms[s]
            measured.append(cum_ref / cum_ms if cum_ms else None)
        elif reference is None and est_step_ms:
            measured.append(est_step_ms * cum_calls / cum_ms if cum_ms else None)
        else:
            measured.append(None)
    fig.add_trace(go.Scatter(x=xs, y=y_plain, name="plain run (cumulative)", mode="lines",
                             line=dict(color="#999", dash="dot"),
                             hovertemplate="step %{x}: %{y:.1f} full steps<extra>plain</extra>"),
                  row=2, col=1, secondary_y=False)
    fig.add_trace(go.Scatter(x=xs, y=y_done, name="this run (cumulative)", mode="lines", fill="tozeroy",
                             line=dict(color=DECISION_COLORS[FULL]),
                             hovertemplate="step %{x}: %{y:.2f} full-step equivalents<extra>this run</extra>"),
                  row=2, col=1, secondary_y=False)
    fig.add_trace(go.Scatter(x=xs, y=ideal, name="ideal speedup", mode="lines",
                             line=dict(color=DECISION_COLORS[ACCEPTED], width=2),
                             hovertemplate="step %{x}: %{y:.2f}x ideal<extra></extra>"),
                  row=2, col=1, secondary_y=True)
    label = "measured speedup" + ("" if reference is not None else " (est.)")
    fig.add_trace(go.Scatter(x=xs, y=measured, name=label, mode="lines",
                             line=dict(color=DECISION_COLORS[REJECTED], width=2),
                             hovertemplate="step %{x}: %{y:.2f}x measured<extra></extra>"),
                  row=2, col=1, secondary_y=True)
    s = trace.summary()
    sub = f" — ideal {s['ideal_speedup']}x" if s.get("ideal_speedup") else ""
    x0 = -len(over) - 0.5 if over else -0.5
    fig.update_layout(title=f"{trace.method}: compute timeline{sub}", height=HEIGHT + 80, margin=_MARGIN,
                      template="plotly_white", barmode="overlay", hovermode="closest",
                      legend=dict(orientation="h", y=-0.14, font=dict(size=10)))
    fig.update_xaxes(range=[x0, _x_range(trace)[1]], row=1, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    top = max([1.0] + [r.blocks_computed / max(1, r.blocks_total) for r in trace.steps + over])
    fig.update_yaxes(title_text="share of a step", range=[0, top * 1.05], tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="full steps", row=2, col=1, secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title_text="speedup (x)", row=2, col=1, secondary_y=True, rangemode="tozero", showgrid=False)
    return fig


def map_steps(trace, context: str | None = None) -> list[int]:
    """Steps of `context` that carry token maps (what the app's scrub slider can show)."""
    trace = _as_trace(trace)
    return [r.step for r in _records(trace, context) if r.maps]


def map_frames(trace, context: str | None = None) -> int:
    """Number of frames of the trace's token maps: `F` for video maps `[frames][h][w]`, 0 for image maps (or
    none). Read from `trace.token_grid` when it has 3 entries, else from the first 3-D map."""
    trace = _as_trace(trace)
    grid = trace.token_grid or []
    if len(grid) == 3:
        return int(grid[0])
    for r in _records(trace, context):
        for v in (r.maps or {}).values():
            a = np.asarray(v)
            if a.ndim == 3:
                return int(a.shape[0])
    return 0


def _frame_index(n: int, frame: int | None) -> int:
    """`frame` clamped to 0..n-1; None: the middle frame."""
    return n // 2 if frame is None else min(max(int(frame), 0), n - 1)


def _grid2d(values, frame: int | None = None) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.ndim == 3:  # [frames][h][w]: one frame (the middle one unless `frame` is given)
        a = a[_frame_index(a.shape[0], frame)]
    if a.ndim == 1:
        a = a[None, :]
    return a


def token_maps_figure(trace, step: int | None = None, context: str | None = None,
                      frame: int | None = None) -> go.Figure:
    """Token maps of one step, side by side: "importance" and "level" (SpecDiff), "error" (SpeCa's forecast
    error per token, FirstBlockCache's residual change). `step=None` shows the last step that has maps.

    Video traces (maps `[frames][h][w]`) show one latent frame at a time: `frame` (clamped to the frames there
    are; None: the middle frame); the title names it. Image traces ignore `frame`."""
    trace = _as_trace(trace)
    recs = _records(trace, context)
    with_maps = [r for r in recs if r.maps]
    if not with_maps:
        return empty_figure("no token maps in this trace (Full and TaylorSeer record none; "
                            "SpeCa records them on verified steps)", title="token maps")
    rec = None
    if step is not None:
        rec = next((r for r in recs if r.step == int(step)), None)
        if rec is not None and not rec.maps:
            return empty_figure(f"step {rec.step} ({rec.decision}, {rec.reason or '-'}) has no token maps",
                                title=f"token maps — step {rec.step}")
    rec = rec or with_maps[-1]
    keys = [k for k in ("importance", "level", "error") if k in rec.maps] + \
        [k for k in rec.maps if k not in ("importance", "level", "error")]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[MAP_TITLES.get(k, k) for k in keys],
                        horizontal_spacing=0.12)
    n_frames = max((np.asarray(v).shape[0] for v in rec.maps.values() if np.asarray(v).ndim == 3), default=0)
    for i, key in enumerate(keys, start=1):
        z = _grid2d(rec.maps[key], frame)
        bar_x = i / len(keys) - 0.02
        bar = dict(len=0.8, x=bar_x, thickness=12)
        if key == "level":
            levels = sorted(LEVEL_COLORS)
            lo, hi = levels[0] - 0.5, levels[-1] + 0.5
            scale = []
            for j, lv in enumerate(levels):
                a, b = j / len(levels), (j + 1) / len(levels)
                scale += [[a, LEVEL_COLORS[lv]], [b, LEVEL_COLORS[lv]]]
            text = [[LEVEL_NAMES.get(int(v), str(v)) for v in row] for row in z]
            fig.add_trace(go.Heatmap(
                z=z, zmin=lo, zmax=hi, colorscale=scale, text=text, name="level",
                colorbar=dict(bar, tickvals=levels, ticktext=[LEVEL_NAMES[v] for v in levels]),
                hovertemplate="row %{y}, col %{x}<br>%{text}<extra></extra>",
            ), row=1, col=i)
        else:
            fig.add_trace(go.Heatmap(
                z=z, colorscale="Viridis" if key == "importance" else "Inferno", name=key, colorbar=bar,
                hovertemplate="row %{y}, col %{x}<br>" + key + " %{z:.4g}<extra></extra>",
            ), row=1, col=i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i,
                         showticklabels=False)
        fig.update_xaxes(showticklabels=False, row=1, col=i)
    extra = f", {rec.tokens_computed}/{rec.tokens_total} tokens" if rec.tokens_computed and rec.tokens_total else ""
    err = f", error {rec.error:.4g}" if rec.error is not None else ""
    where = f", frame {_frame_index(n_frames, frame)} (0–{n_frames - 1})" if n_frames else ""  # 0-based, as the slider
    fig.update_layout(title=f"token maps — step {rec.step}{where} ({rec.decision}{err}{extra})", height=HEIGHT,
                      margin=_MARGIN, template="plotly_white")
    return fig


def difference_figure(a, b, title: str = "|accelerated - full|") -> go.Figure:
    """Heatmap of the per-pixel absolute difference of two images (HxWxC arrays or PIL images, same size),
    averaged over channels, in 0-255 units."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        return empty_figure(f"images differ in size: {x.shape} vs {y.shape}", title=title)
    d = np.abs(x - y)
    if d.ndim == 3:
        d = d.mean(axis=2)
    fig = go.Figure(go.Heatmap(z=d, colorscale="Magma", zmin=0, name="difference",
                               hovertemplate="x %{x}, y %{y}<br>|diff| %{z:.1f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=f"{title} (mean {d.mean():.2f}, max {d.max():.0f})", height=HEIGHT, margin=_MARGIN,
                      template="plotly_white")
    return fig

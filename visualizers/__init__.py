"""Trace -> Plotly figures for the SpecLab lab (pure functions; no Gradio, no model).

    from visualizers import error_figure, timeline_figure, token_maps_figure
    fig = error_figure(handle.trace)
"""

from .figures import (
    DECISION_COLORS,
    LEVEL_COLORS,
    OVERHEAD_COLOR,
    THRESHOLD_COLOR,
    difference_figure,
    empty_figure,
    sweep_figure,
    error_figure,
    map_frames,
    map_steps,
    timeline_figure,
    token_maps_figure,
)

__all__ = [
    "DECISION_COLORS", "LEVEL_COLORS", "OVERHEAD_COLOR", "THRESHOLD_COLOR", "difference_figure", "empty_figure",
    "error_figure", "map_frames", "map_steps", "sweep_figure", "timeline_figure", "token_maps_figure",
]

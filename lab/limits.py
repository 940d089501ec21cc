"""Limits of one request on shared hardware, configurable per deployment (environment variables or the app's
command-line flags): how much text, how much work, how large an uploaded trace."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000
    max_text_chars: int = 200
    """Any other text field (model, method, a choice)."""
    max_work: float = 400.0
    """Work of one request in million pixel-steps: steps x width x height x frames, doubled in compare mode
    (it also runs the full reference). The defaults of every preset fit (HunyuanVideo's 512x320x33x30 with
    compare: 324)."""
    max_upload_mb: float = 20.0
    """Largest trace file `/load_trace` reads (the server also refuses larger uploads)."""
    max_trace_records: int = 4000
    """Step records (main run and pre-run) of a loaded trace."""
    max_map_cells: int = 65536
    """Cells of one token map of a loaded trace (frames x h x w)."""
    trace_ttl_s: float = 3600.0
    """How long a session keeps its trace (the figures' source) after its last run or load."""
    run_files: int = 32
    """Exported files of this many runs are kept on disk (the oldest are removed); a session's go when it ends."""
    waiting: int = 16
    """Generate requests in the lab at once (running or waiting in a model's line, all models together); more
    wait in Gradio's queue, which shows its own position."""

    @classmethod
    def from_env(cls, environ=os.environ, **over) -> "Limits":
        """Defaults, then SPECLAB_<FIELD> environment variables (e.g. SPECLAB_MAX_WORK=100), then `over`."""
        values = {}
        for f in fields(cls):
            raw = environ.get(f"SPECLAB_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = type(f.default)(float(raw)) if f.type in ("int", int) else float(raw)
                except ValueError:
                    raise ValueError(f"SPECLAB_{f.name.upper()}={raw!r} is not a number") from None
        values.update({k: v for k, v in over.items() if v is not None})
        return cls(**values)

    def work(self, steps: int, width: int, height: int, frames: int | None, compare: bool) -> float:
        """Million pixel-steps of a request."""
        return steps * width * height * (frames or 1) * (2 if compare else 1) / 1e6

"""What the lab keeps per session, and the files of each run.

A `Session` lives in the session's own Gradio state (a `gr.State`), so Stop reaches the run of the session it
comes from and nothing else, and everything of a session goes when Gradio deletes its state. `RunFiles` keeps
the exported files of the last N runs on disk (each run in its own `speclab_*` temp folder) and removes a
session's folders when the session ends.
"""

from __future__ import annotations

import ctypes
import gc
import shutil
import tempfile
import threading
from collections import OrderedDict


class Session:
    def __init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ended = False
        self.points: dict = {}
        """{run settings key: {method label: its latest compared run's numbers}}: the other methods' points
        beside a sweep's curve."""
        self.sweep: list = []
        """The latest sweep's runs: (label, Rendered, Trace), for loading a point."""

    def add_point(self, key, label: str, point: dict) -> None:
        with self._lock:
            by_method = self.points.setdefault(key, {})
            by_method[label] = point
            while len(self.points) > 8:  # a few settings' worth: bounded
                self.points.pop(next(iter(self.points)))

    def __deepcopy__(self, memo) -> "Session":
        """Gradio gives each session a deep copy of a `gr.State`'s initial value: a fresh `Session`."""
        return Session()

    def new_run(self) -> threading.Event:
        """The stop flag of this session's next run (a Stop from before it started does not count)."""
        with self._lock:
            self._stop = threading.Event()
            return self._stop

    def stop(self) -> None:
        """Stop this session's run: a running one ends after its current step, a waiting one leaves the line."""
        with self._lock:
            self._stop.set()


class RunFiles:
    """Temp folders of the last `capacity` runs; older ones, and those of ended sessions, are removed."""

    def __init__(self, capacity: int = 32, prefix: str = "speclab_"):
        self.capacity = capacity
        self.prefix = prefix
        self._dirs: OrderedDict[str, int] = OrderedDict()  # folder -> id of its session
        self._lock = threading.Lock()

    def new(self, owner=None) -> str:
        d = tempfile.mkdtemp(prefix=self.prefix)
        with self._lock:
            self._dirs[d] = id(owner)
            old = []
            while len(self._dirs) > self.capacity:
                old.append(self._dirs.popitem(last=False)[0])
        for o in old:
            shutil.rmtree(o, ignore_errors=True)
        return d

    def release(self, owner) -> None:
        """Remove every folder of `owner`'s runs."""
        with self._lock:
            mine = [d for d, o in self._dirs.items() if o == id(owner)]
            for d in mine:
                del self._dirs[d]
        for d in mine:
            shutil.rmtree(d, ignore_errors=True)

    def clear(self) -> None:
        with self._lock:
            dirs, self._dirs = list(self._dirs), OrderedDict()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._dirs)


def give_back_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps what Python freed in its arenas, so the memory of a
    forgotten session (a loaded trace is tens of MB of Python objects) would stay in the server's RSS, which is
    what a shared host's memory limit counts. Cycles (figures, Gradio's objects) are collected first, so their
    memory is free to return. The trim is a no-op where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_large_blocks_at_once(threshold: int = 1 << 20) -> None:
    """glibc: serve allocations of `threshold` bytes and more (a read upload, a figure's JSON, a token map) from
    their own mappings, returned to the OS when freed. By default glibc raises this threshold after the first
    large free, and later large blocks then come from the heap, where freed space stays in the process. Call
    once at start-up (the app's `main`); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass

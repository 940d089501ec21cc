"""One run at a time per pipeline: a first-come, first-served line with positions.

A diffusers pipeline carries one run's hooks, scheduler state and caches, so two calls on one pipeline must
not overlap (accel's own guard only notices an overlap inside a denoiser call, and then fails whichever run
got there second, which may be the first one). The lab therefore serialises runs per loaded model: each model
has a `Line`; a run takes a `Ticket`, waits for its turn (its position and what runs now are there to show),
and leaves the line when it is done or stopped while waiting. Different models have different lines, so an
image and a video preset never wait for each other.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class Ticket:
    def __init__(self, line: "Line", what: str):
        self.line = line
        self.what = what
        """What this run is, for the people waiting behind it (e.g. "SpeCa, 28 steps")."""
        self.progress = ""
        """Updated by the run while it holds the turn (e.g. "step 12/28")."""

    def position(self) -> int:
        """0 while it holds the turn, 1 if next, ...; -1 once it left."""
        return self.line.position(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for the turn; True once this ticket holds it."""
        return self.line.wait(self, timeout)

    def leave(self) -> None:
        self.line.leave(self)

    def __enter__(self) -> "Ticket":
        self.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.leave()


class Line:
    def __init__(self):
        self._cond = threading.Condition()
        self._tickets: list[Ticket] = []  # [0] holds the turn

    def join(self, what: str = "a run") -> Ticket:
        t = Ticket(self, what)
        with self._cond:
            self._tickets.append(t)
        return t

    def position(self, ticket: Ticket) -> int:
        with self._cond:
            return self._tickets.index(ticket) if ticket in self._tickets else -1

    def wait(self, ticket: Ticket, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._tickets and self._tickets[0] is ticket, timeout)

    def leave(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._tickets:
                self._tickets.remove(ticket)
                self._cond.notify_all()

    def running(self) -> Ticket | None:
        with self._cond:
            return self._tickets[0] if self._tickets else None

    def __len__(self) -> int:
        with self._cond:
            return len(self._tickets)

    def idle(self) -> bool:
        return len(self) == 0

    @contextmanager
    def turn(self, what: str = "a run"):
        """Wait for a turn and hold it for the `with` block (scripts and tests; the app waits visibly)."""
        with self.join(what) as ticket:
            yield ticket

"""The lab's user-facing errors: their message is written for the person at the controls and is shown as is.
Anything else that reaches the app is an internal error: logged with an id, shown only as that id."""

from __future__ import annotations


class LabError(Exception):
    """An error whose message is meant for the user."""


class InputError(LabError, ValueError):
    """A control value the run cannot use; the message names the control."""


def shorten(value, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: user input is quoted in messages, never echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

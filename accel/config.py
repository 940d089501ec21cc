"""What every method's config shares: fields declared once with their range and help, validated strictly.

A method's config is a dataclass whose fields are declared with `knob(...)`: the default, a help text, the
allowed range or choices, and how a UI should show it (label, slider range). From that one declaration:

- `validate()` (run in `__post_init__`) checks every field: a bad value fails where it is written, with a
  `ValueError` naming the field and what is allowed. Numbers must be real, finite numbers (no bools, NaN,
  inf or integers too large for a float); integers must be `int`; bools must be `bool`.
- `knobs(ConfigClass)` lists the fields as `Knob`s, so the lab builds its controls from the config and a new
  knob is one edit.

Cross-field rules (e.g. `max_spec_steps >= min_spec_steps`) go in the config's `check_relations()`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

_KNOB = "speclab_knob"
NUMBER_KINDS = ("float", "int")


def check(cond: bool, name: str, allowed: str, value) -> None:
    """Raise `ValueError("<name>=<value> is out of range: <name> must be <allowed>")` unless `cond`."""
    if not cond:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValueError(f"{name}={shown} is out of range: {name} must be {allowed}")


def is_int(v) -> bool:
    """A true integer (bool excluded)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite real number that fits a float (bool, NaN, inf and huge integers excluded)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


@dataclass(frozen=True)
class Knob:
    """One config field as a control: what it is, what it may be, how to show it."""

    name: str
    kind: str
    """"float", "int", "bool", "choice" or "other" (validated by the config's `check_relations`)."""
    default: Any
    help: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple | None = None
    optional: bool = False
    """None is also allowed."""
    ui_range: tuple[float, float] | None = None
    """The range a slider should offer (within the allowed range); None: the allowed range."""
    step: float | None = None
    """Slider step; None: 1 for integers, a hundredth of the range for floats."""
    advanced: bool = False
    """Shown folded away in the lab."""

    def allowed(self) -> str:
        """The allowed values, in words (used in error messages)."""
        if self.kind == "bool":
            text = "a bool (True or False)"
        elif self.kind == "choice":
            text = f"one of {self.choices}"
        elif self.kind in NUMBER_KINDS:
            noun = "an integer" if self.kind == "int" else "a finite number"
            lo, hi = self.minimum, self.maximum
            if lo is not None and hi is not None:
                left, right = "(" if self.exclusive_minimum else "[", ")" if self.exclusive_maximum else "]"
                if self.kind == "int" and not self.exclusive_minimum and not self.exclusive_maximum:
                    text = f"{noun} in {_fmt(lo)}..{_fmt(hi)}"
                else:
                    text = f"{noun} in {left}{_fmt(lo)}, {_fmt(hi)}{right}"
            elif lo is not None:
                text = f"{noun} {'>' if self.exclusive_minimum else '>='} {_fmt(lo)}"
            elif hi is not None:
                text = f"{noun} {'<' if self.exclusive_maximum else '<='} {_fmt(hi)}"
            else:
                text = noun
        else:
            text = "a valid value"
        return ("None or " + text) if self.optional else text

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "int" and not is_int(value):
            return False
        if self.kind in NUMBER_KINDS:
            if not is_number(value):
                return False
            v = float(value)
            if self.minimum is not None and (v <= self.minimum if self.exclusive_minimum else v < self.minimum):
                return False
            if self.maximum is not None and (v >= self.maximum if self.exclusive_maximum else v > self.maximum):
                return False
            return True
        return True  # "other": the config's check_relations validates it

    def check(self, value) -> None:
        check(self.accepts(value), self.name, self.allowed(), value)

    def slider(self) -> tuple[float, float, float] | None:
        """(low, high, step) for a slider, or None when the field is not a bounded number."""
        if self.kind not in NUMBER_KINDS:
            return None
        lo, hi = self.ui_range if self.ui_range is not None else (self.minimum, self.maximum)
        if lo is None or hi is None:
            return None
        step = self.step if self.step is not None else (1 if self.kind == "int" else (hi - lo) / 100)
        return lo, hi, step


def _fmt(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def knob(default, help: str, *, label: str | None = None, kind: str | None = None, minimum=None, maximum=None,
         exclusive_minimum: bool = False, exclusive_maximum: bool = False, choices=None, optional: bool = False,
         ui_range=None, step=None, advanced: bool = False):
    """A dataclass field declared with everything the library and the lab need to know about it."""
    if kind is None:
        if choices is not None:
            kind = "choice"
        elif isinstance(default, bool):
            kind = "bool"
        elif isinstance(default, int):
            kind = "int"
        elif isinstance(default, float):
            kind = "float"
        else:
            kind = "other"
    meta = dict(kind=kind, help=" ".join(help.split()), label=label, minimum=minimum, maximum=maximum,
                exclusive_minimum=exclusive_minimum, exclusive_maximum=exclusive_maximum,
                choices=tuple(choices) if choices is not None else None, optional=optional,
                ui_range=tuple(ui_range) if ui_range is not None else None, step=step, advanced=advanced)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={_KNOB: meta})
    return field(default=default, metadata={_KNOB: meta})


def knobs(config) -> list[Knob]:
    """The `Knob` of every field of a config class (or instance), in declaration order."""
    out = []
    for f in fields(config):
        meta = f.metadata.get(_KNOB)
        if meta is None:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        label = meta["label"] or f.name.replace("_", " ")
        out.append(Knob(name=f.name, default=default, **{**meta, "label": label}))
    return out


class ConfigBase:
    """Base of every method config: strict validation from the fields' knobs, dict round-trip."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for k in knobs(self):
            k.check(getattr(self, k.name))
        self.check_relations()

    def check_relations(self) -> None:
        """Rules between fields, and fields of kind "other". Override; raise through `check`."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"a {cls.__name__} is built from a dict of its fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


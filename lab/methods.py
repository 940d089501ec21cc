"""The lab's method table: display name -> accel method, and which of its config's knobs the lab shows.

Controls are built from the config's knobs (`accel.knobs`): label, range, step and help come from the field's
declaration, so a new knob is one edit in the config, and a new method is its accel module plus one line here.
Control values travel as a dict keyed by `LabMethod.param(field)` (e.g. `speca_threshold`); `build` turns the
chosen method's values into its config, and a bad value becomes an `InputError` naming the control's label.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import accel
from accel.config import Knob

from .errors import InputError, shorten


@dataclass(frozen=True)
class LabMethod:
    label: str
    """Shown in the UI; also the API's `method` value."""
    name: str
    """The accel method (`accel.method(name)`)."""
    main: tuple[str, ...] = ()
    """Knobs shown open; every other knob the lab can show goes into the "advanced" accordion."""
    fixed: dict = field(default_factory=dict)
    """Fields the lab sets itself (not shown)."""
    linked: dict = field(default_factory=dict)
    """{knob: (other knob, {value: other's value})}: choosing `value` for `knob` sets `other` (a sensible
    starting point, e.g. SpeCa's threshold scale differs per error metric)."""
    how: str = ""
    """How it works, for a visitor (Markdown): what is forecast, what is verified, what the levels are."""
    defaults: dict = field(default_factory=dict)
    """The lab's starting values where the config's default does nothing useful on the bundled models."""

    @property
    def config_cls(self) -> type:
        return accel.method(self.name).config_cls

    def param(self, name: str) -> str:
        """The control's key in the value dict and the API: `<method>_<field>`."""
        return f"{self.name}_{name}"

    def knobs(self) -> list[Knob]:
        """The knobs the lab shows, main ones first, in declaration order otherwise."""
        shown = [k for k in accel.knobs(self.config_cls) if k.name not in self.fixed and showable(k)]
        return sorted(shown, key=lambda k: (k.name not in self.main, self.main.index(k.name)
                                            if k.name in self.main else 0))

    def default(self, knob: Knob):
        """The control's starting value: the lab's override, else the field's default."""
        return self.defaults.get(knob.name, knob.default)

    @property
    def speed_knob(self) -> str | None:
        """The config's field that trades quality for speed (`SPEED_KNOB`), if any."""
        return getattr(self.config_cls, "SPEED_KNOB", None)

    def is_main(self, knob: Knob) -> bool:
        return knob.name in self.main

    def build(self, values: dict):
        """The config from control values keyed by `param(field)`; missing ones take the field's default."""
        by_name = {}
        for k in self.knobs():
            key = self.param(k.name)
            if key in values and values[key] is not None:
                by_name[k.name] = coerce(self, k, values[key])
            elif k.name in self.defaults:
                by_name[k.name] = self.defaults[k.name]
        try:
            return self.config_cls(**by_name, **self.fixed)
        except ValueError as e:  # a rule between fields (check_relations): name the controls it mentions
            raise InputError(f"{self.label}: {self._labelled(str(e))}") from None

    def _labelled(self, message: str) -> str:
        named = [k.label for k in self.knobs() if re.search(rf"\b{k.name}\b", message)]
        return f"{message} (controls: {', '.join(named)})" if named else message


def showable(k: Knob) -> bool:
    """Whether a knob maps to one plain control: a bounded slider, a number box, a checkbox or a dropdown."""
    if k.optional:
        return False
    return k.kind in ("float", "int", "bool", "choice")


def coerce(method: LabMethod, k: Knob, value):
    """A control value as the field's type, checked against the knob; errors name the control's label."""
    where = f"{method.label}, {k.label}"
    if k.kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: must be a number, got {shorten(value)}")
        if not math.isfinite(value):
            raise InputError(f"{where}: must be a finite number, got {value}")
        if k.kind == "int":
            if value != int(value):
                raise InputError(f"{where}: must be a whole number, got {value}")
            value = int(value)
        else:
            value = float(value)
    try:
        k.check(value)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    return value


FULL, SPECA, SPECDIFF, TAYLORSEER, FBCACHE = (
    "Full", "SpeCa", "SpecDiff", "TaylorSeerCache (diffusers)", "FirstBlockCache (diffusers)",
)

SPECA_HOW = """**SpeCa — forecast, then verify** ([arXiv 2509.11628](https://arxiv.org/abs/2509.11628)).
After a few full steps, each step is *forecast* with a Taylor series fitted on past full steps (TaylorSeer,
[arXiv 2503.06923](https://arxiv.org/abs/2503.06923)): by default the model's output, and the blocks' summed
contribution up to one block (*forecast* in the advanced settings), so most blocks are not computed. That block
is then *verified*: computed for real from the forecast input and compared with its forecast. An error above the
threshold (it tightens over the run: *decay*) rejects the step and it is computed fully. A higher threshold
accepts more steps: faster, further from the full run."""

SPECDIFF_HOW = """**SpecDiff — compute only the tokens that matter** ([arXiv 2509.13848](https://arxiv.org/abs/2509.13848)).
A short speculative pre-run of the same model records how much attention each image token will receive. Each
later step ranks tokens by importance (that future attention × past attention, boosted for tokens cached long)
and splits them in three *levels*: C1 is computed through the model, C2 reuses its last output, C3 averages its
last few outputs. The *cache rate* is the share of tokens not computed."""

TAYLORSEER_HOW = """**TaylorSeerCache (diffusers)** ([arXiv 2503.06923](https://arxiv.org/abs/2503.06923)). A full step every
*cache interval* steps; in between, a Taylor series forecasts the model's output. The lab starts in diffusers'
*lite mode* (advanced): forecast steps skip every block and forecast only the final projection, ~3.5x less
compute at interval 5 (the full mode forecasts only the blocks' attention outputs and still computes the rest of
every block: ~1.25x on FLUX.1-dev's shape). Nothing is verified: the schedule is fixed, so the error plot stays
empty."""

FBCACHE_HOW = """**FirstBlockCache (diffusers)**, after TeaCache. The first block always runs; when its residual changed
by less than the *threshold* since the last full step, the other blocks are skipped and their cached residual is
reused. Nothing is forecast or verified; the map shows the residual change. diffusers' default threshold 0.05
computes every step on the bundled tiny FLUX (its residual changes 0.09-0.18 a step), so the lab starts at 0.25."""

FULL_HOW = """**Full** — the plain pipeline, every block at every step: the reference the others are compared with."""

NO_SYNC = {"sync_timing": False}
"""The lab's runs never synchronise around a step (a sync per step would let the consumer's work, which holds
the GIL, starve the pipeline's kernel launches on a GPU): step times come from CUDA events there (see the
configs' `sync_timing`); on the CPU the setting changes nothing. The advanced accordion can tick it back."""

TABLE: list[LabMethod] = [
    LabMethod(FULL, "full", how=FULL_HOW, defaults=NO_SYNC),
    LabMethod(SPECA, "speca", ("threshold", "decay", "order"),
              linked={"metric": ("threshold", {"rel_l1": 3.0, "rel_l2": 0.3, "cosine": 0.05})}, how=SPECA_HOW,
              defaults=NO_SYNC),
    LabMethod(SPECDIFF, "specdiff", ("cache_rate", "starvation_scale"), how=SPECDIFF_HOW, defaults=NO_SYNC),
    LabMethod(TAYLORSEER, "taylorseer", ("cache_interval", "max_order"), fixed={"taylor_factors_dtype": "float32"},
              how=TAYLORSEER_HOW, defaults={"use_lite_mode": True, **NO_SYNC}),
    LabMethod(FBCACHE, "fbcache", ("threshold",), how=FBCACHE_HOW, defaults={"threshold": 0.25, **NO_SYNC}),
]
METHODS = [m.label for m in TABLE]


def by_name(name: str) -> LabMethod | None:
    """The table's entry for an accel method name (a trace's `method`), or None."""
    return next((m for m in TABLE if m.name == name), None)


def by_label(label) -> LabMethod:
    for m in TABLE:
        if m.label == label:
            return m
    raise InputError(f"unknown method {shorten(label)}: choose one of {METHODS}")

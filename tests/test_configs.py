"""Every field of every registered config: declared once (knob), validated strictly, fuzzed with bad values."""

import json
import math
from dataclasses import dataclass, fields

import pytest

import accel
from accel.config import ConfigBase, knob

CONFIGS = [m.config_cls for m in accel.methods()]


def _field_cases():
    for cls in CONFIGS:
        for k in accel.knobs(cls):
            yield pytest.param(cls, k, id=f"{cls.__name__}.{k.name}")


def _bad_values(k):
    """Values that field `k` must refuse, chosen from its kind and range (not from its validator)."""
    bad = [[], {}, object()]
    if not k.optional:
        bad.append(None)
    if k.kind in ("float", "int"):
        bad += [True, False, "1", float("nan"), float("inf"), -float("inf"), 10**400, -(10**400)]
        if k.kind == "int":
            bad += [1.5, 2.0]
        if k.minimum is not None:
            bad.append(k.minimum if k.exclusive_minimum else k.minimum - 1)
        if k.maximum is not None:
            bad.append(k.maximum if k.exclusive_maximum else k.maximum + 1)
    elif k.kind == "bool":
        bad += [1, 0, "True", 1.0]
    elif k.kind == "choice":
        bad += ["no-such-choice", 1, True, (k.choices[0],)]
    return bad


def test_every_method_is_registered_once_with_a_config():
    names = [m.name for m in accel.methods()]
    assert names == sorted(set(names), key=names.index)
    assert {"full", "speca", "specdiff", "taylorseer", "fbcache"} <= set(names)
    for m in accel.methods():
        assert accel.method(m.name) is m
        assert issubclass(m.config_cls, ConfigBase)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        accel.method("nope")


def test_a_method_name_cannot_be_taken_twice():
    @dataclass
    class OtherConfig(ConfigBase):
        x: int = knob(1, "x", minimum=0)

    with pytest.raises(ValueError, match="already registered"):
        accel.register_method("speca", OtherConfig)(lambda pipe, adapter, config: None)
    assert accel.method("speca").config_cls is accel.SpeCaConfig


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_help_and_a_label(cls):
    ks = accel.knobs(cls)
    assert [k.name for k in ks] == [f.name for f in fields(cls)], "every field is a knob"
    for k in ks:
        assert len(k.help) > 20 and k.label, k.name
        assert k.accepts(k.default), f"{k.name}'s default is refused by its own range"
        if k.slider() is not None:
            lo, hi, step = k.slider()
            assert lo < hi and step > 0
            assert k.accepts(lo) and k.accepts(hi), f"{k.name}'s slider offers values it refuses"
    cls()  # the defaults construct


@pytest.mark.parametrize("cls,k", list(_field_cases()))
def test_every_field_refuses_bad_values_naming_itself(cls, k):
    for value in _bad_values(k):
        with pytest.raises(ValueError) as e:
            cls(**{k.name: value})
        assert str(e.value).startswith(f"{k.name}="), str(e.value)
        assert "must be" in str(e.value)


@pytest.mark.parametrize("cls,k", list(_field_cases()))
def test_every_field_accepts_its_range_edges(cls, k):
    good = []
    if k.kind in ("float", "int") and k.slider() is not None:
        lo, hi, _ = k.slider()
        good += [lo, hi]
    if k.kind == "choice":
        good += list(k.choices)
    if k.kind == "bool":
        good += [True, False]
    if k.optional:
        good.append(None)
    for value in good:
        if k.name == "max_spec_steps":
            cfg = cls(**{k.name: value, "min_spec_steps": 0})
        elif k.name == "min_spec_steps":
            cfg = cls(**{k.name: value, "max_spec_steps": max(1, value)})
        else:
            cfg = cls(**{k.name: value})
        assert getattr(cfg, k.name) == value


def test_validate_catches_a_value_changed_after_construction():
    cfg = accel.SpeCaConfig()
    cfg.threshold = float("inf")
    with pytest.raises(ValueError, match="threshold=inf"):
        cfg.validate()


def test_speca_cross_field_rules():
    with pytest.raises(ValueError, match="max_spec_steps=1 is out of range"):
        accel.SpeCaConfig(min_spec_steps=2, max_spec_steps=1)
    for bad in ([], [False, True], [True, 1], "TTF", [True] * 100_001):
        with pytest.raises(ValueError, match="^schedule="):
            accel.SpeCaConfig(schedule=bad)
    assert accel.SpeCaConfig(schedule=(True, False)).schedule == [True, False]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_from_dict_round_trip_and_refusals(cls):
    cfg = cls()
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown .* field"):
        cls.from_dict({"no_such_field": 1})
    with pytest.raises(ValueError, match="built from a dict"):
        cls.from_dict("threshold=1")


def test_error_message_keeps_a_huge_value_short():
    with pytest.raises(ValueError) as e:
        accel.SpeCaConfig(metric="x" * 50_000_000)
    assert len(str(e.value)) < 300


def test_allowed_text_reads_like_the_range():
    k = {k.name: k for k in accel.knobs(accel.SpeCaConfig)}
    assert k["order"].allowed() == "an integer in 0..4"
    assert k["decay"].allowed() == "a finite number in (0, 1]"
    assert k["threshold"].allowed() == "a finite number >= 0"
    assert k["cache_dtype"].allowed().startswith("None or one of")
    assert math.isclose(accel.SpeCaConfig(threshold=2, decay=0.5).threshold_at(5, 10), 2 * 0.5**0.5)

"""`apply(pipe, config)`: attach a method to a diffusers pipeline; returns a `Handle`.

Methods register themselves with `@register_method(name, ConfigClass)` on their attach function, in their
own module (accel/speca.py, accel/specdiff.py, accel/baselines.py); `methods()` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from diffusers.hooks import HookRegistry

from .adapters import adapter_for
from .runtime import Handle


@dataclass(frozen=True)
class Method:
    """A registered method: its name (also the trace's `method`), its config class and its attach function
    `attach(pipe, adapter, config) -> Handle`."""

    name: str
    config_cls: type
    attach: Callable


_METHODS: dict[type, Method] = {}


def register_method(name: str, config_cls: type):
    """Decorator for a method's attach function: makes `apply` accept `config_cls`."""

    def decorate(attach: Callable) -> Callable:
        taken = [m for m in _METHODS.values() if m.name == name and m.config_cls is not config_cls]
        if taken:
            raise ValueError(f"method name {name!r} is already registered for {taken[0].config_cls.__name__}")
        _METHODS[config_cls] = Method(name, config_cls, attach)
        return attach

    return decorate


def methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def method(name: str) -> Method:
    """The registered method called `name` (e.g. "speca")."""
    for m in _METHODS.values():
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}: use one of {[m.name for m in _METHODS.values()]}")


def apply(pipe, config) -> Handle:
    """Attach the method that `config` describes to `pipe.transformer` (through diffusers hooks).

    `pipe` is a diffusers pipeline with `.transformer` and `.scheduler` (FluxPipeline, HunyuanVideoPipeline;
    see `accel.adapters.ADAPTERS`). The returned handle records a `Trace` per pipeline call (`handle.trace`) and
    `handle.remove()` restores the exact baseline. One method at a time per pipeline.
    """
    registered = _METHODS.get(type(config))
    if registered is None:
        names = ", ".join(c.__name__ for c in _METHODS)
        raise ValueError(f"unknown config {type(config).__name__}: pass one of {names}")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "scheduler"):
        raise ValueError(
            f"unsupported pipeline {type(pipe).__name__}: accel.apply needs a diffusers pipeline with a "
            "`transformer` and a `scheduler` (e.g. FluxPipeline)"
        )
    adapter = adapter_for(transformer)
    config.validate()
    if getattr(transformer, "is_cache_enabled", False):
        raise ValueError(
            "this transformer already has a diffusers cache enabled (enable_cache); call "
            "pipe.transformer.disable_cache() before accel.apply"
        )
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    taken = [n for n in registry.hooks if n.startswith("speclab_")]
    if taken:
        raise ValueError(f"SpecLab is already attached to this pipeline ({taken[0]}): call .remove() on its handle first")
    handle = registered.attach(pipe, adapter, config)
    registry.invalidate_child_registries_cache()
    return handle

"""`apply(pipe, config)`: attach a method to a diffusers pipeline; returns a `Handle`."""

from __future__ import annotations

from diffusers.hooks import HookRegistry

from .adapters import adapter_for
from .config import SpeCaConfig
from .runtime import Handle
from .speca import attach_speca

_METHODS = {SpeCaConfig: attach_speca}


def register_method(config_cls, attach) -> None:
    """Make `apply` accept another config class (used by accel's own methods)."""
    _METHODS[config_cls] = attach


def apply(pipe, config) -> Handle:
    """Attach the method that `config` describes to `pipe.transformer` (through diffusers hooks).

    `pipe` is a diffusers pipeline with `.transformer` and `.scheduler` (FluxPipeline; see
    `accel.adapters.ADAPTERS`). The returned handle records a `Trace` per pipeline call (`handle.trace`) and
    `handle.remove()` restores the exact baseline. One method at a time per pipeline.
    """
    attach = _METHODS.get(type(config))
    if attach is None:
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
    handle = attach(pipe, adapter, config)
    registry.invalidate_child_registries_cache()
    return handle

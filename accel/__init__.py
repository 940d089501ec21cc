"""SpecLab's acceleration library: speculative feature caching for diffusion transformers.

    import accel
    handle = accel.apply(pipe, accel.SpeCaConfig(threshold=7.0, decay=0.3, order=2))
    image = pipe(prompt).images[0]
    handle.trace.summary()
    handle.remove()

A method is one module (its config, hooks and attach function, registered with `@register_method`);
`accel.methods()` lists them and `accel.knobs(ConfigClass)` describes every field of a config.
Importable without Gradio or Plotly.
"""

from . import baselines, speca, specdiff  # noqa: F401  (each module registers its methods)
from .api import Method, apply, method, methods, register_method
from .calibrate import Calibration, calibrate, speed_knob
from .baselines import FirstBlockConfig, FullConfig, TaylorSeerConfig
from .config import ConfigBase, Knob, knob, knobs
from .runtime import Handle
from .speca import SpeCaConfig
from .specdiff import SpecDiffConfig
from .trace import StepRecord, Trace

__all__ = ["Calibration", "ConfigBase", "FirstBlockConfig", "FullConfig", "Handle", "Knob", "Method", "SpeCaConfig",
           "SpecDiffConfig", "StepRecord", "TaylorSeerConfig", "Trace", "apply", "calibrate", "knob", "knobs", "method",
           "methods", "register_method", "speed_knob"]
__version__ = "0.1.0"

"""SpecLab's acceleration library: speculative feature caching for diffusion transformers.

    import accel
    handle = accel.apply(pipe, accel.SpeCaConfig(threshold=7.0, decay=0.3, order=2))
    image = pipe(prompt).images[0]
    handle.trace.summary()
    handle.remove()

Importable without Gradio or Plotly.
"""

from .api import apply, register_method
from .baselines import FirstBlockConfig, FullConfig, TaylorSeerConfig
from .config import SpeCaConfig, SpecDiffConfig
from .runtime import Handle
from .specdiff import attach_specdiff
from .trace import StepRecord, Trace

register_method(SpecDiffConfig, attach_specdiff)

__all__ = ["Handle", "SpeCaConfig", "SpecDiffConfig", "StepRecord", "Trace", "apply"]
__all__ += ["FirstBlockConfig", "FullConfig", "TaylorSeerConfig"]
__version__ = "0.1.0"

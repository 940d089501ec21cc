"""The lab on a GPU: where a pipeline's weights go (all on the GPU, `enable_model_cpu_offload`, or a message),
how much memory a run needs, regional compilation of the transformer's blocks, and how long a ZeroGPU slice a
run asks for.

Every decision here is a pure function of numbers (bytes, tokens, steps), so that the CPU tests check it; the
estimates' constants were set against the H100 runs of `scripts/bench/gpu_lab.py` (README, "The lab at GPU
scale"), and a measured peak always wins over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GIB = 2**30
HEADROOM = 1.15
"""Free memory must exceed the estimate by this factor (allocator fragmentation, cuBLAS/cuDNN workspaces)."""


# ---- memory -----------------------------------------------------------------------------------------------------
def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (0 for anything that is not a torch module)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def component_bytes(pipe, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of each torch component of a diffusers pipeline, as stored in `dtype` if given (a pipeline loaded on
    the CPU in float32 that will run in bfloat16)."""
    out = {}
    for name, comp in getattr(pipe, "components", {}).items():
        if isinstance(comp, torch.nn.Module):
            n = module_bytes(comp)
            if dtype is not None:
                p = next(comp.parameters(), None)
                if p is not None and p.dtype.is_floating_point:
                    n = n * torch.empty((), dtype=dtype).element_size() // p.element_size()
            out[name] = n
    return out


@dataclass(frozen=True)
class Shape:
    """What the memory of one denoising step depends on."""

    tokens: int
    """Image (or video) tokens plus text tokens of one transformer call."""
    inner_dim: int
    """The transformer's hidden width (heads x head dim)."""
    blocks: int
    """Transformer blocks (double + single)."""
    pixels: int = 0
    """Decoded pixels (width x height x frames): the VAE's decode."""
    dtype_bytes: int = 2


def run_shape(transformer_config, width: int, height: int, multiple: int, frames: int | None = None,
              text_tokens: int = 512, temporal: int = 4) -> Shape:
    """The `Shape` of a run from the transformer's config and the request."""
    cfg = transformer_config
    heads = int(getattr(cfg, "num_attention_heads", 24))
    head_dim = int(getattr(cfg, "attention_head_dim", 128))
    blocks = int(getattr(cfg, "num_layers", 19)) + int(getattr(cfg, "num_single_layers", 38))
    latent_frames = 1 if frames is None else (frames - 1) // temporal + 1
    tokens = (width // multiple) * (height // multiple) * latent_frames + text_tokens
    return Shape(tokens, heads * head_dim, blocks, width * height * (frames or 1))


def slab(shape: Shape) -> int:
    """Bytes of one [tokens, inner_dim] activation: the unit every estimate below counts in."""
    return shape.tokens * shape.inner_dim * shape.dtype_bytes


def activation_bytes(shape: Shape) -> int:
    """Peak working memory of one transformer call and of the VAE's decode (the larger counts: they run one
    after the other). A single block's MLP holds 4 widths and attention's q/k/v/out 4 more: 16 slabs with what
    the block keeps alive; the decoder's largest stage holds ~3 feature maps of 128 channels at full size."""
    transformer = 16 * slab(shape)
    vae = 3 * 128 * shape.pixels * shape.dtype_bytes
    return max(transformer, vae)


def method_cache_bytes(method: str, shape: Shape, order: int = 1, forecast: str = "stack") -> int:
    """What a method keeps on the GPU between steps, in slabs of [tokens, inner_dim]:
    SpeCa's stack forecast keeps (order + 1) Taylor terms of the two streams that leave the last block plus the
    verified hidden state; the per-block forecast keeps (order + 1) terms of ~2 streams per block (measured on
    the H100: 6.2 GiB at 1024², order 1). SpecDiff keeps every block's K and V (2 slabs a block; measured on the
    H100 HunyuanVideo-sized: 12.9 GB extra at 18616 tokens, 2 slabs x 60 blocks). TaylorSeer (diffusers, lite)
    and FirstBlockCache keep one or two."""
    s = slab(shape)
    if method == "speca":
        if forecast == "per_block":
            return shape.blocks * 2 * (order + 1) * s
        return (2 * (order + 1) + 1) * s
    if method == "specdiff":
        return shape.blocks * 2 * s
    if method in ("taylorseer", "fbcache", "firstblockcache"):
        return 2 * s
    return 0


def peak_bytes(weights: int, shape: Shape, method: str = "full", **method_kw) -> int:
    """Estimated peak GPU memory of a run with every component on the GPU."""
    return weights + activation_bytes(shape) + method_cache_bytes(method, shape, **method_kw)


@dataclass(frozen=True)
class Placement:
    mode: str
    """"gpu": every component on the GPU; "offload": `enable_model_cpu_offload` (one component on the GPU at a
    time); "refuse": does not fit even so."""
    message: str
    """For the log, the model's status line, or the error (the problem and the fix)."""


def plan_placement(components: dict[str, int], work: int, free: int, total: int | None = None,
                   name: str = "this model") -> Placement:
    """Where a pipeline goes on a GPU with `free` bytes free (of `total`): everything on the GPU if the weights
    (`components`, bytes each) and the run's working memory `work` fit with `HEADROOM`; else model CPU offload
    if the largest component and the work fit (slower: each call moves the weights over PCIe); else a refusal
    saying how much is needed."""
    weights = sum(components.values())
    largest_name, largest = max(components.items(), key=lambda kv: kv[1]) if components else ("-", 0)
    need_all = (weights + work) * HEADROOM
    need_one = (largest + work) * HEADROOM
    gb = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    have = f"{gb(free)} free" + (f" of {gb(total)}" if total else "")
    if need_all <= free:
        return Placement("gpu", f"{name}: {gb(weights)} of weights + ~{gb(work)} per run fit in {have}")
    if need_one <= free:
        return Placement("offload", (
            f"{name}: {gb(weights)} of weights + ~{gb(work)} per run do not fit in {have}; its components go to "
            f"the GPU one at a time (enable_model_cpu_offload), which is slower. A GPU with at least "
            f"{gb(need_all)} free runs it without offloading (e.g. an L40S 48 GB or an A100/H100 80 GB)."))
    return Placement("refuse", (
        f"{name} does not fit on this GPU: its largest component ({largest_name}, {gb(largest)}) and ~{gb(work)} "
        f"of working memory need {gb(need_one)}, and there are {have}. Free the GPU (other processes), use a GPU "
        f"with at least {gb(need_all)} (e.g. an A100/H100 80 GB), or run a smaller model."))


def free_memory(device=None) -> tuple[int, int]:
    """(free, total) bytes of the current CUDA device."""
    return torch.cuda.mem_get_info(device)


# ---- regional compilation ---------------------------------------------------------------------------------------
class Compiled:
    """Regional compilation of a pipeline's transformer (`compile_repeated_blocks`: each repeated block compiled
    once, shared by all its instances), switchable per run: `set(True)` compiles the first time and reinstates the
    compiled blocks afterwards, `set(False)` puts the blocks back to eager (the compiled graphs are kept)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.blocks: list[tuple[torch.nn.Module, object]] = []
        self.on = False
        self.warmed: set = set()
        """Keys (method, size, steps...) of the runs whose graphs a warm-up call compiled already."""

    @property
    def compiled(self) -> bool:
        return bool(self.blocks)

    def set(self, on: bool) -> None:
        if on and not self.blocks:
            for name in ("recompile_limit", "cache_size_limit"):  # room for every method's variants
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self.transformer.compile_repeated_blocks(dynamic=True)
            self.blocks = [(m, m._compiled_call_impl) for m in self.transformer.modules()
                           if getattr(m, "_compiled_call_impl", None) is not None]
            if not self.blocks:
                raise RuntimeError("compile_repeated_blocks compiled no block")
        for m, fn in self.blocks:
            m._compiled_call_impl = fn if on else None
        self.on = on and bool(self.blocks)


# ---- ZeroGPU ------------------------------------------------------------------------------------------------------
STEP_S_LINEAR = 2.8e-5
STEP_S_QUADRATIC = 2.6e-9
REFERENCE_WIDTH, REFERENCE_BLOCKS = 3072, 57
"""Seconds of one full step of a transformer REFERENCE_BLOCKS blocks of REFERENCE_WIDTH wide ~ a * tokens +
b * tokens^2 (matrix products, attention): fitted on the H100's plain FLUX.1-dev-sized step at 1024² (4608
tokens, 0.184 s) and HunyuanVideo-sized (60 blocks of 3072) at 544x960x33 (18616 tokens, 1.42 s); other
widths and depths scale as their FLOPs (width² x blocks, width x blocks)."""


def step_seconds(shape: Shape) -> float:
    depth = shape.blocks / REFERENCE_BLOCKS
    width = shape.inner_dim / REFERENCE_WIDTH
    return (STEP_S_LINEAR * shape.tokens * width * width + STEP_S_QUADRATIC * shape.tokens ** 2 * width) * depth


def run_seconds(shape: Shape, steps: int, compare: bool = False, compile_warmup: bool = False,
                calibrate: bool = False) -> float:
    """An upper estimate of a run's GPU time: every step computed in full (an accelerated run takes less), the
    full reference again in compare mode, bisection runs when a target speedup is set, a compile warm-up."""
    t = steps * step_seconds(shape)
    total = t * (2 if compare else 1) + (5 * t if calibrate else 0) + (90 if compile_warmup else 0)
    return total


def zero_gpu_duration(shape: Shape, steps: int, compare: bool = False, compile_warmup: bool = False,
                      calibrate: bool = False, margin: float = 1.5, floor_s: int = 30, cap_s: int = 600) -> int:
    """The `duration` a run asks ZeroGPU for (seconds): the upper estimate with a margin, plus loading, within
    [floor_s, cap_s]. ZeroGPU ends the slice when it runs out, so it must not be short; a longer ask waits longer
    in ZeroGPU's queue, so it must not be huge either."""
    s = run_seconds(shape, steps, compare, compile_warmup, calibrate) * margin + 20
    return int(min(cap_s, max(floor_s, math.ceil(s))))

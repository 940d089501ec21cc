"""Context parallelism: SpeCa and SpecDiff on a transformer that diffusers shards over several processes
(`transformer.enable_parallelism(config=ContextParallelConfig(...))`, see docs/distributed.md).

Under context parallelism every rank runs the same pipeline call, but the transformer splits its token
sequences at its entry (text and image tokens alike, in equal contiguous chunks: rank r holds text tokens
`[r T/W, (r+1) T/W)` and image tokens `[r N/W, (r+1) N/W)`) and gathers the output at `proj_out`; attention
exchanges tokens between ranks (Ulysses all-to-all, or ring). Anything a method computes from the tokens a
block sees is therefore a shard, and a decision taken from a shard would differ between ranks: ranks would
run different blocks and wait forever on each other's collectives. So what a decision reads is made global
here, and every rank takes the same decision, equal to the single-process one up to float rounding:

- SpeCa's verification error: the per-row sums (`kernels.row_sums` / `torch_row_sums`) are summed over the
  rows of each rank, then all-reduced; the error is formed from the global sums (`kernels.errors_from_sums`).
- SpecDiff's attention received: the attention processor gathers the whole sequence for its share of the
  heads (Ulysses all-to-all), puts it in the single-process token order, and scores and caches K/V there;
  the per-head-group scores are all-reduced once per call. Importance, the C1 top-k and the level split are
  then computed from identical global scores on every rank.

Every rank's trace holds the same decisions (rank 0's is the record); `traces_agree` checks it.
Detection reads what diffusers records on the model (`_parallel_config`); without it everything here is a
no-op and the single-process paths run unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .adapters.base import TokenLayout

CP_INPUT_HOOK = "cp_input---"
"""The hook diffusers' `apply_context_parallel` registers on the transformer itself (the input split):
`diffusers.hooks.context_parallel._CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format("")`."""


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel setup of a transformer, as diffusers built it."""

    group: object
    """Process group of every rank the tokens are split over (the flattened ring x Ulysses mesh)."""
    world: int
    rank: int
    ring_degree: int
    ulysses_degree: int
    ulysses_group: object | None
    """The Ulysses group when the context parallelism is Ulysses only (ring degree 1), else None."""


def context_parallel(transformer) -> ContextParallel | None:
    """The context parallelism `enable_parallelism` set up on `transformer`, or None (none, a single rank,
    tensor parallelism only, or torch.distributed not initialised)."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or not dist.is_available() or not dist.is_initialized():
        return None
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() <= 1:
        return None
    group = mesh.get_group()
    ring, ulysses = int(cp.ring_degree or 1), int(cp.ulysses_degree or 1)
    pure_ulysses = ring == 1 and not getattr(cp, "ulysses_anything", False)
    return ContextParallel(group=group, world=mesh.size(), rank=dist.get_rank(group), ring_degree=ring,
                           ulysses_degree=ulysses, ulysses_group=cp._ulysses_mesh.get_group() if pure_ulysses else None)


def check_hook_order(transformer, hook_name: str) -> None:
    """Raise unless SpecLab's hook `hook_name` wraps diffusers' context-parallel input split: SpecLab must see
    the whole call (its token layout, the whole output), i.e. `accel.apply` after `enable_parallelism`."""
    registry = getattr(transformer, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", []))
    if CP_INPUT_HOOK in order and hook_name in order and order.index(hook_name) < order.index(CP_INPUT_HOOK):
        raise RuntimeError(
            "context parallelism was enabled after accel.apply: SpecLab would see one rank's shard of the tokens. "
            "Call handle.remove(), then accel.apply(pipe, config) again after transformer.enable_parallelism(...)."
        )


def shard_layout(layout: TokenLayout, cp: ContextParallel) -> TokenLayout:
    """The token layout one rank's blocks see: 1/world of the text and of the image tokens (the image grid
    flattened, since a shard need not be whole rows)."""
    if layout.n_text % cp.world or layout.n_image % cp.world:
        raise ValueError(
            f"context parallelism over {cp.world} ranks needs text and image token counts divisible by {cp.world}; "
            f"this call has {layout.n_text} text and {layout.n_image} image tokens: change the prompt length "
            "(max_sequence_length) or the image size")
    return TokenLayout(grid=(layout.n_image // cp.world,), n_text=layout.n_text // cp.world)


def all_reduce_sum(t: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """Sum of `t` over the ranks (a new tensor, the same on every rank)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=cp.group)
    return t


def gather_tokens(t: torch.Tensor, cp: ContextParallel, dim: int = 0) -> torch.Tensor:
    """The ranks' shards of `t` (equal shapes) concatenated along `dim` in rank order: the whole tensor."""
    parts = [torch.empty_like(t) for _ in range(cp.world)]
    dist.all_gather(parts, t.contiguous(), group=cp.group)
    return torch.cat(parts, dim=dim)


# ---- SpecDiff's attention under Ulysses ---------------------------------------------------------------
def canonical_order(seq_local: int, text_local: int, world: int, device) -> torch.Tensor:
    """Positions, in the sequence a Ulysses all-to-all gathers ([text_0, image_0, text_1, image_1, ...]: each
    rank's joint shard in rank order), of the single-process joint order [text, image]."""
    base = torch.arange(world, device=device)[:, None] * seq_local
    text = (base + torch.arange(text_local, device=device)).flatten()
    image = (base + torch.arange(text_local, seq_local, device=device)).flatten()
    return torch.cat([text, image])


def heads_to_sequence(x: torch.Tensor, cp: ContextParallel, order: torch.Tensor) -> torch.Tensor:
    """[B, S/W, H, D] on each rank -> [B, S, H/W, D]: the whole joint sequence (single-process order) for this
    rank's share of the heads."""
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    return _all_to_all_dim_exchange(x.contiguous(), 2, 1, cp.ulysses_group).index_select(1, order)


def sequence_to_heads(x: torch.Tensor, cp: ContextParallel, order: torch.Tensor) -> torch.Tensor:
    """The inverse of `heads_to_sequence`."""
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    back = torch.empty_like(x)
    back.index_copy_(1, order, x)
    return _all_to_all_dim_exchange(back, 1, 2, cp.ulysses_group)


# ---- traces --------------------------------------------------------------------------------------------
def traces_agree(trace, cp: ContextParallel | None) -> bool:
    """True when every rank's `trace` holds the same decisions (step, context, decision, reason, tokens
    computed), the same verification errors and the same token maps (SpecDiff's levels: the same C1);
    collective: every rank must call it. True without CP."""
    if cp is None:
        return True
    mine = [(r.step, r.context, r.decision, r.reason, r.tokens_computed, r.errors,
             sorted((k, hashlib.sha1(v.tobytes()).hexdigest()) for k, v in r.maps.items())) for r in trace.steps]
    everyone = [None] * cp.world
    dist.all_gather_object(everyone, mine, group=cp.group)
    return all(x == everyone[0] for x in everyone)


__all__ = ["ContextParallel", "all_reduce_sum", "canonical_order", "check_hook_order", "context_parallel",
           "gather_tokens", "heads_to_sequence", "sequence_to_heads", "shard_layout", "traces_agree"]

"""What every family's SpecDiff attention processor shares: the attention-received score, the K/V cache and
the attention call. A family processor (`accel/adapters/<family>/attention.py`) only projects its queries,
keys and values (norms, rotary embedding, joint token order) and splits the output; it hands the joint
sequence to `KVCacheAttnProcessor.attend`.

`attention_received` = for every key, the softmax attention it receives, averaged over heads and over the
(valid) queries given: the column means of the head-averaged softmax map. It is computed `chunk` queries at a
time, so memory is `chunk x keys x heads`, never the N x N map.

`AttnControl` is what SpecDiff's model hook tells the processors for the call in flight; its `mode` says what
`attend` does:

- `AttnMode.ORIGINAL`: SpecDiff is not in this call; the processor calls the processor it replaced.
- `AttnMode.DENSE`: every token came in. The attention is the same op as diffusers' processors (bit-identical
  output); optionally this layer's K and V (all tokens, after norm and RoPE) are kept as the K/V cache, and
  attention received is scored.
- `AttnMode.SUBSET`: only the computed tokens came in (text + C1 image tokens). Their K/V rows overwrite the
  cache rows (`control.rows` = their joint positions) and their queries attend over the whole cache, i.e. over
  every token: computed ones with fresh K/V, the others with the K/V of the step that last computed them.

The scores are computed on the side, from the same query/key tensors, and never touch the output path.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


class AttnMode(str, Enum):
    """What the K/V-caching processors do in the call in flight (module doc). The values are the strings
    `AttnControl.begin` also accepts; they are not the trace's step decisions (`accel.trace`)."""

    ORIGINAL = "off"
    DENSE = "full"
    SUBSET = "partial"


@torch.no_grad()
def attention_received(query: torch.Tensor, key: torch.Tensor, n_keys: int | None = None,
                       key_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                       chunk: int = 1024, *, key_start: int = 0, scale: float | None = None) -> torch.Tensor:
    """Attention received by the keys `key_start : key_start + n_keys` (all keys from `key_start` when
    `n_keys` is None), averaged over heads and over the valid queries: float32 [B, keys scored].

    `query` [B, Sq, H, D], `key` [B, Sk, H, D] (diffusers' sequence-dim-1 layout, after norm and RoPE).
    `key_mask` [B, Sk] / `query_mask` [B, Sq] bool (True = a real token) or None (all real): masked keys get
    no attention, masked queries give none. Without masks this equals
    `softmax(q k^T * scale).mean(heads).mean(queries)[:, key_start : key_start + n_keys]` (scale defaults to
    1/sqrt(D), as SDPA). The softmax runs in the inputs' dtype (fp32 math inside), the sums accumulate in
    float32. Keys after the scored range are dropped before the sums, keys before it after them: the order of
    the float32 sums, and so the scores' last bits, follow from this choice.
    """
    b, sq, h, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = query.transpose(1, 2).contiguous()  # B H Sq D
    kt = key.transpose(1, 2).contiguous().transpose(-1, -2)  # B H D Sk (a plain transposed-operand GEMM)
    bias = None
    if key_mask is not None:  # no host check for "all valid": the compute path stays sync-free
        bias = torch.zeros(b, 1, 1, key.shape[1], dtype=query.dtype, device=query.device)
        bias.masked_fill_(~key_mask.bool()[:, None, None, :], float("-inf"))
    query_weight = None if query_mask is None else query_mask.to(torch.float32)  # [B, Sq]
    stop = key.shape[1] if n_keys is None else key_start + n_keys
    acc = torch.zeros(b, stop, dtype=torch.float32, device=query.device)
    for s in range(0, sq, chunk):
        logits = torch.matmul(q[:, :, s:s + chunk], kt)  # B H c Sk
        logits.mul_(scale)
        if bias is not None:
            logits.add_(bias)
        probs = torch.softmax(logits, dim=-1)[..., :stop]
        if query_weight is not None:
            acc += torch.einsum("bhqk,bq->bk", probs.float(), query_weight[:, s:s + chunk])
        else:
            acc += probs.sum(dim=(1, 2), dtype=torch.float32)
    n_queries = float(sq) if query_weight is None else query_weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    return acc[:, key_start:] / (n_queries * h)


class AttnControl:
    """What the model hook tells the attention processors for the call in flight (one per attached pipeline)."""

    def __init__(self, score_every: int = 1, score_chunk: int = 1024):
        self.score_every = score_every
        self.score_chunk = score_chunk
        self.mode = AttnMode.ORIGINAL
        self.kv: dict | None = None
        """layer -> (K, V), [B, S_all, H, D]: the K/V cache of the current cache context."""
        self.store_kv = False
        self.rows: torch.Tensor | None = None
        """Joint-sequence positions of the tokens computed on a SUBSET call (text + C1 image tokens)."""
        self.key_start = 0
        """Where the image tokens start among the keys, for processors that cannot tell from their inputs
        (FLUX single blocks get text and image already joined)."""
        self.score = False
        self.scores: torch.Tensor | None = None
        """Accumulated attention received per image token, float32 [B, N_image] (sum over scored layers)."""
        self.score_pairs = 0
        """query x key scores computed in this call (batch x heads x queries x keys, summed over layers)."""
        self.score_layers = 0
        self.attn_pairs = 0
        """query x key pairs the attention itself computed in this call (same units as `score_pairs`)."""

    def begin(self, mode: AttnMode | str, kv: dict | None, store_kv: bool, score: bool, rows=None,
              key_start: int = 0):
        self.mode, self.kv, self.store_kv, self.score = AttnMode(mode), kv, store_kv, score
        self.rows, self.key_start = rows, key_start
        self.scores, self.score_pairs, self.score_layers, self.attn_pairs = None, 0, 0, 0

    def end(self) -> None:
        self.mode, self.kv, self.rows, self.score, self.store_kv = AttnMode.ORIGINAL, None, None, False, False

    def scores_layer(self, layer: int) -> bool:
        return self.score and layer % self.score_every == 0

    def add_scores(self, query: torch.Tensor, key: torch.Tensor, key_start: int, n_keys: int | None = None,
                   key_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> None:
        """Add one layer's attention received by the image keys `key_start : key_start + n_keys`."""
        s = attention_received(query, key, n_keys, key_mask, query_mask, self.score_chunk, key_start=key_start)
        self.scores = s if self.scores is None else self.scores + s
        b, sq, h, _ = query.shape
        self.score_pairs += b * h * sq * key.shape[1]
        self.score_layers += 1


class KVCacheAttnProcessor:
    """The base of every family's SpecDiff attention processor: its layer index, the run's control, and the
    processor it replaced (called in `AttnMode.ORIGINAL`, restored on remove), whose backend settings it keeps
    so that the attention call is the same op."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, control: AttnControl, original):
        self.layer = layer
        self.control = control
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def passes_through(self) -> bool:
        """SpecDiff is not in this call: the replaced processor does it."""
        return self.control.mode is AttnMode.ORIGINAL

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image_keys: slice,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the joint sequence given, through the K/V cache: [B, Sq, H * D] in the query dtype.

        `query`/`key`/`value` [B, S, H, D] after norm and RoPE, in the family's joint token order.
        `image_keys`: where the image tokens sit among the keys, valid for the tokens given and for the whole
        cache alike (a prefix or a suffix). `attention_mask`: None, or a boolean key mask [B, 1, 1, S] over the
        tokens given (True = a real token); on a SUBSET call it is widened to every cached key (the cached
        image keys are real; the tokens given keep theirs), and scoring honours it for keys and queries.
        """
        ctl = self.control
        query_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
        if ctl.mode is AttnMode.SUBSET:
            k_all, v_all = ctl.kv[self.layer]
            k_all.index_copy_(1, ctl.rows, key.to(k_all.dtype))
            v_all.index_copy_(1, ctl.rows, value.to(v_all.dtype))
            key, value = k_all, v_all
            if attention_mask is not None:
                full = attention_mask.new_ones(attention_mask.shape[0], key.shape[1])
                full[:, ctl.rows] = query_mask
                attention_mask = full[:, None, None, :]
        elif ctl.store_kv:
            ctl.kv[self.layer] = (key, value)  # no copy: these tensors are not used after this call
        if ctl.scores_layer(self.layer):
            key_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
            start, stop, _ = image_keys.indices(key.shape[1])
            ctl.add_scores(query, key, start, stop - start, key_mask, query_mask)
        ctl.attn_pairs += query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1]

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        return hidden_states.to(query.dtype)


__all__ = ["AttnControl", "AttnMode", "KVCacheAttnProcessor", "attention_received"]

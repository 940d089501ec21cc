"""Attention pieces SpecDiff needs: the chunked "attention received" score and a K/V-caching FLUX processor.

`attention_received` = for every key, the softmax attention it receives, averaged over heads and over the
queries given (column means of the head-averaged softmax map). It is computed `chunk` queries at a time, so
memory is `chunk x keys x heads`, never the N x N map.

`FluxSpecDiffAttnProcessor` replaces diffusers' `FluxAttnProcessor` on every `FluxAttention` while SpecDiff
is attached. Its behaviour depends on `AttnControl.mode`, set by SpecDiff's model hook around each call:

- "off": calls the original processor (nothing recorded).
- "full": the same ops as `FluxAttnProcessor`, in the same order (bit-identical output); optionally keeps
  this layer's K and V (all tokens, after norm and RoPE) as the K/V cache, and scores attention received.
- "partial": only the computed tokens came in (text + C1 image tokens; RoPE was computed from their ids).
  Their K/V rows overwrite the cache rows (`control.rows` = their joint positions), and their queries attend
  over the whole cache, i.e. over every token: computed ones with fresh K/V, the others with the K/V of the
  step that last computed them.

The scores are computed on the side, from the same query/key tensors, and never touch the output path.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

OFF, FULL, PARTIAL = "off", "full", "partial"


@torch.no_grad()
def attention_received(query: torch.Tensor, key: torch.Tensor, key_start: int = 0, chunk: int = 1024,
                       scale: float | None = None) -> torch.Tensor:
    """Attention each key receives, averaged over heads and queries: float32 [batch, keys - key_start].

    `query` [B, Sq, H, D], `key` [B, Sk, H, D] (diffusers' sequence-dim-1 layout, after norm and RoPE).
    Equals `softmax(q k^T * scale).mean(heads).mean(queries)[:, key_start:]` (scale defaults to 1/sqrt(D),
    as SDPA), computed `chunk` queries at a time. The softmax runs in the inputs' dtype (fp32 math inside),
    the sums accumulate in float32.
    """
    b, sq, h, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = query.transpose(1, 2).contiguous()  # B H Sq D
    kt = key.transpose(1, 2).contiguous().transpose(-1, -2)  # B H D Sk (a plain transposed-operand GEMM)
    acc = torch.zeros(b, key.shape[1], dtype=torch.float32, device=query.device)
    for s in range(0, sq, chunk):
        logits = torch.matmul(q[:, :, s:s + chunk], kt)  # B H c Sk
        logits.mul_(scale)
        probs = torch.softmax(logits, dim=-1)
        acc += probs.sum(dim=(1, 2), dtype=torch.float32)
    return acc[:, key_start:] / float(h * sq)


class AttnControl:
    """What the model hook tells the attention processors for the call in flight (one per attached pipeline)."""

    def __init__(self, score_every: int = 1, score_chunk: int = 1024):
        self.score_every = score_every
        self.score_chunk = score_chunk
        self.mode = OFF
        self.kv: dict | None = None
        """layer -> (K, V), [B, S_all, H, D]: the K/V cache of the current cache context."""
        self.store_kv = False
        self.rows: torch.Tensor | None = None
        """Joint-sequence positions of the tokens computed on a partial step (text + C1 image tokens)."""
        self.key_start = 0
        """Where the image tokens start among the keys (FLUX: after the text tokens)."""
        self.score = False
        self.scores: torch.Tensor | None = None
        """Accumulated attention received per image token, float32 [B, N_image] (sum over scored layers)."""
        self.score_pairs = 0
        """query x key scores computed in this call (batch x heads x queries x keys, summed over layers)."""
        self.score_layers = 0
        self.attn_pairs = 0
        """query x key pairs the attention itself computed in this call (same units as `score_pairs`)."""

    def begin(self, mode: str, kv: dict | None, store_kv: bool, score: bool, rows=None, key_start: int = 0):
        self.mode, self.kv, self.store_kv, self.score = mode, kv, store_kv, score
        self.rows, self.key_start = rows, key_start
        self.scores, self.score_pairs, self.score_layers, self.attn_pairs = None, 0, 0, 0

    def end(self) -> None:
        self.mode, self.kv, self.rows, self.score, self.store_kv = OFF, None, None, False, False

    def scores_layer(self, layer: int) -> bool:
        return self.score and layer % self.score_every == 0

    def add_scores(self, query: torch.Tensor, key: torch.Tensor) -> None:
        s = attention_received(query, key, self.key_start, self.score_chunk)
        self.scores = s if self.scores is None else self.scores + s
        b, sq, h, _ = query.shape
        self.score_pairs += b * h * sq * key.shape[1]
        self.score_layers += 1


class SpecDiffProcessorBase:
    """What every family's SpecDiff attention processor holds: its layer index, the run's control, and the
    processor it replaced (used when SpecDiff is off, restored on remove), whose backend settings it keeps."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, control: AttnControl, original):
        self.layer = layer
        self.control = control
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)


class FluxSpecDiffAttnProcessor(SpecDiffProcessorBase):
    """K/V-caching, attention-scoring processor for diffusers' `FluxAttention` (see the module doc).
    Same signature as `FluxAttnProcessor` (diffusers filters call kwargs by it)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctl = self.control
        if ctl.mode == OFF:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # ---- exactly FluxAttnProcessor up to the attention call ----
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # ---- SpecDiff: K/V cache ----
        if ctl.mode == PARTIAL:
            k_all, v_all = ctl.kv[self.layer]
            k_all.index_copy_(1, ctl.rows, key.to(k_all.dtype))
            v_all.index_copy_(1, ctl.rows, value.to(v_all.dtype))
            key, value = k_all, v_all
        elif ctl.store_kv:
            ctl.kv[self.layer] = (key, value)  # no copy: these tensors are not used after this call
        if ctl.scores_layer(self.layer):
            ctl.add_scores(query, key)
        ctl.attn_pairs += query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1]

        # ---- exactly FluxAttnProcessor from the attention call on ----
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

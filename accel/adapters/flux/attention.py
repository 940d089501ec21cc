"""SpecDiff's K/V-caching, attention-scoring processor for diffusers' `FluxAttention`, replacing
`FluxAttnProcessor` while SpecDiff is attached (the modes, the cache and the score: accel/adapters/kv_attention.py).

What is FLUX's own: the Q/K/V projections and their norms (`_get_qkv_projections`), the joint order [text,
image] (double blocks join the text and image projections here; single blocks get them already joined), RoPE
over the whole joint sequence (the model computes it from cat(txt_ids, img_ids), so a token subset's ids give
its rows), and the output split and projections. Up to the attention call and after it, the ops are
`FluxAttnProcessor`'s in the same order, so a DENSE call's output is bit-identical.

The image keys start at `control.key_start` (the text length; single blocks cannot tell it from their inputs).
FluxPipeline passes no attention mask; a mask given through `joint_attention_kwargs` must be a key mask
[B, 1, 1, S] (`KVCacheAttnProcessor.attend`).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..kv_attention import KVCacheAttnProcessor


class FluxSpecDiffAttnProcessor(KVCacheAttnProcessor):
    """Same signature as `FluxAttnProcessor` (diffusers filters call kwargs by it)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.passes_through():
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

        # ---- the shared K/V cache, score and attention call ----
        hidden_states = self.attend(query, key, value, None, attention_mask)  # image keys from control.key_start

        # ---- exactly FluxAttnProcessor after the attention call ----
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

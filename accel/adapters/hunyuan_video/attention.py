"""SpecDiff's K/V-caching, attention-scoring processor for HunyuanVideo's attention (diffusers `Attention` with
`HunyuanVideoAttnProcessor2_0`), the counterpart of `flux.attention.FluxSpecDiffAttnProcessor` (the modes, the
cache and the score: accel/adapters/kv_attention.py).

What is HunyuanVideo's own:
- Joint token order is [image, text] (double blocks: image Q/K/V then the `add_*_proj` text Q/K/V; single
  blocks: [image, text] concatenated by the processor); RoPE is applied to the image rows only. The image keys
  are every key but the last `n_text`, in the cache as in the tokens given.
- A boolean key mask [B, 1, 1, image + text] hides the padding text tokens. On a SUBSET call the model builds
  it for the tokens it was given (text + C1); `attend` widens it to every cached key and scores with it
  (padding keys get no attention, padding queries give none).
- Calls without text (none in HunyuanVideo's blocks) go to the original processor.

Up to the attention call and after it, the ops are `HunyuanVideoAttnProcessor2_0`'s in the same order, so a
DENSE call's output is bit-identical.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..kv_attention import KVCacheAttnProcessor


class HunyuanVideoSpecDiffAttnProcessor(KVCacheAttnProcessor):
    """Same signature as `HunyuanVideoAttnProcessor2_0` (diffusers' `Attention` filters kwargs by it)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.passes_through() or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_txt = encoder_hidden_states.shape[1]
        # ---- exactly HunyuanVideoAttnProcessor2_0 up to the attention call ----
        if attn.add_q_proj is None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if attn.add_q_proj is None:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-n_txt], image_rotary_emb, sequence_dim=1), query[:, -n_txt:]], dim=1
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-n_txt], image_rotary_emb, sequence_dim=1), key[:, -n_txt:]], dim=1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # ---- the shared K/V cache, key mask, score and attention call ----
        hidden_states = self.attend(query, key, value, slice(0, -n_txt), attention_mask)

        # ---- exactly HunyuanVideoAttnProcessor2_0 after the attention call ----
        hidden_states, encoder_hidden_states = hidden_states[:, :-n_txt], hidden_states[:, -n_txt:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

"""SpecDiff's K/V-caching, attention-scoring processor for HunyuanVideo's attention (diffusers `Attention` with
`HunyuanVideoAttnProcessor2_0`), the counterpart of `accel.attention.FluxSpecDiffAttnProcessor`.

What differs from FLUX:
- Joint token order is [image, text] (double blocks: image Q/K/V then the `add_*_proj` text Q/K/V; single
  blocks: [image, text] concatenated by the processor); RoPE is applied to the image rows only.
- A boolean key mask [B, 1, 1, image + text] hides the padding text tokens. On a partial step the model
  builds it for the tokens it was given (text + C1); the processor widens it to every cached key (image keys
  are always valid; the text part is the one given).
- "Attention received" is scored with the same mask (padding keys get no attention, padding queries give
  none), over the image keys, which come first.

Modes (set by SpecDiff's model hook through `AttnControl`): "off" calls the original processor; "full" runs
the same ops as `HunyuanVideoAttnProcessor2_0` in the same order (bit-identical output), optionally keeping
K/V (all tokens, after norm and RoPE) and scoring; "partial" overwrites the cache rows of the tokens given
(`control.rows`) and attends over the whole cache.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .attention import OFF, PARTIAL, SpecDiffProcessorBase


@torch.no_grad()
def attention_received_masked(query: torch.Tensor, key: torch.Tensor, n_keys: int, key_mask: torch.Tensor | None,
                              query_mask: torch.Tensor | None, chunk: int = 1024) -> torch.Tensor:
    """Attention each of the first `n_keys` keys receives, averaged over heads and over the valid queries:
    float32 [B, n_keys]. `query` [B, Sq, H, D], `key` [B, Sk, H, D]; `key_mask` [B, Sk] / `query_mask` [B, Sq]
    bool (True = valid), or None (all valid). Computed `chunk` queries at a time."""
    b, sq, h, d = query.shape
    scale = 1.0 / math.sqrt(d)
    q = query.transpose(1, 2).contiguous()
    kt = key.transpose(1, 2).contiguous().transpose(-1, -2)
    bias = None
    if key_mask is not None:  # no host check for "all valid": the compute path stays sync-free
        bias = torch.zeros(b, 1, 1, key.shape[1], dtype=query.dtype, device=query.device)
        bias.masked_fill_(~key_mask.bool()[:, None, None, :], float("-inf"))
    qw = None if query_mask is None else query_mask.to(torch.float32)  # [B, Sq]
    acc = torch.zeros(b, n_keys, dtype=torch.float32, device=query.device)
    for s in range(0, sq, chunk):
        logits = torch.matmul(q[:, :, s:s + chunk], kt)  # B H c Sk, in the inputs' dtype (as accel.attention)
        logits.mul_(scale)
        if bias is not None:
            logits.add_(bias)
        probs = torch.softmax(logits, dim=-1)[..., :n_keys]
        if qw is not None:
            acc += torch.einsum("bhqk,bq->bk", probs.float(), qw[:, s:s + chunk])
        else:
            acc += probs.sum(dim=(1, 2), dtype=torch.float32)
    n_q = float(sq) if qw is None else qw.sum(dim=1, keepdim=True).clamp_min(1.0)
    return acc / (n_q * h)


class HunyuanVideoSpecDiffAttnProcessor(SpecDiffProcessorBase):
    """Same signature as `HunyuanVideoAttnProcessor2_0` (diffusers' `Attention` filters kwargs by it)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctl = self.control
        if ctl.mode == OFF or encoder_hidden_states is None:
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

        # ---- SpecDiff: K/V cache, key mask over the whole cache ----
        query_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
        if ctl.mode == PARTIAL:
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
        n_img = key.shape[1] - n_txt  # image keys come first
        if ctl.scores_layer(self.layer):
            key_mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
            s = attention_received_masked(query, key, n_img, key_mask, query_mask, ctl.score_chunk)
            ctl.scores = s if ctl.scores is None else ctl.scores + s
            ctl.score_pairs += query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1]
            ctl.score_layers += 1
        ctl.attn_pairs += query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1]

        # ---- exactly HunyuanVideoAttnProcessor2_0 from the attention call on ----
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :-n_txt], hidden_states[:, -n_txt:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

"""FLUX (diffusers `FluxTransformer2DModel`): 19 double-stream then 38 single-stream blocks at full size.

- Double-stream then single-stream blocks (`DualStreamAdapter`, accel/adapters/dual_stream.py); SpecDiff's
  attention processor is `FluxSpecDiffAttnProcessor` (attention.py, next to this file).
- Blocks are called with keyword arguments and return `(encoder_hidden_states, hidden_states)`.
- Joint attention orders tokens [text, image].
- Double block features (pre-gate): image/text attention outputs after their out-projections, image/text
  MLP outputs. Single block feature: the output of `proj_out` (attention and MLP fused), before the gate.
- The transformer receives `timestep / 1000`.
"""

from __future__ import annotations

import torch

from ..base import TokenLayout
from ..dual_stream import DualStreamAdapter
from .attention import FluxSpecDiffAttnProcessor


class FluxAdapter(DualStreamAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    timestep_scale = 1000.0
    text_first = True
    output_order = ("txt", "img")
    clip_fp16 = True
    supports_context_parallel = True  # diffusers' FluxTransformer2DModel._cp_plan splits txt and img tokens
    supports_text_cache = True  # the model takes 0 text tokens (0 rows of txt_ids); text meets image in attention only

    def token_layout(self, args, kwargs) -> TokenLayout:
        img_ids = self.call_args.get(args, kwargs, "img_ids")
        enc = self.call_args.get(args, kwargs, "encoder_hidden_states")
        hidden = self.call_args.get(args, kwargs, "hidden_states")
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            ids = ids.detach().to("cpu")
            h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            if h * w != hidden.shape[1]:  # ids that are not a plain grid: fall back to one row
                h, w = 1, hidden.shape[1]
        else:
            h, w = 1, hidden.shape[1]
        return TokenLayout(grid=(h, w), n_text=enc.shape[1])

    def rotary_modules(self):
        return [self.transformer.pos_embed]

    # ---- SpecDiff ----------------------------------------------------------------------------
    # FLUX attention: double blocks concatenate [text, image] queries/keys inside the processor; single
    # blocks get [text, image] already concatenated. The rotary embedding is computed by the model from
    # cat(txt_ids, img_ids), so restricting img_ids restricts RoPE to the same tokens.
    def kv_cache_processor(self, attn, layer: int, control):
        return FluxSpecDiffAttnProcessor(layer, control, attn.processor)

    def with_call_inputs(self, args, kwargs, latents=None, timestep=None, image_index=None, text=True):
        new = {}
        if not text:  # no text token: the attention layers read the text rows from their K/V caches
            enc = self.call_args.get(args, kwargs, "encoder_hidden_states")
            txt_ids = self.call_args.get(args, kwargs, "txt_ids")
            new["encoder_hidden_states"] = enc[:, :0]
            new["txt_ids"] = txt_ids[..., :0, :]
        hidden = latents if latents is not None else self.call_args.get(args, kwargs, "hidden_states")
        if timestep is not None:
            new["timestep"] = timestep
        if image_index is not None:
            hidden = hidden.index_select(1, image_index)
            img_ids = self.call_args.get(args, kwargs, "img_ids")
            new["img_ids"] = img_ids.index_select(img_ids.ndim - 2, image_index)
        new["hidden_states"] = hidden
        return self.call_args.replace(args, kwargs, **new)

    def step_embeddings(self, args, kwargs, scheduler_timesteps):
        # FluxPipeline calls the model with timestep = t.expand(B).to(latents.dtype) / 1000, and the model
        # embeds timestep.to(hidden dtype) * 1000 (and guidance likewise) with the pooled text projection.
        t = self.transformer
        get = self.call_args.get
        hidden, call_ts = get(args, kwargs, "hidden_states"), get(args, kwargs, "timestep")
        pooled, guidance = get(args, kwargs, "pooled_projections"), get(args, kwargs, "guidance")
        n, b = scheduler_timesteps.shape[0], call_ts.shape[0]
        ts = scheduler_timesteps.to(call_ts.device)[:, None].expand(n, b).to(call_ts.dtype) / self.timestep_scale
        ts = ts.reshape(-1).to(hidden.dtype) * 1000
        pooled = pooled.repeat(n, 1)
        with torch.no_grad():
            if guidance is None:
                temb = t.time_text_embed(ts, pooled)
            else:
                temb = t.time_text_embed(ts, guidance.repeat(n).to(hidden.dtype) * 1000, pooled)
        return temb.reshape(n, b, -1)

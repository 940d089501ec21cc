"""FLUX (diffusers `FluxTransformer2DModel`): 19 double-stream then 38 single-stream blocks at full size.

- Blocks are called with keyword arguments and return `(encoder_hidden_states, hidden_states)`.
- Joint attention orders tokens [text, image].
- Double block features (pre-gate): image/text attention outputs after their out-projections, image/text
  MLP outputs. Single block feature: the output of `proj_out` (attention and MLP fused), before the gate.
- The transformer receives `timestep / 1000`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, BlockSpec, Contribution, FeatureSite, GateSite, TokenLayout, arg

# Positions of the block arguments (FluxTransformerBlock / FluxSingleTransformerBlock.forward).
_HIDDEN, _ENCODER, _TEMB = 0, 1, 2


class FluxAdapter(Adapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    timestep_scale = 1000.0

    def blocks(self) -> list[BlockSpec]:
        t = self.transformer
        specs = [BlockSpec(i, f"transformer_blocks.{i}", "double", b) for i, b in enumerate(t.transformer_blocks)]
        n = len(specs)
        specs += [
            BlockSpec(n + i, f"single_transformer_blocks.{i}", "single", b)
            for i, b in enumerate(t.single_transformer_blocks)
        ]
        return specs

    def token_layout(self, args, kwargs) -> TokenLayout:
        img_ids = arg(args, kwargs, 4, "img_ids")
        enc = arg(args, kwargs, 1, "encoder_hidden_states")
        hidden = arg(args, kwargs, 0, "hidden_states")
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            ids = ids.detach().to("cpu")
            h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            if h * w != hidden.shape[1]:  # ids that are not a plain grid: fall back to one row
                h, w = 1, hidden.shape[1]
        else:
            h, w = 1, hidden.shape[1]
        return TokenLayout(grid=(h, w), n_text=enc.shape[1])

    def feature_sites(self, block: BlockSpec) -> list[FeatureSite]:
        m = block.module
        if block.kind == "double":
            return [
                FeatureSite(m.attn, ("attn", "attn_ctx"), index=(0, 1)),
                FeatureSite(m.ff, ("ff",)),
                FeatureSite(m.ff_context, ("ff_ctx",)),
            ]
        return [FeatureSite(m.proj_out, ("proj_out",))]

    def gate_sites(self, block: BlockSpec) -> list[GateSite]:
        m = block.module
        if block.kind == "double":
            # AdaLayerNormZero chunks: shift_msa, scale_msa, gate_msa(2), shift_mlp, scale_mlp, gate_mlp(5)
            return [GateSite("attn", m.norm1.linear, 6, 2), GateSite("ff", m.norm1.linear, 6, 5),
                    GateSite("attn_ctx", m.norm1_context.linear, 6, 2), GateSite("ff_ctx", m.norm1_context.linear, 6, 5)]
        # AdaLayerNormZeroSingle chunks: shift, scale, gate(2)
        return [GateSite("proj_out", m.norm.linear, 3, 2)]

    def gate_input(self, temb):
        return F.silu(temb)

    def block_temb(self, args, kwargs):
        return arg(args, kwargs, _TEMB, "temb")

    def contributions(self, block: BlockSpec, layout: TokenLayout) -> list[Contribution]:
        if block.kind == "double":
            return [Contribution("img", "attn"), Contribution("img", "ff"),
                    Contribution("txt", "attn_ctx"), Contribution("txt", "ff_ctx")]
        # A single block concatenates [text, image], adds gate * proj_out and splits again: the same as
        # adding the text rows to the text stream and the image rows to the image stream.
        return [Contribution("txt", "proj_out", 0), Contribution("img", "proj_out", layout.n_text)]

    def block_streams(self, args, kwargs):
        return {"img": arg(args, kwargs, _HIDDEN, "hidden_states"), "txt": arg(args, kwargs, _ENCODER, "encoder_hidden_states")}

    def block_output(self, block: BlockSpec, streams):
        hidden, encoder = streams["img"], streams["txt"]
        if hidden.dtype == torch.float16:  # as the blocks do
            hidden, encoder = hidden.clip(-65504, 65504), encoder.clip(-65504, 65504)
        return encoder, hidden

    def with_block_streams(self, args, kwargs, streams):
        args, kwargs = list(args), dict(kwargs)
        for pos, name, stream in ((_HIDDEN, "hidden_states", "img"), (_ENCODER, "encoder_hidden_states", "txt")):
            if name in kwargs or pos >= len(args):
                kwargs[name] = streams[stream]
            else:
                args[pos] = streams[stream]
        return tuple(args), kwargs

    def verify_feature(self, block: BlockSpec) -> str:
        return "ff" if block.kind == "double" else "proj_out"

    def image_tokens(self, block: BlockSpec, feature: str, layout: TokenLayout) -> slice:
        if block.kind == "single":
            return slice(layout.n_text, None)
        return slice(None) if feature in ("attn", "ff") else slice(0, 0)

    # ---- SpecDiff ----------------------------------------------------------------------------
    # FLUX attention: double blocks concatenate [text, image] queries/keys inside the processor; single
    # blocks get [text, image] already concatenated. The rotary embedding is computed by the model from
    # cat(txt_ids, img_ids), so restricting img_ids restricts RoPE to the same tokens.
    # Positions of the transformer's forward arguments (FluxTransformer2DModel.forward).
    _M_HIDDEN, _M_TIMESTEP, _M_IMG_IDS = 0, 3, 4

    def attention_modules(self) -> list:
        t = self.transformer
        return [b.attn for b in t.transformer_blocks] + [b.attn for b in t.single_transformer_blocks]

    def kv_cache_processor(self, attn, layer: int, control):
        from ..attention import FluxSpecDiffAttnProcessor

        return FluxSpecDiffAttnProcessor(layer, control, attn.processor)

    def joint_rows(self, layout: TokenLayout, image_index: torch.Tensor) -> torch.Tensor:
        text = torch.arange(layout.n_text, device=image_index.device, dtype=image_index.dtype)
        return torch.cat([text, image_index + layout.n_text])

    def image_key_start(self, layout: TokenLayout) -> int:
        return layout.n_text

    def call_latents(self, args, kwargs) -> torch.Tensor:
        return arg(args, kwargs, self._M_HIDDEN, "hidden_states")

    def call_timestep(self, args, kwargs) -> torch.Tensor:
        return arg(args, kwargs, self._M_TIMESTEP, "timestep")

    def with_call_inputs(self, args, kwargs, latents=None, timestep=None, image_index=None):
        args, kwargs = list(args), dict(kwargs)

        def put(pos: int, name: str, value) -> None:
            if name in kwargs or pos >= len(args):
                kwargs[name] = value
            else:
                args[pos] = value

        hidden = latents if latents is not None else arg(args, kwargs, self._M_HIDDEN, "hidden_states")
        if timestep is not None:
            put(self._M_TIMESTEP, "timestep", timestep)
        if image_index is not None:
            hidden = hidden.index_select(1, image_index)
            img_ids = arg(args, kwargs, self._M_IMG_IDS, "img_ids")
            put(self._M_IMG_IDS, "img_ids", img_ids.index_select(img_ids.ndim - 2, image_index))
        put(self._M_HIDDEN, "hidden_states", hidden)
        return tuple(args), kwargs


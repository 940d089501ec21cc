"""What FLUX-like transformers share: double-stream blocks (separate image and text streams, each with adaLN
`norm1`/`norm1_context`, joint `attn`, `ff`/`ff_context`) followed by single-stream blocks (one joint stream,
adaLN `norm`, attention and MLP fused through `proj_out`). A family of this shape subclasses `DualStreamAdapter`
and states only what differs: token order, block output order, token layout, how a call is restricted to a
token subset, and its attention processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, BlockSpec, CallArgs, Contribution, FeatureSite, GateSite, TokenLayout

BLOCK_STREAMS = {"img": "hidden_states", "txt": "encoder_hidden_states"}
"""The block arguments that carry each residual stream."""


class DualStreamAdapter(Adapter):
    text_first = True
    """Joint attention / single-block token order: [text, image] (FLUX) or [image, text] (HunyuanVideo)."""
    output_order = ("txt", "img")
    """What a block returns: FLUX (encoder_hidden_states, hidden_states); HunyuanVideo the reverse."""
    clip_fp16 = False
    """The blocks clip float16 outputs to the float16 range (FLUX does)."""

    def __init__(self, transformer):
        super().__init__(transformer)
        self.block_args = CallArgs.shared(list(dict.fromkeys(type(b.module) for b in self.blocks())),
                                          (*BLOCK_STREAMS.values(), "temb"))
        """The blocks' arguments by name (double and single blocks take the streams and temb at the same
        positions, checked here, so one binding serves every block call)."""

    # ---- structure -------------------------------------------------------------------
    def blocks(self) -> list[BlockSpec]:
        t = self.transformer
        specs = [BlockSpec(i, f"transformer_blocks.{i}", "double", b) for i, b in enumerate(t.transformer_blocks)]
        n = len(specs)
        specs += [
            BlockSpec(n + i, f"single_transformer_blocks.{i}", "single", b)
            for i, b in enumerate(t.single_transformer_blocks)
        ]
        return specs

    def block_containers(self):
        t = self.transformer
        return [(t, "transformer_blocks"), (t, "single_transformer_blocks")]

    # ---- SpeCa -------------------------------------------------------------------------------
    def feature_sites(self, block: BlockSpec) -> list[FeatureSite]:
        m = block.module
        if block.kind == "double":
            # attn returns (image attention output, text attention output), both after their out-projections
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
            img, txt = m.norm1.linear, m.norm1_context.linear
            return [GateSite("attn", img, 6, 2), GateSite("ff", img, 6, 5),
                    GateSite("attn_ctx", txt, 6, 2), GateSite("ff_ctx", txt, 6, 5)]
        # AdaLayerNormZeroSingle chunks: shift, scale, gate(2)
        return [GateSite("proj_out", m.norm.linear, 3, 2)]

    def gate_input(self, temb):
        return F.silu(temb)

    def block_temb(self, args, kwargs):
        return self.block_args.get(args, kwargs, "temb")

    def contributions(self, block: BlockSpec, layout: TokenLayout) -> list[Contribution]:
        if block.kind == "double":
            return [Contribution("img", "attn"), Contribution("img", "ff"),
                    Contribution("txt", "attn_ctx"), Contribution("txt", "ff_ctx")]
        # A single block concatenates the two streams, adds gate * proj_out and splits again: the same as
        # adding each stream's rows of proj_out to that stream.
        if self.text_first:
            return [Contribution("txt", "proj_out", 0), Contribution("img", "proj_out", layout.n_text)]
        return [Contribution("img", "proj_out", 0), Contribution("txt", "proj_out", layout.n_image)]

    def block_streams(self, args, kwargs):
        return {stream: self.block_args.get(args, kwargs, name) for stream, name in BLOCK_STREAMS.items()}

    def block_output(self, block: BlockSpec, streams):
        if self.clip_fp16 and streams["img"].dtype == torch.float16:  # as the blocks do
            streams = {k: v.clip(-65504, 65504) for k, v in streams.items()}
        return tuple(streams[s] for s in self.output_order)

    def output_streams(self, block: BlockSpec, output):
        return dict(zip(self.output_order, output))

    def with_block_streams(self, args, kwargs, streams):
        return self.block_args.replace(args, kwargs, **{name: streams[s] for s, name in BLOCK_STREAMS.items()})

    def verify_feature(self, block: BlockSpec) -> str:
        return "ff" if block.kind == "double" else "proj_out"

    def image_tokens(self, block: BlockSpec, feature: str, layout: TokenLayout) -> slice:
        if block.kind == "single":
            return slice(layout.n_text, None) if self.text_first else slice(0, layout.n_image)
        return slice(None) if feature in ("attn", "ff") else slice(0, 0)

    # ---- SpecDiff ----------------------------------------------------------------------------
    def attention_modules(self) -> list:
        t = self.transformer
        return [b.attn for b in t.transformer_blocks] + [b.attn for b in t.single_transformer_blocks]

    def joint_rows(self, layout: TokenLayout, image_index: torch.Tensor, text: bool = True) -> torch.Tensor:
        image = image_index + layout.n_text if self.text_first else image_index
        if not text:
            return image
        text_rows = torch.arange(layout.n_text, device=image_index.device, dtype=image_index.dtype)
        if self.text_first:
            return torch.cat([text_rows, image])
        return torch.cat([image, text_rows + layout.n_image])

    def modulation_linears(self) -> list:
        t = self.transformer
        mods = []
        for b in t.transformer_blocks:
            mods += [b.norm1.linear, b.norm1_context.linear]
        mods += [b.norm.linear for b in t.single_transformer_blocks]
        norm_out = getattr(t, "norm_out", None)
        if norm_out is not None and isinstance(getattr(norm_out, "linear", None), nn.Linear):
            mods.append(norm_out.linear)
        return mods

    def image_key_start(self, layout: TokenLayout) -> int:
        return layout.n_text if self.text_first else 0

    def call_latents(self, args, kwargs) -> torch.Tensor:
        return self.call_args.get(args, kwargs, "hidden_states")

    def call_timestep(self, args, kwargs) -> torch.Tensor:
        return self.call_args.get(args, kwargs, "timestep")

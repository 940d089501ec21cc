"""HunyuanVideo (diffusers `HunyuanVideoTransformer3DModel`): 20 double-stream then 40 single-stream blocks at
full size (24 heads x 128).

- The transformer takes 5-D latents [B, C, F, H, W] and patchifies them itself (Conv3d, patch
  (patch_size_t, patch_size, patch_size)): the image tokens are the (frames, h, w) grid after patching, in
  that order (frame-major). Its output is unpatchified back to [B, C, F, H, W]; one token's output vector is
  the final `proj_out` row, channels ordered (C, p_t, p, p).
- Blocks are called with POSITIONAL arguments `(hidden_states, encoder_hidden_states, temb, attention_mask,
  image_rotary_emb, token_replace_emb, first_frame_num_tokens)` and return `(hidden_states,
  encoder_hidden_states)` (the reverse of FLUX).
- Joint attention orders tokens [image, text] (FLUX: [text, image]); single blocks concatenate [image, text].
  RoPE covers the image tokens only. The text tokens beyond each prompt's length are padding: the model
  builds a key mask [B, 1, 1, image + text] from `encoder_attention_mask`.
- Double block features (pre-gate): image/text attention outputs after their out-projections, image/text
  MLP outputs; gates: chunks 2 (msa) and 5 (mlp) of the 6 of `norm1` / `norm1_context` (AdaLayerNormZero on
  silu(temb)). Single block feature: the output of `proj_out` (attention and MLP fused), before the gate
  (chunk 2 of the 3 of `norm`, AdaLayerNormZeroSingle).
- The transformer receives the scheduler timestep as is (0..1000).
- Image-conditioned variants (`image_condition_type` "token_replace" / "latent_concat", HunyuanVideo-I2V)
  are not supported.

SpecDiff on a token subset: the transformer cannot take a subset of its latents (it patchifies a dense 5-D
tensor and computes RoPE from its shape), so `run_subset` runs the dense call and, through forward hooks
held for that call only, keeps the C1 rows after the patch embedding and of the RoPE tables, then scatters
the final `proj_out` rows back into a dense token tensor so that the model's unpatchify still works. The
blocks, the attention and the output norm see only text + C1 tokens; the patch embedding (one Conv3d) runs
on every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, BlockSpec, Contribution, FeatureSite, GateSite, TokenLayout, arg

# Positions of the block arguments (HunyuanVideo(Single)TransformerBlock.forward).
_HIDDEN, _ENCODER, _TEMB = 0, 1, 2


class HunyuanVideoAdapter(Adapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    timestep_scale = 1.0

    def __init__(self, transformer):
        kind = getattr(getattr(transformer, "config", None), "image_condition_type", None)
        if kind is not None:
            raise ValueError(
                f"unsupported model: HunyuanVideoTransformer3DModel with image_condition_type={kind!r} "
                "(HunyuanVideo image-to-video) has no SpecLab adapter yet; only text-to-video "
                "(image_condition_type=None) is supported"
            )
        super().__init__(transformer)

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

    def _patch(self) -> tuple[int, int]:
        c = self.transformer.config
        return int(c.patch_size_t), int(c.patch_size)

    def token_layout(self, args, kwargs) -> TokenLayout:
        hidden = arg(args, kwargs, self._M_HIDDEN, "hidden_states")
        enc = arg(args, kwargs, self._M_ENCODER, "encoder_hidden_states")
        pt, p = self._patch()
        _, _, f, h, w = hidden.shape
        return TokenLayout(grid=(f // pt, h // p, w // p), n_text=enc.shape[1])

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
            ctx = m.norm1_context.linear
            return [GateSite("attn", m.norm1.linear, 6, 2), GateSite("ff", m.norm1.linear, 6, 5),
                    GateSite("attn_ctx", ctx, 6, 2), GateSite("ff_ctx", ctx, 6, 5)]
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
        # A single block concatenates [image, text], adds gate * proj_out and splits again.
        return [Contribution("img", "proj_out", 0), Contribution("txt", "proj_out", layout.n_image)]

    def block_streams(self, args, kwargs):
        return {"img": arg(args, kwargs, _HIDDEN, "hidden_states"),
                "txt": arg(args, kwargs, _ENCODER, "encoder_hidden_states")}

    def block_output(self, block: BlockSpec, streams):
        return streams["img"], streams["txt"]

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
            return slice(0, layout.n_image)
        return slice(None) if feature in ("attn", "ff") else slice(0, 0)

    # ---- SpecDiff ----------------------------------------------------------------------------
    # Positions of the transformer's forward arguments (HunyuanVideoTransformer3DModel.forward).
    _M_HIDDEN, _M_TIMESTEP, _M_ENCODER = 0, 1, 2

    def attention_modules(self) -> list:
        t = self.transformer
        return [b.attn for b in t.transformer_blocks] + [b.attn for b in t.single_transformer_blocks]

    def kv_cache_processor(self, attn, layer: int, control):
        from ..attention_hunyuan import HunyuanVideoSpecDiffAttnProcessor

        return HunyuanVideoSpecDiffAttnProcessor(layer, control, attn.processor)

    def joint_rows(self, layout: TokenLayout, image_index: torch.Tensor) -> torch.Tensor:
        text = torch.arange(layout.n_text, device=image_index.device, dtype=image_index.dtype) + layout.n_image
        return torch.cat([image_index, text])

    def image_key_start(self, layout: TokenLayout) -> int:
        return 0

    def call_latents(self, args, kwargs) -> torch.Tensor:
        return arg(args, kwargs, self._M_HIDDEN, "hidden_states")

    def call_timestep(self, args, kwargs) -> torch.Tensor:
        return arg(args, kwargs, self._M_TIMESTEP, "timestep")

    def with_call_inputs(self, args, kwargs, latents=None, timestep=None, image_index=None):
        if image_index is not None:
            raise NotImplementedError("HunyuanVideo runs token subsets through run_subset (dense latents in)")
        args, kwargs = list(args), dict(kwargs)

        def put(pos: int, name: str, value) -> None:
            if name in kwargs or pos >= len(args):
                kwargs[name] = value
            else:
                args[pos] = value

        if latents is not None:
            put(self._M_HIDDEN, "hidden_states", latents)
        if timestep is not None:
            put(self._M_TIMESTEP, "timestep", timestep)
        return tuple(args), kwargs

    # The model output is [B, C, F, H, W]; SpecDiff keeps per-token values [B, N, C * p_t * p * p].
    def sample_tokens(self, sample: torch.Tensor) -> torch.Tensor:
        pt, p = self._patch()
        b, c, f, h, w = sample.shape
        x = sample.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B F' H' W' C pt p p: the model's proj_out row layout
        return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)

    def tokens_sample(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        pt, p = self._patch()
        f, h, w = layout.grid
        b = tokens.shape[0]
        x = tokens.reshape(b, f, h, w, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, x.shape[1], f * pt, h * p, w * p)

    def run_subset(self, forward, args, kwargs, image_index: torch.Tensor):
        t = self.transformer
        rows: dict[str, torch.Tensor] = {}

        def keep_embedded(mod, inputs, out):  # [B, N, D] -> the C1 rows
            return out.index_select(1, image_index)

        def keep_rope(mod, inputs, out):  # (cos, sin), each [N, head_dim]
            return tuple(o.index_select(0, image_index) for o in out)

        n_img = self.token_layout(args, kwargs).n_image

        def scatter_out(mod, inputs, out):  # [B, n_c1, C'] -> dense [B, N, C'] (zeros elsewhere) for unpatchify
            rows["new"] = out
            dense = out.new_zeros(out.shape[0], n_img, out.shape[2])
            return dense.index_copy_(1, image_index, out)

        handles = [t.x_embedder.register_forward_hook(keep_embedded), t.rope.register_forward_hook(keep_rope),
                   t.proj_out.register_forward_hook(scatter_out)]
        try:
            out = forward(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return out, rows["new"]

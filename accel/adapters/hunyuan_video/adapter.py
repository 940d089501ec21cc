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
  builds a key mask [B, 1, 1, image + text] from `encoder_attention_mask`. SpecDiff's attention processor is
  `HunyuanVideoSpecDiffAttnProcessor` (attention.py, next to this file).
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

from ..base import TokenLayout
from ..dual_stream import DualStreamAdapter
from .attention import HunyuanVideoSpecDiffAttnProcessor


class HunyuanVideoAdapter(DualStreamAdapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    timestep_scale = 1.0
    text_first = False
    output_order = ("img", "txt")

    def __init__(self, transformer):
        kind = getattr(getattr(transformer, "config", None), "image_condition_type", None)
        if kind is not None:
            raise ValueError(
                f"unsupported model: HunyuanVideoTransformer3DModel with image_condition_type={kind!r} "
                "(HunyuanVideo image-to-video) has no SpecLab adapter yet; only text-to-video "
                "(image_condition_type=None) is supported"
            )
        super().__init__(transformer)

    def _patch(self) -> tuple[int, int]:
        c = self.transformer.config
        return int(c.patch_size_t), int(c.patch_size)

    def token_layout(self, args, kwargs) -> TokenLayout:
        hidden = self.call_args.get(args, kwargs, "hidden_states")
        enc = self.call_args.get(args, kwargs, "encoder_hidden_states")
        pt, p = self._patch()
        _, _, f, h, w = hidden.shape
        return TokenLayout(grid=(f // pt, h // p, w // p), n_text=enc.shape[1])

    def rotary_modules(self):
        return [self.transformer.rope]

    # ---- SpecDiff ----------------------------------------------------------------------------
    def kv_cache_processor(self, attn, layer: int, control):
        return HunyuanVideoSpecDiffAttnProcessor(layer, control, attn.processor)

    def with_call_inputs(self, args, kwargs, latents=None, timestep=None, image_index=None, text=True):
        if image_index is not None or not text:
            raise NotImplementedError("HunyuanVideo runs token subsets through run_subset (dense latents in)")
        new = {"hidden_states": latents, "timestep": timestep}
        return self.call_args.replace(args, kwargs, **{k: v for k, v in new.items() if v is not None})

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

    def run_subset(self, forward, args, kwargs, image_index: torch.Tensor, text: bool = True):
        if not text:  # the token refiner mixes the text tokens before the blocks (supports_text_cache is False)
            raise NotImplementedError("HunyuanVideo computes every text token on a subset call")
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

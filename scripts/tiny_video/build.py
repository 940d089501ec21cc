"""Build the (untrained) tiny HunyuanVideo pipeline folder: configs, tokenizers, frozen random text encoders.

Nothing is downloaded:

* ``tokenizer/``      LlamaTokenizerFast (BPE, metaspace) whose merges make every grammar word one token, right
                      padding, a BOS token (so "" still has one unmasked token). Trained with
                      ``prompt_template=PROMPT_TEMPLATE`` (``{"template": "{}", "crop_start": 0}``): the app must pass it (the pipeline's default
                      template is cut at ``crop_start=95`` real-Llama tokens, which this tokenizer cannot match).
* ``text_encoder/``   LlamaModel, 2 layers: the pipeline reads ``hidden_states[-3]`` (skip 2 layers), i.e. the
                      token embeddings; frozen at the seeded random init (the transformer learns to read them),
                      each row scaled to unit RMS. At Llama's init (std 0.02) the words were too faint: the
                      refiner's ``proj_in`` bias outweighed them about 6 to 1, and a model trained on them
                      ignored colour and direction (docs/tiny-video.md).
* ``tokenizer_2/``    CLIPTokenizer (``scripts.tiny_flux.build.clip_vocab_and_merges`` on this grammar), max length
                      77.
* ``text_encoder_2/`` CLIPTextModel (pooled output), frozen random.
* ``vae/``            AutoencoderKLHunyuanVideo, 3 blocks: spatial compression 4, temporal 4, 8 latent channels.
* ``transformer/``    HunyuanVideoTransformer3DModel, patch 1, no guidance embedding.
* ``scheduler/``      FlowMatchEulerDiscreteScheduler, shift 2.

    python -m scripts.tiny_video.build --out assets/models/tiny-hunyuanvideo --force
    python -m scripts.tiny_video.build --out /tmp/tv-smoke --preset smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from scripts.tiny_flux.build import clip_vocab_and_merges
from scripts.tiny_video import data

PRESETS = {
    "default": dict(
        llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4),
        clip=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16),
        transformer=dict(num_layers=2, num_single_layers=3, num_refiner_layers=1, num_attention_heads=4,
                         attention_head_dim=32, rope_axes_dim=(8, 12, 12)),
    ),
    "smoke": dict(
        llama=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2),
        clip=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8),
        transformer=dict(num_layers=1, num_single_layers=1, num_refiner_layers=1, num_attention_heads=2,
                         attention_head_dim=8, rope_axes_dim=(2, 2, 4)),
    ),
}
LATENT_CHANNELS = 8  # default; --latent-channels
CLIP_MAX_LEN = 77  # the pipeline pads CLIP prompts to 77


PROMPT_TEMPLATE = {"template": "{}", "crop_start": 0}  # what the app passes as ``prompt_template``


def build_llama_tokenizer(path: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    import json

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alpha = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'-!?▁")
    tr = trainers.BpeTrainer(vocab_size=100000, min_frequency=1, show_progress=False,
                             special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alpha)
    t.train_from_iterator(list(data.VOCAB_WORDS), trainer=tr)
    m = json.loads(t.to_str())["model"]
    merges = [x if isinstance(x, str) else tuple(x) for x in m["merges"]]
    tok = LlamaTokenizerFast(vocab=m["vocab"], merges=merges, add_prefix_space=True, model_max_length=1024,
                              padding_side="right", add_bos_token=True)
    tok.pad_token = "<unk>"
    tok.padding_side = "right"
    tok.save_pretrained(path)
    return LlamaTokenizerFast.from_pretrained(path)


def build_clip_tokenizer(path: str):
    import json

    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(data.VOCAB_WORDS)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=os.path.join(path, "vocab.json"), merges=os.path.join(path, "merges.txt"),
                        model_max_length=CLIP_MAX_LEN)
    tok.save_pretrained(path)
    return tok


def check_tokenizers(folder: str) -> None:
    from transformers import CLIPTokenizer, LlamaTokenizerFast

    t1 = LlamaTokenizerFast.from_pretrained(folder, subfolder="tokenizer")
    t2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    for w in data.VOCAB_WORDS:
        assert len(t1(w, add_special_tokens=False).input_ids) == 1, w
        assert len(t2(w, add_special_tokens=False).input_ids) == 1, w
    cap = "a large red circle moving left, on a black background"
    ids = t1([cap, "a circle"], padding="max_length", max_length=16).input_ids
    assert len(t1(cap).input_ids) == 12 and ids[1][3] == t1.pad_token_id, t1.convert_ids_to_tokens(ids[1])


def unit_rms_rows_(weight: torch.Tensor) -> None:
    """Scale each embedding row to unit RMS in place; the all-zero padding row stays zero."""
    with torch.no_grad():
        weight.div_(weight.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6))


def build(out: str, preset: str = "default", seed: int = 0, latent_channels: int = LATENT_CHANNELS) -> None:
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    P = PRESETS[preset]
    os.makedirs(out, exist_ok=True)
    tok = build_llama_tokenizer(os.path.join(out, "tokenizer"))
    tok2 = build_clip_tokenizer(os.path.join(out, "tokenizer_2"))
    torch.manual_seed(seed)
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024,
                                          pad_token_id=tok.pad_token_id, **P["llama"])).eval()
    unit_rms_rows_(text_encoder.embed_tokens.weight)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok2), max_position_embeddings=CLIP_MAX_LEN, bos_token_id=tok2.bos_token_id,
        eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id, projection_dim=P["clip"]["hidden_size"],
        **P["clip"])).eval()
    torch.manual_seed(seed + 2)
    n = len(P["vae"]["block_out_channels"])
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=latent_channels, down_block_types=("HunyuanVideoDownBlock3D",) * n,
        up_block_types=("HunyuanVideoUpBlock3D",) * n, spatial_compression_ratio=4, temporal_compression_ratio=4,
        scaling_factor=1.0, mid_block_add_attention=True, **P["vae"])
    torch.manual_seed(seed + 3)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=latent_channels, out_channels=latent_channels, patch_size=1, patch_size_t=1,
        guidance_embeds=False, text_embed_dim=P["llama"]["hidden_size"],
        pooled_projection_dim=P["clip"]["hidden_size"], **P["transformer"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tok, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tok2)
    pipe.save_pretrained(out, safe_serialization=True)
    check_tokenizers(out)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in
              dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2).items()}
    print("built", out, "preset", preset, "params", counts)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_video.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true", help="overwrite a folder that already holds a transformer")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latent-channels", type=int, default=LATENT_CHANNELS)
    args = ap.parse_args()
    if os.path.isdir(os.path.join(args.out, "transformer")) and not args.force:
        sys.exit(f"{args.out} already holds a model (trained weights?): --force replaces it with an untrained one")
    build(args.out, args.preset, args.seed, args.latent_channels)


if __name__ == "__main__":
    main()

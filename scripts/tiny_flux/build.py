"""Build the (untrained) tiny FLUX pipeline folder: configs, tokenizers, text encoders.

Everything is made here, nothing is downloaded:

* ``tokenizer/``    CLIPTokenizer (byte-level BPE, vocab.json + merges.txt) whose merges make every
                    grammar word a single token; any other text falls back to byte tokens.
* ``tokenizer_2/``  T5TokenizerFast (Unigram ``tokenizer.json``): grammar words are single pieces,
                    other words fall back to letters or ``<unk>``.
* ``text_encoder/`` CLIPTextModel, ``text_encoder_2/`` T5EncoderModel: small, frozen at their seeded
                    random initialisation (the transformer learns to read them).
* ``vae/``          AutoencoderKL, 3 blocks (scale factor 4), 4 latent channels, no quant convs
                    (trained by ``scripts.tiny_flux.train``, which also sets scaling/shift factors).
* ``transformer/``  FluxTransformer2DModel (double + single stream blocks, RoPE), trained later.
* ``scheduler/``    FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting.

Usage::

    # full-size preset (--force: replaces the trained weights!)
    python -m scripts.tiny_flux.build --out assets/models/tiny-flux --force
    python -m scripts.tiny_flux.build --out /tmp/tf-smoke --preset smoke       # tiny, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from scripts.tiny_flux import data

PRESETS = {
    # the shipped model
    "default": dict(
        clip=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        t5=dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4),
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32),
        transformer=dict(
            num_layers=2,
            num_single_layers=5,
            attention_head_dim=32,
            num_attention_heads=6,
            axes_dims_rope=(8, 12, 12),
        ),
        sample_size=128,
    ),
    # CPU smoke tests: same structure, tiny widths
    "smoke": dict(
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        t5=dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2),
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8),
        transformer=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            axes_dims_rope=(4, 6, 6),
        ),
        sample_size=32,
    ),
}

CLIP_MAX_LEN = 32  # CLIP tokenizer model_max_length == CLIP max_position_embeddings
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE like CLIP's: 512 byte tokens (with/without ``</w>``) + merges learned on the words.

    The merges are learned with the ``tokenizers`` BPE trainer on the grammar words (each word once,
    until every word is a single token), so replaying them by rank turns each grammar word into one
    token (checked by ``check_tokenizers``). Any other word falls back to byte tokens, never to unk.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    b2u = _bytes_to_unicode()
    base = list(b2u.values())
    t = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>", initial_alphabet=base
    )
    t.train_from_iterator(list(words), trainer=trainer)
    learned = json.loads(t.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    vocab_list = base + [c + "</w>" for c in base]
    seen = set(vocab_list)
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in seen:
            vocab_list.append(tok)
            seen.add(tok)
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(path: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(data.VOCAB_WORDS)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=os.path.join(path, "vocab.json"),
        merges=os.path.join(path, "merges.txt"),
        model_max_length=CLIP_MAX_LEN,
    )
    tok.save_pretrained(path)
    return tok


def case_variants(w: str) -> list[str]:
    return sorted({w.title(), w.upper()} - {w})


def build_t5_tokenizer(path: str):
    """Unigram pieces: specials, whole grammar words, their Title/UPPER variants, letter fallbacks.

    The T5 fast tokenizer of transformers 5.x keeps no lower-casing normalizer, so case variants of the
    grammar words are separate pieces whose embedding rows are tied to the lower-case word (see
    ``tie_case_variants``): "A Large RED circle" encodes exactly like "a large red circle".
    """
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for w in data.VOCAB_WORDS:
        pieces += [("▁" + v, -1.0) for v in [w] + case_variants(w)]
    pieces += [(",", -1.0), ("▁", -5.0)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.'-!?"
    pieces += [(c, -10.0) for c in chars] + [("▁" + c, -10.0) for c in chars]
    seen, uniq = set(), []
    for p, sc in pieces:
        if p not in seen:
            uniq.append((p, sc))
            seen.add(p)
    tok = T5TokenizerFast(vocab=uniq, extra_ids=0, model_max_length=512)
    tok.save_pretrained(path)
    return tok


def tie_case_variants(text_encoder_2, tok2) -> None:
    emb = text_encoder_2.get_input_embeddings().weight
    vocab = tok2.get_vocab()
    with torch.no_grad():
        for w in data.VOCAB_WORDS:
            for v in case_variants(w):
                if "▁" + v in vocab:
                    emb[vocab["▁" + v]] = emb[vocab["▁" + w]]


def check_tokenizers(folder: str) -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    t1 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    t2 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    for w in data.VOCAB_WORDS:
        ids = t1(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, t1.convert_ids_to_tokens(ids))
        ids = t2(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != t2.unk_token_id, (w, t2.convert_ids_to_tokens(ids))
    cap = "a large red circle on the left and a small blue square on the right, on a gray background"
    n1 = len(t1(cap).input_ids)
    n2 = len(t2(cap).input_ids)
    assert n1 <= CLIP_MAX_LEN and n2 <= 32, (n1, n2)
    assert t2.unk_token_id not in t2("A LARGE Red circle, on the Left").input_ids


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def build(out: str, preset: str = "default", seed: int = 0) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    P = PRESETS[preset]
    os.makedirs(out, exist_ok=True)
    tok = build_clip_tokenizer(os.path.join(out, "tokenizer"))
    tok2 = build_t5_tokenizer(os.path.join(out, "tokenizer_2"))

    torch.manual_seed(seed)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tok),
        max_position_embeddings=CLIP_MAX_LEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=P["clip"]["hidden_size"],
        **P["clip"],
    )
    text_encoder = CLIPTextModel(clip_cfg).eval()
    torch.manual_seed(seed + 1)
    t5_cfg = T5Config(
        vocab_size=len(tok2),
        num_decoder_layers=0,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok2.pad_token_id,
        eos_token_id=tok2.eos_token_id,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        **P["t5"],
    )
    text_encoder_2 = T5EncoderModel(t5_cfg).eval()
    tie_case_variants(text_encoder_2, tok2)

    torch.manual_seed(seed + 2)
    n = len(P["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        sample_size=P["sample_size"],
        scaling_factor=1.0,  # set from data statistics by the training script
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
        **P["vae"],
    )
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        joint_attention_dim=P["t5"]["d_model"],
        pooled_projection_dim=P["clip"]["hidden_size"],
        guidance_embeds=False,  # like FLUX.1-schnell: guidance_scale is ignored
        **P["transformer"],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # the CLIP/T5 tokenizer folders were (re)written by save_pretrained; re-check they load
    check_tokenizers(out)
    with torch.no_grad():
        a = text_encoder_2(tok2("A LARGE Red circle", return_tensors="pt").input_ids)[0]
        b = text_encoder_2(tok2("a large red circle", return_tensors="pt").input_ids)[0]
    assert torch.equal(a, b), "case variants must encode like the lower-case words"
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in
              dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2).items()}
    print("built", out, "preset", preset, "params", counts)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tiny_flux.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="pipeline folder to write (e.g. assets/models/tiny-flux)")
    ap.add_argument("--force", action="store_true", help="overwrite a folder that already holds a transformer")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.path.isdir(os.path.join(args.out, "transformer")) and not args.force:
        sys.exit(f"{args.out} already holds a model (trained weights?): --force replaces it with an untrained one")
    build(args.out, args.preset, args.seed)


if __name__ == "__main__":
    main()
